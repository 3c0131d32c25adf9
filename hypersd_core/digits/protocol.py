"""The comparison protocol as one dependency graph of runs (README "How the comparison
is run"): the TSCD chain k8 -> k4 -> k2 -> k1 (-> feedback), DMD2 from the direct k=1,
the LCM and TCD baselines with as many training samples as the whole chain, the ablations and the
learning-rate search, trained ``--jobs`` runs at a time (one process each):

    python -m hypersd_core.digits.protocol --root runs/protocol --jobs 2

Every run is an ordinary run folder (``train --resume`` works on it); a run starts
from its parent's final adapter. ``protocol.json`` in the root records each run's
steps, batch, training samples (including its parents'), state and seconds.
``--steps-scale`` shrinks every run uniformly (a dry run: 0.01).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypersd_core.training.config import load_preset
from hypersd_core.training.runs import Run

WEIGHTS = "final/pytorch_lora_weights.safetensors"
LR_POINTS = ("1.0e-4", "3e-4", "1.0e-3")  # the learning-rate search, per method
PRESET_LR = {"lcm": "3e-4", "tcd": "3e-4", "k8": "1.0e-3"}  # its choices, in the presets
SWEEP = {"lcm": "digits-lcm", "tcd": "digits-tcd", "k8": "digits-tscd-k8"}
SWEEP_STEPS = 600


@dataclass(frozen=True)
class RunSpec:
    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    parent: str | None = None
    group: str = "main"  # main | ablation | lr-search
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False)


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
        RunSpec("lcm", "digits-lcm"),
        RunSpec("tcd", "digits-tcd"),
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
    for lr in LR_POINTS:
        for name, preset in SWEEP.items():
            if lr != PRESET_LR[name]:  # the preset's own point is the main run
                runs.append(RunSpec(f"{name}-lr{lr}", preset,
                                    (f"lr={lr}", f"steps={SWEEP_STEPS}", "checkpoint_every=600"),
                                    None, "lr-search", f"lr {lr}, {SWEEP_STEPS} steps"))
    return runs


def _scaled(overrides: list[str], cfg, scale: float) -> list[str]:
    if scale == 1.0:
        return overrides
    steps = max(2, round(cfg.steps * scale))
    every = max(1, round(cfg.checkpoint_every * scale))
    return overrides + [f"steps={steps}", f"checkpoint_every={every}", f"sample_every={steps}",
                        f"log_every={max(1, min(10, steps // 2))}"]


def run_protocol(root: str | Path, jobs: int = 2, only: list[str] | None = None,
                 steps_scale: float = 1.0, deadline_s: float | None = None,
                 stop_s: float | None = None, extra: list[str] | None = None,
                 log=print) -> dict:
    """Train the graph under ``root``; return (and write) protocol.json's record."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specs = [s for s in protocol_runs() if only is None or s.name in only]
    names = {s.name for s in specs}
    missing = sorted({s.parent for s in specs if s.parent and s.parent not in names})
    if missing:
        raise ValueError(f"runs {missing} are parents of selected runs; select them too")
    record: dict = {"runs": {}, "jobs": jobs, "steps_scale": steps_scale}
    state = {s.name: "waiting" for s in specs}
    procs: dict[str, tuple[subprocess.Popen, float]] = {}
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    def samples_of(name: str) -> int:
        r = record["runs"][name]
        return r["steps"] * r["batch_size"] + (samples_of(r["parent"]) if r["parent"] else 0)

    while any(v in ("waiting", "running") for v in state.values()):
        for name, (proc, started) in list(procs.items()):
            if proc.poll() is None:
                continue
            status = Run(root / name).status()
            ok = proc.returncode == 0 and status.get("state") == "done"
            state[name] = "done" if ok else "failed"
            record["runs"][name].update(state=state[name],
                                        seconds=round(time.perf_counter() - started, 1))
            log(f"[{time.perf_counter() - t0:6.0f}s] {name}: {state[name]}")
            del procs[name]
        elapsed = time.perf_counter() - t0
        late = deadline_s is not None and elapsed > deadline_s
        if stop_s is not None and elapsed > stop_s:
            for name, (proc, _) in procs.items():  # the trainer checkpoints and stops
                if proc.poll() is None and not record["runs"][name].get("stop_sent"):
                    proc.send_signal(signal.SIGINT)
                    record["runs"][name]["stop_sent"] = True
        for spec in specs:
            if state[spec.name] != "waiting" or len(procs) >= jobs:
                continue
            if spec.parent and state[spec.parent] == "failed" or late:
                state[spec.name] = "skipped"
                continue
            if spec.parent and state[spec.parent] != "done":
                continue
            overrides = list(extra or []) + list(spec.overrides)
            if spec.parent:
                overrides.append(f"init_adapter={root / spec.parent / WEIGHTS}")
            cfg = load_preset(spec.preset, overrides)
            cfg = load_preset(spec.preset, _scaled(overrides, cfg, steps_scale))
            Run.create(root / spec.name, cfg)
            record["runs"][spec.name] = {
                "preset": spec.preset, "overrides": list(spec.overrides), "parent": spec.parent,
                "group": spec.group, "note": spec.note, "steps": cfg.steps,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "state": "running"}
            record["runs"][spec.name]["samples"] = samples_of(spec.name)
            out = open(root / f"{spec.name}.log", "w")
            proc = subprocess.Popen([sys.executable, "-m", "hypersd_core.training.trainer",
                                     "--run", str(root / spec.name)], stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
            procs[spec.name] = (proc, time.perf_counter())
            state[spec.name] = "running"
            log(f"[{time.perf_counter() - t0:6.0f}s] {spec.name}: started ({cfg.steps} steps)")
        for name, s in state.items():
            if s == "skipped" and name not in record["runs"]:
                record["runs"][name] = {"state": "skipped"}
        (root / "protocol.json").write_text(json.dumps(record, indent=1))
        time.sleep(1.0)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    (root / "protocol.json").write_text(json.dumps(record, indent=1))
    return record


PACKED_ADAPTERS = ("k8", "k4", "k2", "k1", "k1-direct", "feedback", "dmd", "dmd-nofb", "lcm",
                   "tcd", "k2-advdata", "k1-advdata")


def pack(root: str | Path, out: str | Path, adapters=PACKED_ADAPTERS) -> None:
    """A tar.gz of every run's config, metrics, status, log and last sample grid, and
    the fp16 final adapters of ``adapters`` (small enough to carry and ship)."""
    import io
    import tarfile

    import torch
    from safetensors.torch import load_file, save
    root = Path(root)
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(root.glob("*.json")) + sorted(root.glob("*.log")):
            tar.add(f, f.name)
        for run in sorted(p for p in root.iterdir() if p.is_dir()):
            for name in ("config.yaml", "metrics.jsonl", "status.json"):
                if (run / name).is_file():
                    tar.add(run / name, f"{run.name}/{name}")
            grids = sorted((run / "samples").glob("*.png"))
            if grids:
                tar.add(grids[-1], f"{run.name}/samples.png")
            weights = run / WEIGHTS
            if run.name in adapters and weights.is_file():
                data = save({k: v.to(torch.float16).contiguous()
                             for k, v in load_file(str(weights)).items()})
                info = tarfile.TarInfo(f"{run.name}/pytorch_lora_weights.safetensors")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


SHIPPED = ("k8", "k4", "k2", "k1", "feedback", "dmd", "lcm", "tcd")


def ship(root: str | Path, out_root: Path | None = None) -> dict:
    """Export the main runs' final adapters (fp16, with config, metrics.jsonl and last
    sample grid) as the digits world's shipped adapters, and their budgets and seconds
    to stage_times.json. Every main run must be done: a partial chain is not shipped."""
    from hypersd_core.digits.chain import EXPORT_NAMES, export_adapter
    from hypersd_core.paths import DIGITS_ADAPTERS

    root, out_root = Path(root), out_root or DIGITS_ADAPTERS
    record = json.loads((root / "protocol.json").read_text())
    missing = [n for n in SHIPPED if record["runs"].get(n, {}).get("state") != "done"]
    if missing:
        raise SystemExit(f"runs {missing} are not done under {root}; nothing shipped")
    times = {}
    for name in SHIPPED:
        r = record["runs"][name]
        export_adapter(Run(root / name), EXPORT_NAMES[name], out_root)
        times[EXPORT_NAMES[name]] = {"seconds": r["seconds"], "steps": r["steps"],
                                     "batch_size": r["batch_size"], "samples": r["samples"],
                                     "parent": r["parent"], "run": str(root / name)}
    (out_root / "stage_times.json").write_text(json.dumps(times, indent=1))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/protocol")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--only", help="comma-separated run names (with their parents)")
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--deadline-s", type=float, help="start no run after this many seconds")
    p.add_argument("--stop-s", type=float, help="ask running runs to stop after this many seconds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (e.g. gradient_checkpointing=off)")
    p.add_argument("--ship", action="store_true",
                   help="only export ROOT's main runs as the shipped digits adapters")
    p.add_argument("--pack", metavar="TAR_GZ",
                   help="only pack ROOT's records and the shipped runs' fp16 adapters")
    args = p.parse_args(argv)
    if args.pack:
        pack(args.root, args.pack)
        return 0
    if args.ship:
        for name, t in ship(args.root).items():
            print(f"{name}: {t['steps']} x {t['batch_size']} ({t['samples']} samples with its "
                  f"parents), {t['seconds']} s")
        return 0
    if args.jobs < 1 or args.steps_scale <= 0:
        raise SystemExit("--jobs must be >= 1 and --steps-scale > 0")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    record = run_protocol(args.root, args.jobs, only, args.steps_scale, args.deadline_s,
                          args.stop_s, args.set)
    failed = [n for n, r in record["runs"].items() if r.get("state") != "done"]
    print(f"protocol: {len(record['runs']) - len(failed)} runs done in {record['seconds']} s; "
          f"not done: {failed or 'none'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
