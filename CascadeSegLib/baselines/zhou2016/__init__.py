"""Zhou et al.: the 2D three-view FCN baseline (`three_view`, trained by `three_view_train`)
and iterative refinement of organ segmentations (`refine`)."""
