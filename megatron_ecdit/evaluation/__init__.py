"""Scoring generated images: a GenEval-style detector and scorer for the synthetic shape domain
(geneval.py)."""
