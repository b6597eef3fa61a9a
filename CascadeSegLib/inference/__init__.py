"""Inference: the input check, resampling and candidate masks, tiled prediction, memory
estimates, the cascade `Segmenter` and the `StagePredictor` registry every architecture runs
through."""
