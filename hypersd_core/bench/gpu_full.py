"""``bench --gpu --full``: everything in ``bench --gpu``, then the trainer itself in two
processes on one GPU (gloo), with random full-size SD1.5 weights:

* TSCD k=1 with the adversarial term, and DMD (critic_steps 2: both updates run), each
  4 steps at batch 1, fp16 with GradScaler (the trainer's own ``accelerator.scaler``);
* a resume: a 2-step run of TSCD + adversarial, then ``--resume`` to step 4 from its
  checkpoint; on a GPU also a repeat of the straight run, since CUDA kernels (attention
  and convolution backward) need not be deterministic: the resume must then be no further
  from the straight run than twice the repeat is (on an H200 the resumed weights were not
  bit-identical, which alone cannot tell a resume fault from kernel noise);

each checked for a "done" status, both processes' weight digests being equal, and the
resume's final weights equal to the straight run's. One JSON to ``--out``. Sized for
under 8 minutes on one H100/H200: the ``bench --gpu`` part gets a 240 s budget, the four
trainer runs (a repeat of the straight run on a GPU) about 35-70 s each (two model loads
per run; on an H200 the whole check took 382 s with three). ``--dry-run``: the same code
on the CPU with ``random:sd15-tiny`` and no mixed precision (the CPU has no fp16 loss
scaling), as CI runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# run name -> (preset, overrides): the two stages with optimisers of their own
CASES: dict[str, tuple[str, dict]] = {
    "tscd_adv": ("digits-tscd-k1", {"adv_weight": 0.2}),
    "dmd": ("digits-dmd", {"critic_steps": 2, "rewards": {}, "perceptual_weight": 0.0}),
}
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_folder(folder: Path, res: int, n: int = 4) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        arr = (torch.rand(res, res, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i}.jpg", "text": f"a photo number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _config(name: str, model: str, data: Path, mixed: str, steps: int):
    from hypersd_core.training.config import load_preset

    preset, overrides = CASES[name]
    return load_preset(preset, {**overrides, "model": model, "data": str(data), "steps": steps,
                                "batch_size": 1, "grad_accum": 1, "log_every": 1,
                                "sample_every": 10_000, "checkpoint_every": 2, "init_adapter": "",
                                "mixed_precision": mixed, "lora_rank": 64, "lora_alpha": 64,
                                "data_workers": 0, "max_nonfinite": 50})


def two_process_train(run_dir: Path, resume: bool = False, timeout: float = 600) -> dict:
    """The trainer in 2 processes on this machine's one device (gloo), like torchrun but
    with both on device 0; returns seconds, exit codes and the log tails."""
    port = _free_port()
    procs = []
    t0 = time.perf_counter()
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "HYPERSD_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "hypersd_core.training.trainer", "--run-dir", str(run_dir)]
        procs.append(subprocess.Popen(cmd + (["--resume"] if resume else []), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs.append("timed out")
    return {"seconds": round(time.perf_counter() - t0, 1), "exit": [p.returncode for p in procs],
            "log_tail": [o[-800:] for o in outs]}


def _digests(run) -> list[str]:
    return [(run.final_dir / f"weights-rank{r}.sha256").read_text()
            if (run.final_dir / f"weights-rank{r}.sha256").is_file() else "" for r in (0, 1)]


def _summary(run, launch: dict) -> dict:
    status = run.status()
    records, _ = run.read_metrics()
    steps = [r for r in records if "loss" in r]
    digests = _digests(run)
    row = {**launch, "state": status.get("state"), "step": status.get("step"),
           "ranks_agree": bool(digests[0]) and digests[0] == digests[1], "digest": digests[0][:16],
           "step_s": [round(1 / r["it_s"], 3) for r in steps if r.get("it_s")][-1:],
           "fp16_scale": [r["fp16_scale"] for r in records if "fp16_scale" in r],
           "mem_gb": max((r.get("mem_gb", 0) for r in steps), default=None)}
    return row


def _final_lora(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(p for p in run.final_dir.glob("*.safetensors") if "ema" not in p.name)
    return load_file(str(files[0])) if files else {}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float | None:
    """The largest absolute difference between two LoRAs' weights (None: keys differ)."""
    if not a or a.keys() != b.keys():
        return None
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def resume_verdict(straight: dict, repeat: dict | None, resumed: dict) -> dict:
    """Is the resumed run the straight run? Bit-identical weights answer yes. Where the
    device's kernels are not deterministic (two straight runs differ, as on a GPU), the
    resumed run must be no further from the straight run than a repeat of it is (x2)."""
    d_resume = max_difference(straight, resumed)
    exact = d_resume == 0.0
    d_repeat = max_difference(straight, repeat) if repeat is not None else None
    ok = exact or (d_resume is not None and d_repeat is not None and d_repeat > 0
                   and d_resume <= 2 * d_repeat)
    return {"equals_straight_run": exact, "max_diff_resumed": d_resume,
            "max_diff_repeat": d_repeat, "within_repeat_noise": ok}


