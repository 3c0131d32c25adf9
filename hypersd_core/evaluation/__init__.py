"""Evaluation beyond the digits world: the paper's metrics for real models, and the report
that writes the results blocks of the docs from assets/results. It imports no world's
experiments (``digits/``, ``scenes/`` import it, never the other way)."""
