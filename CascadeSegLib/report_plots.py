"""PNG plots of evaluation reports (paper Fig. 5 box plots, Fig. 6 candidate-region curves).

matplotlib is optional (the `eval` extra) and imported only here, lazily. We draw on a bare
`Figure` with the Agg canvas instead of pyplot, so no global backend is switched: the same
code runs headless, in CI and inside 3D Slicer's Python without touching its GUI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_path

Color = tuple[float, float, float]
_METHOD_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def require_matplotlib() -> None:
    """Raise ImportError when matplotlib is missing (callers then skip plotting)."""
    import matplotlib  # noqa: F401


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Save atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def boxplot_by_organ(data: Mapping[str, Mapping[str, Sequence[float]]],
                     path: str | os.PathLike, ylabel: str = "Dice [%]", title: str = "",
                     colors: Mapping[str, Color] | None = None,
                     marks: Mapping[str, str] | None = None) -> Path:
    """Box plots per organ, one box per method side by side (paper Fig. 5).

    `data`: method -> organ -> values. With one method the boxes take the organ colours;
    `marks` (organ -> "*") are written above significant organs.
    """
    methods = list(data)
    organs: list[str] = []
    for d in data.values():
        organs += [o for o in d if o not in organs]
    n_m = max(1, len(methods))
    fig, (ax,) = _figure(max(6.0, 0.9 * len(organs) * max(1, n_m * 0.7) + 2), 4.8)
    width = 0.8 / n_m
    handles = []
    top = 0.0
    for j, method in enumerate(methods):
        vals = [list(data[method].get(o, [])) for o in organs]
        pos = [i + (j - (n_m - 1) / 2) * width for i in range(len(organs))]
        keep = [k for k, v in enumerate(vals) if v]
        if not keep:
            continue
        bp = ax.boxplot([vals[k] for k in keep], positions=[pos[k] for k in keep],
                        widths=width * 0.85, patch_artist=True, showmeans=True,
                        medianprops={"color": "black"},
                        meanprops={"marker": "^", "markerfacecolor": "white",
                                   "markeredgecolor": "black", "markersize": 5})
        for k, box in zip(keep, bp["boxes"]):
            if n_m == 1 and colors and organs[k] in colors:
                box.set_facecolor(colors[organs[k]])
            else:
                box.set_facecolor(_METHOD_COLORS[j % len(_METHOD_COLORS)])
            box.set_alpha(0.85)
        handles.append((bp["boxes"][0], method))
        top = max(top, max(max(v) for v in vals if v))
    if marks:
        for i, o in enumerate(organs):
            if marks.get(o):
                ax.text(i, top * 1.02 + 0.5, marks[o], ha="center", va="bottom", fontsize=14)
    ax.set_xticks(range(len(organs)))
    ax.set_xticklabels([o.replace("_", " ") for o in organs], rotation=35, ha="right")
    ax.set_xlim(-0.6, len(organs) - 0.4)
    ax.set_ylabel(ylabel)
    if "Dice" in ylabel:
        ax.set_ylim(0, 105 if not marks else 110)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    if n_m > 1:
        ax.legend([h for h, _ in handles], [m for _, m in handles], loc="lower left")
    return _save(fig, path)


def candidate_curves(mean: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                     colors: Mapping[str, Color] | None = None,
                     mark_radius: int | None = 3) -> Path:
    """Recall and false-positive rate of C2 vs dilation radius, one line per organ (Fig. 6)."""
    fig, (ax_r, ax_f) = _figure(11.0, 4.6, ncols=2)
    for organ, e in mean.items():
        radii = e["radii"]
        is_all = organ == "all"
        style = {"color": "black", "linewidth": 2.5, "linestyle": "--"} if is_all else \
            {"color": (colors or {}).get(organ), "linewidth": 1.4}
        label = "all organs (C2)" if is_all else organ.replace("_", " ")
        for ax, key in ((ax_r, "recall"), (ax_f, "fpr")):
            pts = [(r, 100 * v) for r, v in zip(radii, e[key]) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                        label=label, **style)
    ax_r.set_ylabel("Recall (sensitivity) [%]")
    ax_f.set_ylabel("False-positive rate [%]")
    for ax, title in ((ax_r, "Recall of C2"), (ax_f, "FPR of C2")):
        ax.set_xlabel("Dilation radius r [voxels]")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if mark_radius is not None:
            ax.axvline(mark_radius, color="grey", linestyle=":", linewidth=1.2)
    ax_r.set_ylim(top=101)
    ax_f.set_ylim(bottom=0)
    ax_f.legend(fontsize=7, loc="upper left", ncol=1)
    return _save(fig, path)


def volume_scatter(data: Mapping[str, Sequence[tuple[str, float, float]]],
                   path: str | os.PathLike, colors: Mapping[str, Color] | None = None) -> Path:
    """Predicted vs reference volume per case and organ, with the identity line."""
    fig, (ax,) = _figure(5.5, 5.0)
    markers = "os^Dv<>"
    hi = 1.0
    seen: set[str] = set()
    for j, pts in enumerate(data.values()):
        for organ, ref_ml, pred_ml in pts:
            label = None
            if organ not in seen:
                seen.add(organ)
                label = organ.replace("_", " ")
            ax.scatter([ref_ml], [pred_ml], s=22, marker=markers[j % len(markers)],
                       color=(colors or {}).get(organ), label=label, alpha=0.85,
                       edgecolors="black", linewidths=0.3)
            hi = max(hi, ref_ml, pred_ml)
    ax.plot([0, hi * 1.05], [0, hi * 1.05], color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, hi * 1.05)
    ax.set_ylim(0, hi * 1.05)
    ax.set_xlabel("Reference volume [ml]")
    ax.set_ylabel("Predicted volume [ml]")
    title = "Organ volumes"
    if len(data) > 1:
        title += " (" + ", ".join(f"{markers[j % len(markers)]}: {m}"
                                  for j, m in enumerate(data)) + ")"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def bar_chart(groups: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
              ylabel: str, title: str = "") -> Path:
    """Grouped bars: method -> category -> value (e.g. seconds per stage)."""
    methods = list(groups)
    cats: list[str] = []
    for g in groups.values():
        cats += [c for c in g if c not in cats]
    fig, (ax,) = _figure(max(5.0, 1.2 * len(cats) + 2), 4.0)
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(cats))]
        ax.bar(xs, [groups[m].get(c, 0.0) for c in cats], width=width * 0.9, label=m,
               color=_METHOD_COLORS[j % len(_METHOD_COLORS)])
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)
