"""Reports: Markdown tables, CSV files and metrics.json of evaluations, comparisons and C2 curves."""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..errors import UserError
from ..labels import LabelSet
from .metrics import DEFINITIONS, METRIC_TITLES, METRICS, OTHER, TABLE_METRICS
from .statistics import compare_methods, describe, difference_table, organ_names, summarize, values

FORMAT_VERSION = 1


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "dice":
        return f"{100.0 * value:.1f}"
    if metric in ("p_value",):
        return f"{value:.3g}"
    return f"{value:.2f}" if metric.endswith("_mm") else f"{value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


STAT_KEYS = ("mean", "std", "median", "min", "max")


def stats_markdown(methods: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """Tables 1-2 of the paper: organs x (mean, std, median, min, max) for each method.

    `methods`: name -> summary (from `summarize`).
    """
    organs: list[str] = []
    for s in methods.values():
        organs += [o for o in s if o not in organs and o != "all"]
    organs.append("all")
    header = ["Organ"]
    for name in methods:
        prefix = f"{name} " if len(methods) > 1 else ""
        header += [prefix + k.capitalize() for k in STAT_KEYS] + [prefix + "n"]
    rows = []
    for organ in organs:
        row = [organ if organ != "all" else "**all (pooled)**"]
        for s in methods.values():
            d = s.get(organ, {}).get(metric) or describe([])
            row += [_fmt(d[k], metric) for k in STAT_KEYS] + [str(d["n"])]
        rows.append(row)
    return f"### {METRIC_TITLES.get(metric, metric)}\n\n" + markdown_table(header, rows)


def difference_markdown(diff: Mapping[str, Any], metric: str, a: str, b: str) -> str:
    """Table 3: statistics of the per-case differences B - A."""
    header = ["Organ"] + [k.capitalize() for k in STAT_KEYS] + ["n"]
    rows = [[o if o != "all" else "**all (pooled)**"] + [_fmt(d[k], metric) for k in STAT_KEYS]
            + [str(d["n"])] for o, d in diff.items()]
    return (f"### {METRIC_TITLES.get(metric, metric)}: {b} minus {a}\n\n"
            + markdown_table(header, rows))


def compare_markdown(result: Mapping[str, Any], metric: str, a: str, b: str,
                     alpha: float) -> str:
    """Table 4: means of both methods, Wilcoxon p-values; the significantly better in bold."""
    header = ["Organ", f"{a} mean", f"{b} mean", "median diff (B-A)", "n", "W", "p", "sig"]
    rows = []
    for organ, r in result.items():
        ma, mb = _fmt(r["mean_a"], metric), _fmt(r["mean_b"], metric)
        if r["better"] == "A":
            ma = f"**{ma}**"
        elif r["better"] == "B":
            mb = f"**{mb}**"
        rows.append([organ if organ != "all" else "**all (pooled)**", ma, mb,
                     _fmt(r["median_diff"], metric), str(r["n"]),
                     "-" if r["statistic"] is None else f"{r['statistic']:g}",
                     _fmt(r["p_value"], "p_value"), r["mark"]])
    return (f"### {METRIC_TITLES.get(metric, metric)}: {a} vs {b} (Wilcoxon signed-rank, "
            f"two-sided; * p < {alpha:g}, better method in bold)\n\n" + markdown_table(header, rows))


def candidates_markdown(mean: Mapping[str, Any]) -> str:
    """Fig. 6 as a table: recall / FPR per organ (rows) and radius (columns), percent."""
    parts = []
    for key, title in (("recall", "Recall [%]"), ("fpr", "False-positive rate [%]"),
                       ("fdr", "False-discovery rate [%] (share of C2 outside the organ)")):
        radii = next(iter(mean.values()))["radii"] if mean else []
        header = ["Organ"] + [f"r={r}" for r in radii]
        rows = [[o] + ["-" if v is None else f"{100 * v:.2f}" for v in e[key]]
                for o, e in mean.items()]
        parts.append(f"### {title}\n\n" + markdown_table(header, rows))
    return "\n".join(parts)


def per_case_csv(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """Long CSV: method, case, organ, status and every metric."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "case", "organ", "status", *METRICS])
    for mname, cases in methods.items():
        for case, c in cases.items():
            for organ, m in c["organs"].items():
                w.writerow([mname, case, organ, m.get("status", "")]
                           + ["" if m.get(k) is None else repr(float(m[k])) for k in METRICS])
    return buf.getvalue()


def summary_csv(summaries: Mapping[str, Mapping[str, Any]],
                metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Long CSV: method, organ, metric, n, mean, std, median, min, max."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "organ", "metric", "n", *STAT_KEYS])
    for mname, s in summaries.items():
        for organ, e in s.items():
            for metric in metrics:
                d = e.get(metric)
                if d is None:
                    continue
                w.writerow([mname, organ, metric, d["n"]]
                           + ["" if d[k] is None else repr(d[k]) for k in STAT_KEYS])
    return buf.getvalue()


def pooled_confusion(cases: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The cases' `confusion_ml` summed: {predicted: {reference: ml}} (cases without one skipped)."""
    total: dict[str, dict[str, float]] = {}
    for c in cases.values():
        for pred, row in (c.get("confusion_ml") or {}).items():
            into = total.setdefault(pred, {})
            for ref, ml in row.items():
                into[ref] = into.get(ref, 0.0) + float(ml)
    return total


def _largest(parts: Mapping[str, float], top: int = 3) -> str:
    """'aorta 11.2, inferior_vena_cava 11.1, ...' for the largest entries; '-' for none."""
    big = sorted(((ml, n) for n, ml in parts.items() if ml >= 0.05), reverse=True)
    text = ", ".join(f"{n} {ml:.1f}" for ml, n in big[:top])
    return (text + (", ..." if len(big) > top else "")) if text else "-"


def confusion_markdown(methods: Mapping[str, Mapping[str, Any]], organs: Sequence[str]) -> str:
    """Per method and organ, pooled over its cases: the overlap, the predicted ml outside the
    reference organ and where they lie, the missed ml and what they were labelled."""
    parts = []
    for name, cases in methods.items():
        conf = pooled_confusion(cases)
        if not conf:
            continue
        rows = []
        for organ in organs:
            row = conf.get(organ, {})
            column = {p: r[organ] for p, r in conf.items() if organ in r}
            overlap = row.get(organ, 0.0)
            extra = {k: v for k, v in row.items() if k != organ}
            missed = {k: v for k, v in column.items() if k != organ}
            if not (overlap or extra or missed):
                continue
            rows.append([organ, f"{overlap:.1f}", f"{sum(extra.values()):.1f}", _largest(extra),
                         f"{sum(missed.values()):.1f}", _largest(missed)])
        title = f" ({name})" if len(methods) > 1 else ""
        parts.append(f"### Where the voxels go [ml]{title}\n\nSummed over the cases; `{OTHER}` is background "
                     "or a structure the label set does not name. Every entry: confusion.csv.\n\n"
                     + markdown_table(["Organ", "Overlap", "Predicted outside it", "lying in",
                                       "Missed", "labelled as"], rows))
    return "\n".join(parts)


def confusion_csv(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """Long CSV: method, case, predicted, reference, ml (non-zero entries)."""
    return rows_csv(["method", "case", "predicted", "reference", "ml"],
                    ([m, case, pred, ref, repr(float(ml))] for m, cases in methods.items()
                     for case, c in cases.items() for pred, row in (c.get("confusion_ml") or {}).items()
                     for ref, ml in row.items()))


def rows_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def difference_csv(diff: Mapping[str, Any]) -> str:
    return rows_csv(["organ", "n", *STAT_KEYS],
                    ([o, d["n"], *[d[k] for k in STAT_KEYS]] for o, d in diff.items()))


def compare_csv(result: Mapping[str, Any]) -> str:
    keys = ["n", "mean_a", "mean_b", "median_diff", "statistic", "p_value", "significant",
            "better"]
    return rows_csv(["organ", *keys], ([o, *[r[k] for k in keys]] for o, r in result.items()))


def candidates_csv(mean: Mapping[str, Any]) -> str:
    rows = []
    for organ, e in mean.items():
        for i, r in enumerate(e["radii"]):
            rows.append([organ, r, e["recall"][i], e["fpr"][i], e["fdr"][i],
                         e["c2_fraction"][i]])
    return rows_csv(["organ", "radius", "recall", "fpr", "fdr", "c2_fraction"], rows)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, paths to str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(_clean(obj), indent=1) + "\n")


def _header(kind: str, labels: LabelSet, **extra: Any) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "labels": labels.to_json(),
            "definitions": DEFINITIONS, **extra}


def _finish_report(report_dir: Path, markdown_name: str, doc: dict[str, Any], md: list[str], files: list[str],
                   make: Callable[[Any], list[str]] | None) -> dict[str, Any]:
    """Draw the plots (if asked and possible), then write the Markdown and metrics.json."""
    if make is not None:
        written, warn = _plots(report_dir, make)
        files += written
        if warn:
            doc.setdefault("warnings", []).append(warn)  # beside the caller's own warnings
        md += [f"![{f}]({f})\n" for f in written]
    doc["files"] = files
    atomic_write(report_dir / markdown_name, "\n".join(md))
    write_json(report_dir / "metrics.json", doc)
    return doc


def _plots(report_dir: Path, make: Callable[[Any], list[str]]) -> tuple[list[str], str | None]:
    """Run plotting code when matplotlib is installed; (written files, warning)."""
    try:
        from .. import report_plots
        report_plots.require_matplotlib()
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install cascadeseg[eval])"
    return make(report_plots), None


