"""The comparison protocol as one dependency graph of runs (README "How the comparison
is run"): the TSCD chain k8 -> k4 -> k2 -> k1 (-> feedback), DMD2 from the direct k=1,
the LCM and TCD baselines with as many training samples as the whole chain, the ablations and the
learning-rate search, trained ``--jobs`` runs at a time (one process each):

    python -m hypersd_core.protocol train --world digits --root runs/protocol --jobs 2
    python -m hypersd_core.digits.protocol --root runs/protocol --jobs 2   # the same

This module is the digits world's part of the protocol (``WORLD``: its runs, shipped
runs, evaluation and report); the runner, budgets and statistics are world-agnostic
(``hypersd_core/protocol/``). Every run is an ordinary run folder (``train --resume``
works on it); a run starts from its parent's final adapter. ``protocol.json`` in the
root records each run's steps, batch, LoRA rank, training samples and forward-
equivalents per sample (including its parents'), state and seconds. ``--steps-scale``
shrinks every run uniformly (a dry run: 0.01).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypersd_core.protocol import runner
from hypersd_core.protocol.runner import WEIGHTS, RunSpec
from hypersd_core.protocol.world import World

__all__ = ["WEIGHTS", "RunSpec", "protocol_runs", "run_protocol", "pack", "ship", "WORLD"]
LR_POINTS = ("1.0e-4", "3e-4", "1.0e-3")  # the learning-rate search, per method
PRESET_LR = {"lcm": "3e-4", "tcd": "3e-4", "k8": "1.0e-3"}  # its choices, in the presets
SWEEP = {"lcm": "digits-lcm", "tcd": "digits-tcd", "k8": "digits-tscd-k8"}
SWEEP_STEPS = 600
BASELINE_BUDGET = ("steps=3300", "checkpoint_every=300", "keep_checkpoints=12")


def protocol_runs() -> list[RunSpec]:
    """Every run, in priority order (the chain that everything waits on first)."""
    runs = [
        RunSpec("k8", "digits-tscd-k8"),
        RunSpec("k4", "digits-tscd-k4", parent="k8"),
        RunSpec("k2", "digits-tscd-k2", parent="k4"),
        RunSpec("k1", "digits-tscd-k1", parent="k2"),
        RunSpec("k1-direct", "digits-tscd-k1", ("steps=2400", "checkpoint_every=600"),
                None, "ablation", "k=1 directly from the base, the whole chain's samples"),
        RunSpec("feedback", "digits-feedback", parent="k1"),
        # DMD2 (two time scales, GAN branch) from the better k=1 of the ablation (direct),
        # at rank 16 like every compared row; with the feedback rewards and without
        RunSpec("dmd", "digits-dmd", parent="k1-direct"),
        # the baselines trained to the unified adapter's count (k1-direct 76,800 + DMD
        # 28,800 = 105,600 samples), a checkpoint every 9,600: the report compares each
        # Hyper-SD row with the baselines' checkpoint at its own sample count
        RunSpec("lcm", "digits-lcm", BASELINE_BUDGET),
        RunSpec("tcd", "digits-tcd", BASELINE_BUDGET),
        # ablations, each with the budget of the run it replaces
        RunSpec("dmd-nofb", "digits-dmd-nofb", (), "k1-direct", "ablation",
                "DMD2 reward-free (the dmd row without its feedback rewards)"),
        RunSpec("k2-advoff", "digits-tscd-k2", ("adv_weight=0.0",), "k4", "ablation",
                "adversarial term off"),
        RunSpec("k1-advoff", "digits-tscd-k1", ("adv_weight=0.0",), "k2-advoff", "ablation",
                "adversarial term off"),
        RunSpec("k2-advdata", "digits-tscd-k2", ("adv_real=data",), "k4", "ablation",
                "adversarial real = data (PCM: the re-noised consistency target)"),
        RunSpec("k1-advdata", "digits-tscd-k1", ("adv_real=data",), "k2-advdata", "ablation",
                "adversarial real = data (PCM: the re-noised consistency target)"),
        RunSpec("k8-edge", "digits-tscd-k8", ("loss_scale=none",), None, "ablation",
                "loss in edge space (no x0 normalisation)"),
        RunSpec("k8-huber", "digits-tscd-k8", ("distance=huber",), None,
                "ablation", "pseudo-Huber (PCM) on the x0-scaled loss"),
        RunSpec("k8-tuniform", "digits-tscd-k8", ("t_end=uniform",), None, "ablation",
                "the paper's t_end ~ U[t_b, t_{n-1}] (Algorithm 1) instead of the edge"),
        RunSpec("k8-perturb", "digits-tscd-k8", ("offset_noise=0.1",), None, "ablation",
                "the paper's noise perturbation (offset noise 0.1)"),
    ]
    # every point of the search at the same 600 steps, the presets' own point included (a
    # main run is longer, so its own weights would not be a fair point of the search)
    for lr in LR_POINTS:
        for name, preset in SWEEP.items():
            runs.append(RunSpec(f"{name}-lr{lr}", preset,
                                (f"lr={lr}", f"steps={SWEEP_STEPS}", "checkpoint_every=600"),
                                None, "lr-search", f"lr {lr}, {SWEEP_STEPS} steps"))
    return runs


PACKED_ADAPTERS = ("k8", "k4", "k2", "k1", "k1-direct", "feedback", "dmd", "dmd-nofb", "lcm",
                   "tcd", "k2-advdata", "k1-advdata")


def run_protocol(root: str | Path, *args, **kwargs) -> dict:
    """``protocol.runner.run_protocol`` over the digits runs (``protocol_runs()``)."""
    kwargs.setdefault("runs", protocol_runs())
    return runner.run_protocol(root, *args, **kwargs)


SHIPPED = ("k8", "k4", "k2", "k1", "feedback", "dmd", "lcm", "tcd")


def pack(root: str | Path, out: str | Path, adapters=PACKED_ADAPTERS) -> None:
    runner.pack_root(root, out, adapters)


def ship(root: str | Path, out_root: Path | None = None) -> dict:
    """The main runs' final adapters as the digits world's shipped adapters."""
    from hypersd_core.digits.chain import EXPORT_NAMES
    from hypersd_core.paths import DIGITS_ADAPTERS

    return runner.ship_runs(root, {n: EXPORT_NAMES[n] for n in SHIPPED},
                            out_root or DIGITS_ADAPTERS)


WORLD = World(name="digits", runs=protocol_runs, shipped=SHIPPED,
              eval_main="hypersd_core.digits.protocol_eval:main",
              report_main="hypersd_core.digits.protocol_report:main", ship=ship, pack=pack)


def main(argv: list[str] | None = None) -> int:
    """The digits protocol (same as ``python -m hypersd_core.protocol train --world digits``)."""
    from hypersd_core.protocol.runner import main as run_main

    return run_main(argv, WORLD)


if __name__ == "__main__":
    sys.exit(main())
