"""The report `improve` leaves in the new model's folder: Dice before and after, per case.

It travels with the model (the Slicer module shows it when the model appears), so whoever
uses the model later sees what it learned and whether a held-out case got better too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_JSON = "improve_report.json"
REPORT_MD = "IMPROVE_REPORT.md"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _rows(title: str, cases: dict[str, Any]) -> list[str]:
    lines = [f"## {title}", "", "| case | organ | Dice before [%] | Dice after [%] |", "|---|---|---:|---:|"]
    for case, res in cases.items():
        for organ, before in res["before"].items():
            lines.append(f"| {case} | {organ} | {_pct(before)} | {_pct(res['after'].get(organ))} |")
    return lines + [""]


def report_markdown(report: dict[str, Any]) -> str:
    trained = (f"{report['iterations']} iterations per stage" if report["iterations"]
               else "No fine-tuning (the networks are the parent's)")
    lines = [f"# {report['model']}: improved from {report['parent']}", "",
             f"{trained}, {report['seconds']:.0f} s. Dice of the reviewed organs against the stored corrections; "
             "unreviewed organs were left out of the loss and of the atlases' vote.", ""]
    if report.get("atlases"):
        lines += [f"{len(report['atlases'])} correction(s) joined the registered atlases: "
                  + ", ".join(report["atlases"]) + ". **This package holds their CTs** (3 mm, HU): it carries "
                  "patient images, so share it only where those images may go.", ""]
    kept = "trained on" if report["iterations"] else "kept as atlases"
    lines += _rows(f"Correction cases ({kept})", report["cases"])
    if report.get("left_out"):
        lines += _rows("Left-out cases (a check model made without them)", report["left_out"])
    if report.get("replay"):
        lines += ["Replayed the parent's predictions on: " + ", ".join(Path(p).name for p in report["replay"]), ""]
    return "\n".join(lines)


def summary_line(report: dict[str, Any]) -> str:
    """One line for a terminal or a status bar: mean reviewed Dice before -> after."""
    def mean(key: str) -> float | None:
        vals = [v for res in report["cases"].values() for v in res[key].values() if v is not None]
        return sum(vals) / len(vals) if vals else None

    return (f"{report['model']}: reviewed-organ Dice on the corrections {_pct(mean('before'))}% -> "
            f"{_pct(mean('after'))}% ({len(report['cases'])} case(s), {report['seconds']:.0f} s)")


def write_report(folder: Path, report: dict[str, Any]) -> list[Path]:
    """Write improve_report.json and IMPROVE_REPORT.md (atomically) into `folder`."""
    from ..evaluate import atomic_write, write_json

    return [write_json(folder / REPORT_JSON, report), atomic_write(folder / REPORT_MD, report_markdown(report))]