def organ_colors(labels: LabelSet) -> dict[str, tuple[float, float, float]]:
    return {lab.name: lab.color_float for lab in labels}


def write_evaluation_report(report_dir: str | os.PathLike, methods: Mapping[str, Any],
                            labels: LabelSet, *, kind: str = "evaluation",
                            extra: Mapping[str, Any] | None = None,
                            extra_markdown: str = "",
                            plots: bool = True) -> dict[str, Any]:
    """metrics.json, summary.md/.csv, per_case.csv and box plots for one or more methods.

    `methods`: name -> cases (from `evaluate_pairs`). Returns the metrics.json object.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(cases) for name, cases in methods.items()}
    doc = _header(kind, labels, **(extra or {}))
    doc["methods"] = {name: {"cases": cases, "summary": summaries[name]}
                      for name, cases in methods.items()}
    md = [f"# CascadeSeg {kind} report\n",
          f"Cases: {', '.join(f'{n}: {len(c)}' for n, c in methods.items())}. "
          "Dice in percent; distances in mm; volumes in ml. Definitions in metrics.json.\n"]
    for metric in TABLE_METRICS:
        md.append(stats_markdown(summaries, metric))
    missing = [(n, case, organ, m["status"]) for n, cases in methods.items()
               for case, c in cases.items() for organ, m in c["organs"].items()
               if m.get("status") in ("missing_in_prediction", "missing_in_reference")]
    if missing:
        md.append("### Missing organs\n\n" + markdown_table(
            ["Method", "Case", "Organ", "Status"], [list(r) for r in missing]))
    resampled = [case for cases in methods.values() for case, c in cases.items()
                 if c.get("resampled")]
    if resampled:
        md.append("Resampled onto the reference grid (nearest neighbour): "
                  + ", ".join(sorted(set(resampled))) + "\n")
    organs = [lab.name for lab in labels]
    where = confusion_markdown(methods, organs)
    if where:
        md.append(where)
    if extra_markdown:
        md.append(extra_markdown)
    files = ["metrics.json", "summary.md", "summary.csv", "per_case.csv"]
    atomic_write(report_dir / "summary.csv", summary_csv(summaries))
    atomic_write(report_dir / "per_case.csv", per_case_csv(methods))
    if where:
        atomic_write(report_dir / "confusion.csv", confusion_csv(methods))
        files.append("confusion.csv")
    colors = organ_colors(labels)

    def make(rp: Any) -> list[str]:
        out = []
        for metric in ("dice", "hd95_mm", "assd_mm"):
            data = {name: {o: [v for v in values(cases, o, metric).values() if v is not None]
                           for o in organ_names(cases)} for name, cases in methods.items()}
            if not any(v for d in data.values() for v in d.values()):
                continue
            scale = 100.0 if metric == "dice" else 1.0
            data = {n: {o: [scale * x for x in v] for o, v in d.items()}
                    for n, d in data.items()}
            fname = f"boxplot_{metric.replace('_mm', '')}.png"
            rp.boxplot_by_organ(data, report_dir / fname, ylabel=METRIC_TITLES[metric],
                                title=f"{METRIC_TITLES[metric]} per organ", colors=colors)
            out.append(fname)
        vol = {name: [(o, c["organs"][o]["ref_ml"], c["organs"][o]["pred_ml"])
                      for c in cases.values() for o in c["organs"]]
               for name, cases in methods.items()}
        rp.volume_scatter(vol, report_dir / "volumes.png", colors=colors)
        out.append("volumes.png")
        return out

    return _finish_report(report_dir, "summary.md", doc, md, files, make if plots else None)


def load_method(spec: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(method name, cases) from `metrics.json`, a report folder, or `PATH#METHOD`."""
    text = str(spec)
    method = None
    if "#" in text and not Path(text).exists():
        text, method = text.rsplit("#", 1)
    path = Path(text)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise UserError(f"no metrics.json at {text}; run `cascadeseg evaluate` first or pass "
                        "--ref to evaluate prediction folders")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        methods = doc["methods"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a CascadeSeg metrics.json") from None
    if method is None:
        if len(methods) != 1:
            raise UserError(f"{path} holds methods {', '.join(methods)}; choose one with "
                            f"{path}#<method>")
        method = next(iter(methods))
    if method not in methods:
        raise UserError(f"{path} has no method {method!r} (it has {', '.join(methods)})")
    return method, methods[method]["cases"]


def write_comparison_report(report_dir: str | os.PathLike, a: tuple[str, Mapping[str, Any]],
                            b: tuple[str, Mapping[str, Any]], labels: LabelSet | None = None,
                            metric: str = "dice", alpha: float = 0.05,
                            kind: str = "comparison", extra: Mapping[str, Any] | None = None,
                            extra_markdown: str = "", plots: bool = True,
                            extra_plots: Callable[[Any], list[str]] | None = None
                            ) -> dict[str, Any]:
    """Wilcoxon table (Table 4), differences (Table 3) and paired box plots for A vs B."""
    report_dir = Path(report_dir)
    (na, ca), (nb, cb) = a, b
    if na == nb:
        na, nb = f"A:{na}", f"B:{nb}"
    organs = [o for o in organ_names(ca) if o in organ_names(cb)]
    if labels is None:
        labels = LabelSet.from_json([{"value": i + 1, "name": o} for i, o in enumerate(organs)])
    result = compare_methods(ca, cb, metric, alpha)
    diff = difference_table(ca, cb, metric)
    doc = _header(kind, labels, metric=metric, alpha=alpha, method_a=na, method_b=nb,
                  test="scipy.stats.wilcoxon two-sided, zero_method='wilcox'",
                  **(extra or {}))
    doc["wilcoxon"] = result
    doc["difference"] = diff
    doc["methods"] = {na: {"cases": ca, "summary": summarize(ca)},
                      nb: {"cases": cb, "summary": summarize(cb)}}
    md = [f"# CascadeSeg {kind}: {na} vs {nb}\n",
          compare_markdown(result, metric, na, nb, alpha),
          difference_markdown(diff, metric, na, nb),
          stats_markdown({na: doc["methods"][na]["summary"],
                          nb: doc["methods"][nb]["summary"]}, metric)]
    if extra_markdown:
        md.append(extra_markdown)
    atomic_write(report_dir / "compare.csv", compare_csv(result))
    atomic_write(report_dir / "difference.csv", difference_csv(diff))
    atomic_write(report_dir / "per_case.csv", per_case_csv({na: ca, nb: cb}))
    files = ["metrics.json", "compare.md", "compare.csv", "difference.csv", "per_case.csv"]

    def make(rp: Any) -> list[str]:
        scale = 100.0 if metric == "dice" else 1.0
        data = {n: {o: [scale * v for v in values(c, o, metric).values() if v is not None]
                    for o in organs} for n, c in ((na, ca), (nb, cb))}
        marks = {o: result[o]["mark"] for o in organs}
        fname = f"boxplot_{metric.replace('_mm', '')}.png"
        rp.boxplot_by_organ(data, report_dir / fname, ylabel=METRIC_TITLES.get(metric, metric),
                            title=f"{na} vs {nb} (* p < {alpha:g}, Wilcoxon)", marks=marks)
        return [fname] + (extra_plots(rp) if extra_plots else [])

    return _finish_report(report_dir, "compare.md", doc, md, files, make if plots else None)


def write_candidates_report(report_dir: str | os.PathLike, result: Mapping[str, Any],
                            labels: LabelSet, mark_radius: int | None = 3,
                            extra: Mapping[str, Any] | None = None,
                            plots: bool = True) -> dict[str, Any]:
    """Fig. 6: candidates.json-style metrics.json, tables and recall/FPR curves."""
    report_dir = Path(report_dir)
    doc = _header("candidates", labels, **(extra or {}))
    doc.update(result)
    md = ["# CascadeSeg candidate-region analysis (C2 vs dilation radius)\n",
          f"Cases: {len(result['cases'])}. Mean over cases.\n",
          candidates_markdown(result["mean"])]
    atomic_write(report_dir / "candidates.csv", candidates_csv(result["mean"]))
    files = ["metrics.json", "candidates.md", "candidates.csv"]
    colors = organ_colors(labels)

    def make(rp: Any) -> list[str]:
        rp.candidate_curves(result["mean"], report_dir / "candidates.png", colors=colors,
                            mark_radius=mark_radius)
        return ["candidates.png"]

    return _finish_report(report_dir, "candidates.md", doc, md, files, make if plots else None)
