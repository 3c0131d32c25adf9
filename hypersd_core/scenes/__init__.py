"""Experiments on the scenes world: its build, evaluation nets and the GenEval-style
evaluation. The world's data, captions and ground truth live in ``hypersd_core.worlds.scenes``."""
