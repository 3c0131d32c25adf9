"""Evaluation beyond the digits world: the paper's metrics for real models, reward evaluation
of adapters on held-out seeds, and the README results report."""
