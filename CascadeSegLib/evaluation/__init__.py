"""Evaluation as in Roth et al. 2018: metrics, case matching, statistics, candidate curves,
reports and the experiment runners behind `cascadeseg evaluate`."""
