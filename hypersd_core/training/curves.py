"""Training curves for the monitor: one metric of several runs, and optional smoothing."""

from __future__ import annotations

from hypersd_core.training.runs import Run


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's start-up correction:
    s_t = w s_{t-1} + (1 - w) v_t, divided by 1 - w^t so the first points are not pulled
    towards 0. ``weight`` in [0, 1); 0 returns the values unchanged."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, last = [], 0.0
    for t, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight ** t) if weight else v)
    return out


def run_series(run: Run, key: str = "loss") -> list[tuple[float, float]]:
    """(step, value) of ``key`` in a run's metrics.jsonl (records without it skipped)."""
    records, _ = run.read_metrics()
    return [(float(r["step"]), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            and isinstance(r.get("step"), (int, float))]


def overlay(runs: list[Run], key: str = "loss",
            weight: float = 0.0) -> dict[str, list[tuple[float, float]]]:
    """run name -> (step, smoothed value): one metric of several runs, for one plot."""
    out = {}
    for run in runs:
        points = run_series(run, key)
        if points:
            steps, values = zip(*points)
            out[run.dir.name] = list(zip(steps, smooth(list(values), weight)))
    return out
