"""The protocol's run graph, for any world: every run an ordinary run folder, started
from its parent's final adapter, trained ``jobs`` at a time (one process each).
``protocol.json`` in the root records each run's steps, batch, LoRA rank, training
samples (with its parents'), UNet forward-equivalents per sample (``budget.py``), state
and seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypersd_core.training.config import load_preset
from hypersd_core.training.runs import Run

WEIGHTS = "final/pytorch_lora_weights.safetensors"
COSTS_FILE = "budget_costs.json"


@dataclass(frozen=True)
class RunSpec:
    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    parent: str | None = None
    group: str = "main"  # main | ablation | lr-search
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False)


def _scaled(overrides: list[str], cfg, scale: float) -> list[str]:
    if scale == 1.0:
        return overrides
    steps = max(2, round(cfg.steps * scale))
    every = max(1, round(cfg.checkpoint_every * scale))
    return overrides + [f"steps={steps}", f"checkpoint_every={every}", f"sample_every={steps}",
                        f"log_every={max(1, min(10, steps // 2))}"]


def _cost_key(spec: RunSpec) -> str:
    keep = [o for o in spec.overrides if o.split("=")[0] not in COST_FREE_KEYS]
    return spec.preset + "|" + ",".join(sorted(keep))


# overrides that do not change what one training step costs per sample
COST_FREE_KEYS = ("steps", "checkpoint_every", "sample_every", "log_every", "lr", "init_adapter")


def step_cost(root: Path, spec: RunSpec, cfg, log=print) -> float | None:
    """Forward-equivalents per training sample of ``spec``'s stage, measured once per
    (preset, cost-relevant overrides) and kept in ROOT/budget_costs.json."""
    from hypersd_core.protocol.budget import measure_step_cost

    path = root / COSTS_FILE
    costs = json.loads(path.read_text()) if path.is_file() else {}
    key = _cost_key(spec)
    if key not in costs:
        try:
            costs[key] = measure_step_cost(cfg)["fe_per_sample"]
        except Exception as err:  # the budget table shows "-"; the run still trains
            log(f"cost of {spec.name} not measured: {type(err).__name__}: {err}")
            return None
        path.write_text(json.dumps(costs, indent=1))
    return costs[key]


def recorded_runs(root: str | Path) -> dict:
    """protocol.json's runs in ``root`` as an earlier invocation left them ({} if none)."""
    try:
        return json.loads((Path(root) / "protocol.json").read_text()).get("runs", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run_protocol(root: str | Path, jobs: int = 2, only: list[str] | None = None,
                 steps_scale: float = 1.0, deadline_s: float | None = None,
                 stop_s: float | None = None, extra: list[str] | None = None,
                 log=print, runs: list[RunSpec] | None = None, costs: bool = True) -> dict:
    """Train the graph ``runs`` under ``root``; return (and write) protocol.json's record.
    ``costs``: measure each stage's forward-equivalents per sample (``budget.py``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if runs is None:
        raise ValueError("run_protocol needs the world's runs (World.runs())")
    specs = [s for s in runs if only is None or s.name in only]
    names = {s.name for s in specs}
    missing = sorted({s.parent for s in specs if s.parent and s.parent not in names})
    if missing:
        raise ValueError(f"runs {missing} are parents of selected runs; select them too")
    record: dict = {"runs": {}, "jobs": jobs, "steps_scale": steps_scale}
    state = {s.name: "waiting" for s in specs}
    previous = recorded_runs(root)
    record["runs"].update({n: r for n, r in previous.items()
                           if n not in names and r.get("state") == "done"})
    for spec in specs:  # a later invocation keeps what an earlier one finished
        if spec.name in previous and previous[spec.name].get("state") == "done" \
                and (root / spec.name / WEIGHTS).is_file():
            record["runs"][spec.name] = previous[spec.name]
            state[spec.name] = "done"
            log(f"{spec.name}: done in an earlier invocation ({previous[spec.name].get('seconds')} s)")
    procs: dict[str, tuple[subprocess.Popen, float]] = {}
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    def samples_of(name: str) -> int:
        r = record["runs"][name]
        return (r["steps"] * r["batch_size"] * r.get("grad_accum", 1)
                + (samples_of(r["parent"]) if r["parent"] else 0))

    while any(v in ("waiting", "running") for v in state.values()):
        for name, (proc, started) in list(procs.items()):
            if proc.poll() is None:  # seconds so far: an interrupted run resumes with them
                record["runs"][name]["seconds"] = round(time.perf_counter() - started, 1)
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
            resume = (root / spec.name / "config.yaml").is_file()
            if resume:  # interrupted in an earlier invocation: continue from its checkpoint
                cfg = Run(root / spec.name).config()
            else:
                Run.create(root / spec.name, cfg)
            earlier = previous.get(spec.name, {}).get("seconds", 0.0) if resume else 0.0
            record["runs"][spec.name] = {
                "preset": spec.preset, "overrides": list(spec.overrides), "parent": spec.parent,
                "group": spec.group, "note": spec.note, "steps": cfg.steps,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "lora_rank": cfg.lora_rank, "lr": cfg.lr, "state": "running",
                "fe_per_sample": step_cost(root, spec, cfg, log) if costs else None}
            record["runs"][spec.name]["samples"] = samples_of(spec.name)
            out = open(root / f"{spec.name}.log", "a" if resume else "w")
            proc = subprocess.Popen([sys.executable, "-m", "hypersd_core.training.trainer",
                                     "--run", str(root / spec.name)] + (["--resume"] if resume else []),
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
            procs[spec.name] = (proc, time.perf_counter() - earlier)
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


def main(argv: list[str] | None, world) -> int:
    """Train a world's protocol graph (or --ship / --pack a finished root)."""
    import argparse

    p = argparse.ArgumentParser(description=f"Train the {world.name} protocol's run graph.")
    p.add_argument("--root", default=f"runs/protocol-{world.name}" if world.name != "digits"
                   else "runs/protocol")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--only", help="comma-separated run names (with their parents)")
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--deadline-s", type=float, help="start no run after this many seconds")
    p.add_argument("--stop-s", type=float, help="ask running runs to stop after this many seconds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (e.g. gradient_checkpointing=off)")
    p.add_argument("--no-costs", action="store_true",
                   help="do not measure each stage's forward-equivalents per sample")
    p.add_argument("--ship", action="store_true",
                   help="only export ROOT's main runs as the world's shipped adapters")
    p.add_argument("--pack", metavar="TAR_GZ",
                   help="only pack ROOT's records and the shipped runs' fp16 adapters")
    args = p.parse_args(argv)
    if args.pack:
        if world.pack is None:
            raise SystemExit(f"the {world.name} world has no pack step")
        world.pack(args.root, args.pack)
        return 0
    if args.ship:
        if world.ship is None:
            raise SystemExit(f"the {world.name} world ships nothing yet")
        for name, t in world.ship(args.root).items():
            print(f"{name}: {t['steps']} x {t['batch_size']} ({t['samples']} samples with its "
                  f"parents), {t['seconds']} s")
        return 0
    if args.jobs < 1 or args.steps_scale <= 0:
        raise SystemExit("--jobs must be >= 1 and --steps-scale > 0")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    record = run_protocol(args.root, args.jobs, only, args.steps_scale, args.deadline_s,
                          args.stop_s, args.set, runs=world.runs(), costs=not args.no_costs)
    failed = [n for n, r in record["runs"].items() if r.get("state") != "done"]
    print(f"protocol: {len(record['runs']) - len(failed)} runs done in {record['seconds']} s; "
          f"not done: {failed or 'none'}")
    return 0 if not failed else 1


def copy_adapter(src: str | Path, dst: Path) -> None:
    """Copy an adapter file; a training checkpoint's ``lora.safetensors`` (the student's
    PEFT state, keys without the ``unet.`` prefix) is written in the final adapters'
    diffusers form, so checkpoints load like finished adapters."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    if state and not any(k.startswith("unet.") for k in state):
        save_file({f"unet.{k}": v for k, v in state.items()}, str(dst))
    else:
        shutil.copy(src, dst)

def run_samples(root: Path) -> dict[str, int]:
    """Training samples of every run in ROOT/protocol.json, its parents' included ({} if
    there is no record yet)."""
    return {n: r["samples"] for n, r in recorded_runs(root).items() if "samples" in r}


def matched_adapter(root: Path, run: str, samples: int | None) -> Path:
    """``run``'s adapter after ``samples`` training samples: the first checkpoint with at
    least that many (the final adapter when none is earlier, or ``samples`` is unknown).
    Equal-budget rows take a baseline's checkpoint at the compared row's sample count."""
    root = Path(root)
    final = root / run / WEIGHTS
    rec = recorded_runs(root).get(run)
    if rec is None or samples is None or samples >= rec["samples"]:
        return final
    for ck in sorted((root / run / "checkpoints").glob("step-*")):
        if int(ck.name.split("-")[1]) * rec["batch_size"] * rec.get("grad_accum", 1) >= samples:
            return ck / "lora.safetensors"
    return final


def ship_runs(root: str | Path, names: dict[str, str], out_root: Path) -> dict:
    """Export the runs ``names`` (run -> adapter name) of a finished root as a world's
    shipped adapters (fp16, with config, metrics.jsonl and last sample grid), and their
    budgets and seconds to ``out_root/stage_times.json``. Every one must be done: a
    partial chain is not shipped."""
    from hypersd_core.training.export import export_adapter

    root, out_root = Path(root), Path(out_root)
    record = json.loads((root / "protocol.json").read_text())
    missing = [n for n in names if record["runs"].get(n, {}).get("state") != "done"]
    if missing:
        raise SystemExit(f"runs {missing} are not done under {root}; nothing shipped")
    times = {}
    for name, export in names.items():
        r = record["runs"][name]
        export_adapter(Run(root / name), export, out_root)
        times[export] = {"seconds": r["seconds"], "steps": r["steps"],
                         "batch_size": r["batch_size"], "samples": r["samples"],
                         "parent": r["parent"], "run": str(root / name)}
    (out_root / "stage_times.json").write_text(json.dumps(times, indent=1))
    return times


def pack_root(root: str | Path, out: str | Path, adapters) -> None:
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
