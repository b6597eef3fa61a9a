"""Leave one patient out over the real labelled CTs of configs/abdomen-ct.json, with the ablation.

For each variant (both = real + synthetic, real = real only, synthetic = synthetic only) and each
real patient P, a fold config is derived from the main config in which P is absent everywhere:
not a training case, not a label map for synthesis, not a CT of the intensity table. There is
no validation split, so no checkpoint is chosen on anything (the last one is exported). The fold
is trained (`cascadeseg train`, resumable), P is segmented with the fold's model
(`cascadeseg segment`), and each variant is scored with `cascadeseg evaluate` (Dice, HD95).

    python configs/leave_one_out.py train [--variants both,real,synthetic] [--folds ...] [--jobs 2]
    python configs/leave_one_out.py evaluate [--variants ...]     # segments, scores, prints the table

Everything is written under --out (default runs/loo); no tracked file is touched.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "configs" / "abdomen-ct.json"
VARIANTS = ("both", "real", "synthetic")
NATIVE = {"abdomen_ct_3mm", "s0009"}       # non-contrast CTs: the ones an intensity table may be measured on
NEGATIVE = {"s0003"}                       # organ-free CTs: training cases, never a fold (nothing to score)


def _abs(path: str) -> str:
    return str((MAIN.parent / path).resolve())


def fold_config(raw: dict, test: str, variant: str, threads: int) -> dict:
    """The main config without patient `test`, for one ablation variant (paths made absolute)."""
    cfg = copy.deepcopy(raw)
    data = cfg["data"]
    cases = [dict(c, image=_abs(c["image"]), label=_abs(c["label"])) for c in data["cases"]]
    if cfg.get("finetune", {}).get("model"):
        cfg["finetune"] = dict(cfg["finetune"], model=_abs(cfg["finetune"]["model"]))
    held = next(c for c in cases if c["name"] == test)
    train = [c for c in cases if c["name"] != test]
    syn = dict(data["synthetic"])
    syn["label_maps"] = [_abs(p) for p in syn["label_maps"] if _abs(p) != held["label"]]
    syn["table"] = {"measure": [c["name"] for c in train if c["name"] in NATIVE]}
    if "atlases" in syn:                       # the registration route's real CTs
        syn["atlases"] = [a for a in syn["atlases"] if a != test]
    if variant == "real":
        data.pop("synthetic")
    elif variant == "synthetic":
        data["synthetic"] = dict(syn, share=1.0)
        train = [c for c in train if c["name"] in NATIVE]     # only to measure the intensity table
    else:
        data["synthetic"] = syn
    data["cases"] = train
    data["split"] = {"train": [c["name"] for c in train] if variant != "synthetic" else [], "val": []}
    cfg["name"] = f"loo-{variant}-{test}"
    cfg["train"] = dict(cfg["train"], threads=threads)
    cfg.pop("model_card", None)
    return cfg


def _folds(raw: dict, wanted: str | None) -> list[str]:
    names = [c["name"] for c in raw["data"]["cases"] if c["name"] not in NEGATIVE]
    return [n for n in names if not wanted or n in wanted.split(",")]


def _init_model(raw: dict, test: str) -> str | None:
    """The model package the recipe fine-tunes from (config key finetune.model), or None to train from
    scratch; a fold whose test patient that model was trained on cannot be measured this way."""
    ft = raw.get("finetune") or {}
    if not ft.get("model"):
        return None
    if test in ft.get("trained_on", []):
        raise SystemExit(f"fold {test}: the recipe starts from {ft['model']}, which was trained on {test}; "
                         "that fold cannot be held out (leave it out of --folds)")
    return _abs(ft["model"])


def _run(cmd: list[str], log: Path) -> int:
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def train(args: argparse.Namespace) -> int:
    raw = json.loads(MAIN.read_text(encoding="utf-8"))
    jobs = []
    for variant in args.variants.split(","):
        for test in _folds(raw, args.folds):
            run_dir = Path(args.out) / variant / test
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = run_dir / "fold_config.json"
            cfg_path.write_text(json.dumps(fold_config(raw, test, variant, args.threads), indent=1), encoding="utf-8")
            init = _init_model(raw, test)
            start = ["finetune", init] if init else ["train"]
            jobs.append([sys.executable, "-m", "CascadeSegLib", *start, str(cfg_path), "--no-progress",
                         "--run-dir", str(run_dir / "run")])

    def one(cmd: list[str]) -> int:
        return _run(cmd, Path(cmd[-1]).parent / "train.log")

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(one, jobs))
    return max(codes, default=0)


def _reference(case: dict, out: Path) -> Path:
    """The case's TotalSegmentator label map in the model's values, on its own grid."""
    sys.path.insert(0, str(REPO))
    import SimpleITK as sitk

    from CascadeSegLib.labels import LabelSet
    from CascadeSegLib.train.dataset import label_lookup

    raw = json.loads(MAIN.read_text(encoding="utf-8"))
    table = label_lookup(LabelSet.from_names(raw["labels"]), None, None, "totalsegmentator")
    lab = sitk.ReadImage(_abs(case["label"]))
    arr = table[sitk.GetArrayFromImage(lab)]
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(lab)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out), True)
    return out


def evaluate(args: argparse.Namespace) -> int:
    raw = json.loads(MAIN.read_text(encoding="utf-8"))
    root = Path(args.out)
    refs = root / "references"
    for c in raw["data"]["cases"]:
        if c["name"] in _folds(raw, args.folds):
            _reference(c, refs / f"{c['name']}.nii.gz")
    for variant in args.variants.split(","):
        pred = root / variant / "predictions"
        pred.mkdir(parents=True, exist_ok=True)
        for c in raw["data"]["cases"]:
            if c["name"] not in _folds(raw, args.folds):
                continue
            model = root / variant / c["name"] / "run" / "model"
            if not (model / "model.json").is_file():
                print(f"{variant}/{c['name']}: not trained yet", file=sys.stderr)
                continue
            _run([sys.executable, "-m", "CascadeSegLib", "segment", _abs(c["image"]), "-o",
                  str(pred / f"{c['name']}.nii.gz"), "--model", str(model), "--overwrite"],
                 root / variant / "segment.log")
        _run([sys.executable, "-m", "CascadeSegLib", "evaluate", str(pred), str(refs),
              "-o", str(root / variant / "report"), "--name", variant, "--quiet", "--no-plots", "--no-label-check"],
             root / variant / "evaluate.log")
    return table(root, args.variants.split(","))


def table(root: Path, variants: list[str]) -> int:
    """Markdown: Dice (HD95 mm) per organ, per left-out patient, per variant; '-' where the organ
    is not in the left-out CT (and not predicted), 'FP x ml' where it is not there but predicted."""
    raw = json.loads(MAIN.read_text(encoding="utf-8"))
    organs = raw["labels"]
    print("| variant | left-out CT | " + " | ".join(organs) + " | mean |")
    print("|---|---|" + "---:|" * (len(organs) + 1))
    for variant in variants:
        path = root / variant / "report" / "metrics.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text(encoding="utf-8"))
        for method in metrics.get("methods", {}).values():
            for case, result in sorted(method.get("cases", {}).items()):
                cells, dices = [], []
                for o in organs:
                    m = result.get("organs", {}).get(o)
                    if not m or m.get("status") == "absent":
                        cells.append("-")
                    elif not m.get("ref_ml"):
                        cells.append(f"FP {m.get('pred_ml', 0):.0f} ml")
                    else:
                        dices.append(m["dice"])
                        hd = m.get("hd95_mm")
                        cells.append(f"{m['dice']:.2f}" + (f" ({hd:.0f})" if isinstance(hd, (int, float)) else ""))
                mean = sum(dices) / len(dices) if dices else float("nan")
                print(f"| {variant} | {case} | " + " | ".join(cells) + f" | {mean:.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("train", "evaluate", "table"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--folds", default=None, help="comma-separated left-out cases (default: every real case)")
    ap.add_argument("--out", default=str(REPO / "runs" / "loo"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per training")
    args = ap.parse_args()
    if args.action == "train":
        return train(args)
    if args.action == "evaluate":
        return evaluate(args)
    return table(Path(args.out), args.variants.split(","))


if __name__ == "__main__":
    sys.exit(main())