def multi_process_runs(scratch: Path, model: str, mixed: str, res: int, log=print,
                       repeat: bool = True) -> dict:
    """The two stages and the resume; each entry records state, agreement and seconds.
    ``repeat``: run TSCD + adversarial a second time, the floor the resume is judged by
    where kernels are not deterministic."""
    from hypersd_core.training.runs import Run

    data = _image_folder(scratch / "data", res)
    out: dict = {}
    for name in CASES:
        run = Run.create(scratch / name, _config(name, model, data, mixed, STEPS))
        out[name] = _summary(run, two_process_train(run.dir))
        log(f"  2 processes, {name}: {out[name]['state']} at step {out[name]['step']}, "
            f"ranks agree {out[name]['ranks_agree']}, {out[name]['seconds']} s")
    straight = _final_lora(Run(scratch / "tscd_adv"))
    again = None
    if repeat:
        rerun = Run.create(scratch / "repeat", _config("tscd_adv", model, data, mixed, STEPS))
        out["repeat"] = _summary(rerun, two_process_train(rerun.dir))
        again = _final_lora(rerun)
    run = Run.create(scratch / "resume", _config("tscd_adv", model, data, mixed, STEPS // 2))
    first = two_process_train(run.dir)
    run.config_path.write_text(run.config_path.read_text().replace(
        f"steps: {STEPS // 2}\n", f"steps: {STEPS}\n"))
    second = _summary(run, two_process_train(run.dir, resume=True))
    second["first_seconds"] = first["seconds"]
    second.update(resume_verdict(straight, again, _final_lora(run)))
    out["resume"] = second
    log(f"  2 processes, resume at step {STEPS // 2}: {second['state']} at step {second['step']}, "
        f"equals the straight run {second['equals_straight_run']} (max |diff| "
        f"{second['max_diff_resumed']}; a repeated straight run: {second['max_diff_repeat']})")
    return out


def full_errors(mp: dict) -> list[str]:
    errors = []
    for name, row in mp.items():
        if row.get("state") != "done" or row.get("step") != STEPS:
            errors.append(f"{name}: ended {row.get('state')} at step {row.get('step')} "
                          f"(exit {row.get('exit')}): {row.get('log_tail', [''])[0][-300:]}")
        elif not row.get("ranks_agree"):
            errors.append(f"{name}: the two processes ended with different weights")
    resumed = mp.get("resume", {})
    if resumed.get("state") == "done" and not resumed.get("within_repeat_noise"):
        errors.append("resume: the resumed run's weights differ from the straight run's by "
                      f"{resumed.get('max_diff_resumed')}, more than twice a repeated straight "
                      f"run's {resumed.get('max_diff_repeat')}")
    return errors


def run_gpu_full(out: str | Path, dry_run: bool = False, dtype: str = "bf16",
                 device: str | None = None, plan=None, log=print) -> dict:
    """``bench --gpu`` (budget 240 s) plus the 2-process runs; one JSON at ``out``.
    ``plan``: the ``bench --gpu`` part's plan (default: its own, or the dry-run plan)."""
    from hypersd_core.bench.gpu import DRY_PLAN, GpuPlan, run_gpu_check

    t0 = time.perf_counter()
    out = Path(out)
    plan = plan or (DRY_PLAN if dry_run else dataclasses.replace(GpuPlan(), budget_s=240.0))
    check = run_gpu_check(out=out.with_name(out.stem + "-check.json"), dry_run=dry_run,
                          dtype=dtype, device=device, plan=plan, log=log)
    model, mixed, res = ("random:sd15-tiny", "no", 64) if dry_run else ("random:sd15", "fp16", 512)
    log(f"trainer in 2 processes on one {'CPU' if dry_run else 'GPU'} (gloo), {model}, "
        f"mixed precision {mixed}")
    with tempfile.TemporaryDirectory(prefix="hypersd-gpu-full-") as scratch:
        mp = multi_process_runs(Path(scratch), model, mixed, res, log, repeat=not dry_run)
    errors = list(check.get("errors", [])) + full_errors(mp)
    result = {"dry_run": dry_run, "gpu_check": check, "multi_process": mp,
              "settings": {"model": model, "mixed_precision": mixed, "resolution": res,
                           "steps": STEPS, "batch": 1, "backend": "gloo", "processes": 2},
              "errors": errors, "seconds": round(time.perf_counter() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {out} in {result['seconds']:.0f} s; {len(errors)} error(s)")
    return result
