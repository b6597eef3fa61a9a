"""Statistics over cases (Roth et al. 2018 Tables 1-4): summaries, paired differences, Wilcoxon tests."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .metrics import METRICS


def describe(values: Iterable[float | None]) -> dict[str, Any]:
    """n, mean, std (ddof=1), median, min, max of the non-missing values."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def organ_names(cases: Mapping[str, Any]) -> list[str]:
    """Organs in first-seen order over the cases."""
    names: list[str] = []
    for c in cases.values():
        for n in c["organs"]:
            if n not in names:
                names.append(n)
    return names


def values(cases: Mapping[str, Any], organ: str, metric: str) -> dict[str, float | None]:
    """case -> value of `metric` for `organ` (None where missing)."""
    return {case: c["organs"].get(organ, {}).get(metric) for case, c in cases.items()}


def summarize(cases: Mapping[str, Any], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """{organ: {metric: describe(...), "status": {status: count}}}, plus "all" (pooled)."""
    out: dict[str, Any] = {}
    organs = organ_names(cases)
    for organ in organs:
        entry: dict[str, Any] = {m: describe(values(cases, organ, m).values()) for m in metrics}
        status: dict[str, int] = {}
        for c in cases.values():
            s = c["organs"].get(organ, {}).get("status")
            if s:
                status[s] = status.get(s, 0) + 1
        entry["status"] = status
        out[organ] = entry
    out["all"] = {m: describe(v for o in organs for v in values(cases, o, m).values())
                  for m in metrics}
    return out


def paired(a: Mapping[str, Any], b: Mapping[str, Any], organ: str,
           metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Cases where both methods have a value for `organ`; (cases, values A, values B)."""
    va, vb = values(a, organ, metric), values(b, organ, metric)
    cases = [c for c in va if c in vb and va[c] is not None and vb[c] is not None]
    return (cases, np.asarray([va[c] for c in cases], np.float64),
            np.asarray([vb[c] for c in cases], np.float64))


def difference_table(a: Mapping[str, Any], b: Mapping[str, Any],
                     metric: str = "dice") -> dict[str, Any]:
    """Per organ statistics of the paired differences B - A (e.g. stage 2 - stage 1)."""
    organs = [o for o in organ_names(a) if o in organ_names(b)]
    diffs = {}
    for o in organs:
        _, xa, xb = paired(a, b, o, metric)
        diffs[o] = (xb - xa).tolist()
    out = {o: describe(d) for o, d in diffs.items()}
    out["all"] = describe(v for d in diffs.values() for v in d)
    return out


def wilcoxon_test(xs: npt.ArrayLike, ys: npt.ArrayLike) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired samples (scipy defaults)."""
    from scipy.stats import wilcoxon
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if x.size == 0:
        return {"n": 0, "statistic": None, "p_value": None, "note": "no paired cases"}
    if np.all(x == y):
        return {"n": int(x.size), "statistic": 0.0, "p_value": 1.0,
                "note": "all differences are zero"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = wilcoxon(x, y)
    p = float(res.pvalue)
    return {"n": int(x.size), "statistic": float(res.statistic),
            "p_value": None if math.isnan(p) else p}


def compare_methods(a: Mapping[str, Any], b: Mapping[str, Any], metric: str = "dice",
                    alpha: float = 0.05) -> dict[str, Any]:
    """Per organ: means, paired difference and Wilcoxon p-value of B vs A (paper Table 4)."""
    out: dict[str, Any] = {}
    organs = [o for o in organ_names(a) if o in organ_names(b)]
    for organ in organs + ["all"]:
        if organ == "all":
            xa = np.concatenate([paired(a, b, o, metric)[1] for o in organs] or [np.zeros(0)])
            xb = np.concatenate([paired(a, b, o, metric)[2] for o in organs] or [np.zeros(0)])
        else:
            _, xa, xb = paired(a, b, organ, metric)
        test = wilcoxon_test(xa, xb)
        p = test["p_value"]
        sig = p is not None and p < alpha
        better = None
        if sig:
            from scipy.stats import rankdata

            higher_is_better = metric == "dice"
            # The test ranks only the nonzero differences (scipy's default zero_method), so the
            # winner is the side of the larger signed-rank sum, never "none" when it is significant.
            diff = (xb - xa)[(xb - xa) != 0]
            ranks = rankdata(np.abs(diff))
            d = float(ranks[diff > 0].sum() - ranks[diff < 0].sum())
            better = ("B" if (d > 0) == higher_is_better else "A") if d != 0 else None
        out[organ] = {**test, "mean_a": float(xa.mean()) if xa.size else None,
                      "mean_b": float(xb.mean()) if xb.size else None,
                      "median_diff": float(np.median(xb - xa)) if xa.size else None,
                      "significant": bool(sig), "mark": "*" if sig else "",
                      "better": better}
    return out
