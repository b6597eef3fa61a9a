"""Per-case report: organ volumes, timings, model and input geometry (JSON and Markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write
from .labels import LabelSet


def organ_volumes(labels: sitk.Image, labelset: LabelSet) -> dict[str, dict[str, float]]:
    """{organ name: {"voxels": n, "ml": volume}} for every label of the set (0 when absent)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=labelset.num_classes)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {lab.name: {"voxels": int(counts[lab.value]), "ml": round(float(counts[lab.value]) * voxel_ml, 2)}
            for lab in labelset}


def build_report(case: str, image: sitk.Image, labels: sitk.Image, labelset: LabelSet,
                 timings: dict[str, float], model: dict[str, Any], outputs: dict[str, str],
                 stats: dict[str, float] | None = None, device: str = "",
                 atlas_check: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report's content; `atlas_check`: the conflicts with the atlases (inference/atlas_check.py)
    of a result segmented with atlases, None for one without."""
    report: dict[str, Any] = {
        "case": case,
        "input": {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                  "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())},
        "model": model,
        "device": device,
        "organs": organ_volumes(labels, labelset),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "candidate_regions": {k: round(v, 4) for k, v in (stats or {}).items()},
        "outputs": outputs,
    }
    if atlas_check is not None:
        report["atlas_check"] = atlas_check
    return report


def report_markdown(report: dict[str, Any], labelset: LabelSet) -> str:
    lines = [f"# CascadeSeg report: {report['case']}", "",
             f"Model: {report['model'].get('name')} {report['model'].get('version')} on {report['device']}",
             f"Input: {' x '.join(str(s) for s in report['input']['size'])} voxels, spacing "
             f"{' x '.join(f'{s:.3g}' for s in report['input']['spacing'])} mm", "",
             "| organ | volume (ml) | voxels |", "|---|---:|---:|"]
    for lab in labelset:
        o = report["organs"][lab.name]
        lines.append(f"| {lab.display} | {o['ml']:.1f} | {o['voxels']} |")
    lines += ["", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["timings_s"].items()]
    stats = report.get("candidate_regions") or {}
    fractions = {k[:-len("_fraction")]: v for k, v in stats.items() if k.endswith("_fraction")}
    if fractions:
        lines += ["", "Candidate regions (share of the model grid): "
                  + ", ".join(f"{k.upper()} {v:.1%}" for k, v in fractions.items())]
    tiles = [f"{stage} {int(stats[f'{stage}_tiles'])} pass(es) over {int(stats[f'{stage}_computed_voxels']):,} voxels"
             for stage in ("stage1", "stage2") if f"{stage}_tiles" in stats]
    if tiles:
        lines += ["Network work: " + ", ".join(tiles)]
    if "atlas_prior_used" in stats:     # a model with atlases: say whether they shaped this result
        where = ("this slab (placed by a translation search)" if stats.get("atlas_prior_slab") else
                 "this scan (a correlation search tried where centres of mass mislead)"
                 if stats.get("atlas_prior_search") else
                 "this scan")
        votes = ", each voting by how well it matches the scan locally," if stats.get("atlas_prior_weighted") else ""
        own_hu = (" weighted by each organ's HU in this scan," if votes else ", weighted by each organ's HU in this "
                  "scan,") if stats.get("atlas_prior_intensity") else ""
        lines += [f"Atlas prior: {int(stats.get('atlas_prior_atlases', 0))} atlases registered onto {where}{votes}"
                  f"{own_hu} and fused with stage 2{_agreement_text(stats)}" if stats["atlas_prior_used"] else
                  "Atlas prior: skipped (the scan is too short to register atlases onto); the networks alone "
                  "segmented it"]
    refined = any(k.startswith("refine_iterations_") for k in stats)
    lines += _atlas_check_lines(report.get("atlas_check"), refined, stats.get("atlas_check_per_organ") == 0.0,
                                bool(stats.get("atlas_prior_slab")))
    return "\n".join(lines) + "\n"


def _atlas_check_lines(conflicts: list[dict[str, Any]] | None, refined: bool = False,
                       no_abdomen: bool = False, slab: bool = False) -> list[str]:
    """The atlas check in words: what to review first, then the small border conflicts.
    `no_abdomen`: no atlas agreed with stage 1, so no organ was checked against the atlases;
    `slab`: the atlases were placed on a slab, so the conflicts are listed and none is flagged."""
    if conflicts is None:
        return []
    flagged = [c for c in conflicts if c["flagged"]]
    minor = [c for c in conflicts if not c["flagged"]]
    lines = ["", "(The atlas check below is of the cascade's labels, before --refine.)"] if refined else [""]
    if slab and not flagged:
        if minor:
            lines.append("Atlas check on a slab, listed but not flagged (atlases registered onto a slab are often "
                         "centimetres off): " + "; ".join(_conflict_text(c) for c in minor))
        else:
            lines.append("Atlas check on a slab: no organ lies where most atlases put another organ or none.")
        return lines
    if flagged:
        lines.append("**Atlas check: review these regions.**")
        lines += ["- " + _conflict_text(c) for c in flagged]
    elif no_abdomen:
        lines.append("Atlas check: no atlas's organs agree with the network's, so the scan seems to hold none of "
                     "the abdomen's organs; the result labels next to nothing, and no organ is checked against "
                     "the atlases.")
    else:
        lines.append("Atlas check: no organ lies, in a large part, where most atlases put another organ or none.")
    if minor:
        lines.append("Small disagreements (borders): " + "; ".join(_conflict_text(c) for c in minor))
    return lines


def _agreement_text(stats: dict[str, float]) -> str:
    """How well the closest atlas's organs agree with stage 1's: the atlas check's measure of whether
    the scan shows an abdomen at all (atlas_check.scan_conflict)."""
    if "atlas_prior_agreement" not in stats:
        return ""
    return f" (the closest atlas's organs agree with stage 1's by Dice {stats['atlas_prior_agreement']:.2f})"


def _conflict_text(c: dict[str, Any]) -> str:
    if c.get("kind") == "scan":
        return (f"no atlas's organs agree with the network's (best Dice {c['fraction']:.2f}): the scan may hold none "
                f"of the abdomen's organs (a pelvic or chest CT), and all {c['ml']:.0f} ml of segments may be false")
    if c.get("kind") == "missed":
        return (f"{c['ml']:.0f} ml where most atlases put the {c['atlases_say']} is unlabelled "
                f"({c['fraction']:.0%} of where they agree on it)")
    return f"{c['ml']:.0f} ml of the {c['organ']} ({c['fraction']:.0%} of it) lies where most atlases put the " \
           f"{c['atlases_say']}"


def write_report(report: dict[str, Any], labelset: LabelSet, json_path: Path, md_path: Path) -> None:
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"),
                       (md_path, report_markdown(report, labelset))):
        atomic_write(path, text, make_parents=False)
