"""Benchmarks: shared measuring helpers (``measure``), sampling and training benchmarks, the
GPU check, the report, and the ``bench`` entry point (``run``) on top."""
