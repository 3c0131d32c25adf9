"""Rebuild the digits world's shipped adapters with one command:

    python -m hypersd_core chain --stages lcm,tcd,k8,k4,k2,k1,feedback,dmd

Each stage is an ordinary run (runs/chain/<stage>/); TSCD k = 4, 2, 1 start from the
previous stage's final adapter, feedback and DMD (rank 16, its own rewards) from k = 1. Finished
adapters are exported to assets/digits/adapters/<name>/ with their config, metrics
and last sample grid; the stage times go to assets/digits/adapters/stage_times.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hypersd_core.models.lora import WEIGHT_NAME
from hypersd_core.paths import DIGITS_ADAPTERS
from hypersd_core.training.config import load_preset
from hypersd_core.training.export import export_adapter
from hypersd_core.training.runs import Run

PRESETS = {"lcm": "digits-lcm", "tcd": "digits-tcd", "k8": "digits-tscd-k8",
           "k4": "digits-tscd-k4", "k2": "digits-tscd-k2", "k1": "digits-tscd-k1",
           "feedback": "digits-feedback", "dmd": "digits-dmd"}
EXPORT_NAMES = {"lcm": "lcm", "tcd": "tcd", "k8": "hypersd-k8", "k4": "hypersd-k4",
                "k2": "hypersd-k2", "k1": "hypersd-k1", "feedback": "hypersd-k1-feedback",
                "dmd": "hypersd-unified"}
PREVIOUS = {"k4": "k8", "k2": "k4", "k1": "k2", "feedback": "k1", "dmd": "k1"}


def build_digits_chain(stages: list[str], runs_root: str | Path = "runs/chain",
                       export: bool = True, overrides: list[str] | None = None) -> dict:
    """Train ``stages`` in order (in this process) and export them; return stage times (s)."""
    from hypersd_core.training.trainer import train

    unknown = [s for s in stages if s not in PRESETS]
    if unknown:
        raise ValueError(f"unknown chain stages {unknown}; choose from {list(PRESETS)}")
    runs_root = Path(runs_root)
    finals: dict[str, Path] = {}
    times_path = DIGITS_ADAPTERS / "stage_times.json"
    times: dict = {}
    for stage in stages:
        cfg_overrides = list(overrides or [])
        if stage in PREVIOUS:
            prev = PREVIOUS[stage]
            init = finals.get(prev) or DIGITS_ADAPTERS / EXPORT_NAMES[prev] / WEIGHT_NAME
            if not Path(init).is_file():
                raise FileNotFoundError(f"stage {stage} starts from {prev}'s adapter, missing at {init}")
            cfg_overrides.append(f"init_adapter={init}")
        cfg = load_preset(PRESETS[stage], cfg_overrides)
        run_dir = runs_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{stage}"
        run = Run.create(run_dir, cfg)
        t0 = time.perf_counter()
        status = train(run.dir)
        seconds = time.perf_counter() - t0
        if status.get("state") != "done":
            raise RuntimeError(f"stage {stage} ended {status.get('state')}: {status.get('error')}")
        finals[stage] = run.final_dir / WEIGHT_NAME
        # re-read: another chain may have finished a stage meanwhile
        times = json.loads(times_path.read_text()) if times_path.is_file() else {}
        times[EXPORT_NAMES[stage]] = {"seconds": round(seconds, 1), "steps": cfg.steps,
                                      "batch_size": cfg.batch_size, "run": str(run.dir)}
        print(f"stage {stage}: {seconds:.0f} s ({cfg.steps} steps)")
        if export:
            export_adapter(run, EXPORT_NAMES[stage], DIGITS_ADAPTERS)
            DIGITS_ADAPTERS.mkdir(parents=True, exist_ok=True)
            times_path.write_text(json.dumps(times, indent=1))
    return times
