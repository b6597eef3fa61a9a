"""The `synthetic` data source of a training config: CTs drawn from label maps, cached per run.

    "data": {"cases": [...real cases...],
             "synthetic": {"label_maps": ["s0004_label.nii.gz", ...], "per_label_map": 8, "seed": 0,
                           "spacing": [3, 3, 3], "share": 0.5,
                           "table": {"measure": ["real case", ...]} | "default" | "table.json",
                           "structures": "totalsegmentator" | "structures.json",
                           "atlases": ["real case", ...]}}

Each sample is a deterministic function of (label map, index, seed, table, settings), written
once into the run folder (atomically) and then trained on like a real case, so a resumed run
sees exactly the same images. `table: {"measure": [...]}` measures the intensity table on the
named real cases of this run only, so a leave-one-out fold never learns the look of its test
patient. `share` is the fraction of training sub-volumes drawn from synthetic cases.
`atlases` adds the registration route (`transfer.transfer`): each named real case of this run is
warped onto each label map that is not its own, one more case per (label map, atlas) pair.
`"misregistered": "unknown"` (default "keep") labels 255, never trained on, the voxels of such a
case that contradict the label map by more than `misregistered_margin_mm` (6) in one of the
structures the run trains (`transfer.mend_misregistered`): there the warped CT is not that anatomy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write
from ..errors import UserError
from ..io import case_name, read_image
from ..labels import UNKNOWN_LABEL
from .render import SynthSettings, synthesize
from .tissues import IntensityTable, default_table_path, measure_table, require_known_structures, structure_names
from .transfer import TransferSettings, mend_misregistered, transfer

_KEYS = {"label_maps", "per_label_map", "seed", "spacing", "share", "table", "structures", "atlases", "comment",
         "misregistered", "misregistered_margin_mm"}


def _table_for(spec: dict[str, Any], resolve: Callable[[Any], Path], real_cases: Sequence[Any]) -> IntensityTable:
    table = spec.get("table", "default")
    if table == "default":
        return IntensityTable.load(default_table_path())
    if isinstance(table, dict) and "measure" in table:
        by_name = {c.name: c for c in real_cases}
        missing = [n for n in table["measure"] if n not in by_name]
        if missing:
            raise UserError(f"data.synthetic.table.measure names case(s) {missing} that this run does not train on")
        from ..io import read_image

        cases = [(n, read_image(by_name[n].image), read_image(by_name[n].label)) for n in table["measure"]]
        return measure_table(cases)
    try:
        return IntensityTable.load(resolve(table))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read data.synthetic.table {table} ({exc})") from None


def synthetic_cases(spec: dict[str, Any], resolve: Callable[[Any], Path], real_cases: Sequence[Any], out_dir: Path,
                    progress: Callable[[int, int], None] | None = None,
                    trained: Sequence[int] | None = None) -> list[Any]:
    """Generate (or find) the run's synthetic cases; returns training `Case`s. `trained`: the
    label-map values the run learns (what `"misregistered"` checks; every structure when None)."""
    from ..train.dataset import Case

    unknown = set(spec) - _KEYS
    if unknown:
        raise UserError(f"unknown data.synthetic setting(s) {sorted(unknown)}; known: {', '.join(sorted(_KEYS))}")
    maps = [resolve(p) for p in spec.get("label_maps", [])]
    if not maps:
        raise UserError("data.synthetic needs label_maps: a list of label map files")
    for p in maps:
        if not p.is_file():
            raise UserError(f"data.synthetic: label map {p} does not exist")
    n = int(spec.get("per_label_map", 4))
    seed = int(spec.get("seed", 0))
    spacing = spec.get("spacing")
    settings = SynthSettings(spacing=tuple(float(s) for s in spacing) if spacing else None)  # type: ignore[arg-type]
    table = _table_for(spec, resolve, real_cases)
    names = structure_names(spec.get("structures"))
    blob = json.dumps([table.to_json(), spacing, seed, sorted(names.items()), repr(settings)], sort_keys=True)
    key = hashlib.sha1(blob.encode()).hexdigest()[:10]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"table-{key}.json", json.dumps(table.to_json(), indent=1))
    cases = []
    pairs = [(atlas, path) for atlas in _atlases(spec, real_cases) for path in maps
             if path.resolve() != Path(atlas.label).resolve()]        # an atlas's own anatomy is nothing new
    total, done = len(maps) * n + len(pairs), 0
    for m_index, path in enumerate(maps):
        stem = case_name(path)
        labels = None
        for i in range(n):
            folder = out_dir / f"synth-{stem}-{i:03d}-{key}"
            if not (folder / "label.nii.gz").is_file():
                if labels is None:
                    labels = read_image(path)
                    require_known_structures(names, np.unique(sitk.GetArrayViewFromImage(labels)).tolist(), path,
                                             "give data.synthetic.structures a {value: name or tissue} table")
                result = synthesize(labels, names, table, seed=seed * 100003 + m_index * 1009 + i, settings=settings)
                _write_case(out_dir, folder, result.ct, result.labels, {"label_map": str(path), **result.info})
            cases.append(Case(folder.name, folder / "ct.nii.gz", folder / "label.nii.gz"))
            done += 1
            if progress:
                progress(done, total)
    transfer_settings = (TransferSettings(spacing=tuple(float(s) for s in spacing))  # type: ignore[arg-type]
                         if spacing else TransferSettings())
    misregistered = spec.get("misregistered", "keep")
    if misregistered not in ("keep", "unknown"):
        raise UserError(f"data.synthetic.misregistered is {misregistered!r}; give 'keep' or 'unknown'")
    margin = float(spec.get("misregistered_margin_mm", 6.0))
    learned = set(names) if trained is None else set(trained)
    checked = [v for v in names if v in learned]
    mended = f"-unknown{margin:g}mm" if misregistered == "unknown" else ""
    for atlas, path in pairs:
        folder = out_dir / f"reg-{case_name(path)}-{atlas.name}-{key}{mended}"
        if not (folder / "label.nii.gz").is_file():
            target = read_image(path)
            result = transfer(read_image(atlas.image), read_image(atlas.label), target, names, table,
                              transfer_settings)
            labels, info = result.labels, {"label_map": str(path), "atlas": atlas.name, **result.info}
            if mended:
                labels, ml = mend_misregistered(labels, target, checked, margin, UNKNOWN_LABEL)
                info["unknown_ml"] = round(sum(ml.values()), 1)
            _write_case(out_dir, folder, result.ct, labels, info)
        cases.append(Case(folder.name, folder / "ct.nii.gz", folder / "label.nii.gz"))
        done += 1
        if progress:
            progress(done, total)
    return cases


def _atlases(spec: dict[str, Any], real_cases: Sequence[Any]) -> list[Any]:
    by_name = {c.name: c for c in real_cases}
    wanted = list(spec.get("atlases", []))
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise UserError(f"data.synthetic.atlases names case(s) {missing} that this run does not train on")
    return [by_name[n] for n in wanted]


def _write_case(out_dir: Path, folder: Path, ct: sitk.Image, labels: sitk.Image, info: dict[str, Any]) -> None:
    """Write one case folder atomically (a rename), so a crash never leaves half a case behind."""
    tmp = out_dir / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sitk.WriteImage(ct, str(tmp / "ct.nii.gz"), True)
    sitk.WriteImage(labels, str(tmp / "label.nii.gz"), True)
    (tmp / "info.json").write_text(json.dumps(info), encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:          # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
