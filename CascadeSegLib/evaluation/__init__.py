"""Evaluation as in Roth et al. 2018 (docs/method.md section 7): the numbers behind the paper's tables.

Per case and organ: Dice, 95th-percentile Hausdorff distance (HD95), average symmetric
surface distance (ASSD) in mm, and reference/predicted volumes in ml; per case, where the
voxels go (`confusion_ml`: each predicted class's ml in each reference class). Over cases: mean, std,
median, min, max per organ and method (Tables 1-2), paired differences (Table 3), the Wilcoxon
signed-rank test between two methods (Table 4), and the recall/false-positive rate of the
stage-2 candidate region C2 as a function of the dilation radius (Fig. 6).

Definitions (also written into every metrics.json so a report explains itself):
- Surfaces are the object voxels with a background face neighbour (SimpleITK `LabelContour`,
  not fully connected); the distance from a surface voxel of A to B is the distance (mm) to
  the nearest surface voxel of B, from SimpleITK's Maurer distance map of B's surface. HD95
  is the 95th percentile and ASSD the mean of the pooled distances of both directions
  (Heimann et al. 2009); HD is their maximum.
- An organ missing from the prediction but present in the reference has Dice 0 and no
  distances; one missing from the reference but predicted has Dice 0; one absent from both
  has no values. Dice zeros count in the statistics, missing distances do not.
- Standard deviations are sample standard deviations (ddof=1; 0 for a single case).
- C2 analysis: C2_k(r) = stage-1 organ k dilated with a ball of radius r voxels (|offset| <= r,
  the engine's ball); recall = |C2_k & R_k| / |R_k|, FPR = |C2_k \\ R_k| / |not R_k| over the
  image, FDR = |C2_k \\ R_k| / |C2_k|. "all" is the engine's C2 (all stage-1 foreground)
  against the reference foreground of all listed organs.


Modules: `images` (label sets, reading, grids), `metrics` (Dice, distances, one organ and one
case), `cases` (matching files to cases), `statistics`, `candidates` (C2 curves), `reports`
(Markdown, CSV, metrics.json, where the voxels go) and `experiments` (stage 1 vs 2, overlap).
"""

from ..atomic import atomic_write
from .candidates import DEFAULT_RADII, candidate_curves, candidate_pairs, mean_curves, spacing_grid
from .cases import case_key, evaluate_pairs, list_cases, match_cases, match_ct_cases, progress_iter
from .experiments import run_overlap_experiment, run_stages_experiment
from .images import as_label_map, read_label_map, resolve_labels, same_grid, to_reference_grid
from .metrics import (
    DEFINITIONS,
    METRIC_TITLES,
    METRICS,
    OTHER,
    TABLE_METRICS,
    confusion_ml,
    count,
    dice,
    dice_from_counts,
    evaluate_images,
    label_boxes,
    organ_metrics,
    surface_distances,
    union_box,
)
from .reports import (
    FORMAT_VERSION,
    STAT_KEYS,
    candidates_csv,
    candidates_markdown,
    compare_csv,
    compare_markdown,
    confusion_csv,
    confusion_markdown,
    difference_csv,
    difference_markdown,
    load_method,
    markdown_table,
    organ_colors,
    per_case_csv,
    pooled_confusion,
    rows_csv,
    stats_markdown,
    summary_csv,
    write_candidates_report,
    write_comparison_report,
    write_evaluation_report,
    write_json,
)
from .statistics import (
    compare_methods,
    describe,
    difference_table,
    organ_names,
    paired,
    summarize,
    values,
    wilcoxon_test,
)

__all__ = [
    "atomic_write",
    "resolve_labels",
    "read_label_map",
    "as_label_map",
    "same_grid",
    "to_reference_grid",
    "count",
    "dice_from_counts",
    "dice",
    "METRICS",
    "TABLE_METRICS",
    "METRIC_TITLES",
    "DEFINITIONS",
    "OTHER",
    "confusion_ml",
    "label_boxes",
    "union_box",
    "surface_distances",
    "organ_metrics",
    "evaluate_images",
    "case_key",
    "list_cases",
    "match_cases",
    "progress_iter",
    "evaluate_pairs",
    "match_ct_cases",
    "describe",
    "organ_names",
    "values",
    "summarize",
    "paired",
    "difference_table",
    "wilcoxon_test",
    "compare_methods",
    "DEFAULT_RADII",
    "spacing_grid",
    "candidate_curves",
    "candidate_pairs",
    "mean_curves",
    "FORMAT_VERSION",
    "markdown_table",
    "STAT_KEYS",
    "stats_markdown",
    "difference_markdown",
    "compare_markdown",
    "candidates_markdown",
    "per_case_csv",
    "summary_csv",
    "rows_csv",
    "difference_csv",
    "compare_csv",
    "candidates_csv",
    "pooled_confusion",
    "confusion_markdown",
    "confusion_csv",
    "write_json",
    "organ_colors",
    "write_evaluation_report",
    "load_method",
    "write_comparison_report",
    "write_candidates_report",
    "run_stages_experiment",
    "run_overlap_experiment",
]
