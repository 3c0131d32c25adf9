"""The stage trainer: entry point of a run process.

``python -m hypersd_core.training.trainer --run DIR [--resume]`` (or under ``torchrun`` /
``accelerate launch`` for several processes). It reads DIR/config.yaml, trains the
stage's LoRA, streams metrics.jsonl and status.json, writes sample grids and
checkpoints, and ends with final/ (a diffusers-format LoRA).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from hypersd_core.distill.optim import all_reduce_grads
from hypersd_core.training import collective
from hypersd_core.training.engines import check_lora_engine
from hypersd_core.training.resume import (  # noqa: F401 (_step_generator: re-exported)
    ResumeRefusedError,
    _resume_state,
    _save_state,
    _scaler_update,
    _step_generator,
    _weights_finite,
)
from hypersd_core.training.runs import Run, RunLockedError
from hypersd_core.training.student import (  # noqa: F401 (re-exported for callers)
    SEPARATE_INIT_STAGES,
    STUDENT,
    VAE_GRAD_STAGES,
    checkpointing_on,
    enable_checkpointing,
    frozen_dtype,
    make_stage,
    sample_grid,
    sample_method,
    schedule_period,
    setup_student,
)
from hypersd_core.training.threads import ThreadShare


class NonFiniteLossError(RuntimeError):
    pass


def train(run_dir: str | Path, resume: bool = False) -> dict:
    """Train the run in ``run_dir`` to completion, a stop request, or an error.

    The process owns the folder meanwhile (RunLockedError naming the holder's PID when
    another process does); any failure leaves status.json "failed" with the reason.
    """
    run = Run(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.dir} is not a run folder (no config.yaml)")
    lock = run.lock() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return _train(run, resume)
    except (Exception, KeyboardInterrupt) as err:
        if lock is not None and run.status().get("state") in ("queued", "running", "stopping"):
            run.write_status(state="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(run: Run, resume: bool) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.lora import save_lora
    from hypersd_core.training.data import make_loader
    from hypersd_core.training.optimizers import make_optimizer

    cfg = run.config()
    use_cuda = torch.cuda.is_available()
    # `accelerate launch --config_file X`: X's mixed_precision, unless it conflicts (one line)
    cfg = dataclasses.replace(cfg, mixed_precision=collective.launcher_precision(cfg.mixed_precision))
    check_lora_engine(cfg.stage)  # FSDP / DeepSpeed configs: one line naming the DDP one
    if cfg.mixed_precision == "fp16" and not use_cuda:
        raise ValueError("mixed_precision=fp16 needs a CUDA GPU (its loss scaling is CUDA's); "
                         "use mixed_precision=bf16 or no on the CPU")
    from hypersd_core.training.trackers import Trackers, accelerator_kwargs

    handlers = []
    if os.environ.get("HYPERSD_DIST_BACKEND"):  # e.g. gloo: several processes on one GPU
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(backend=os.environ["HYPERSD_DIST_BACKEND"]))
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=cfg.mixed_precision,
                              kwargs_handlers=handlers, **accelerator_kwargs(cfg.report_to, run.dir))
    scaler = accelerator.scaler  # a GradScaler under fp16 (loss scaling), else None
    main = accelerator.is_main_process
    stop = collective.StopRequest(run, main)  # SIGINT / SIGTERM here, STOP file on rank 0
    if not resume and accelerator.num_processes > 1:
        # a restarted worker group (torchrun --max-restarts) runs the same command: it
        # continues from the run's checkpoints, never from step 0 with a fresh LoRA
        found = collective.broadcast([p.name for p in run.checkpoints(verify=False)] if main else None)
        if found:
            resume = True
            if main:
                print(f"{run.dir} holds checkpoints (newest {found[-1]}): resuming from them",
                      file=sys.stderr, flush=True)
    if main:
        run.stop_path.unlink(missing_ok=True) if not resume else None
        # a resumed run keeps showing the step it resumes from (not 0) while it loads, and no
        # ETA from the previous process until this one has measured its speed
        run.write_status(state="running", pid=os.getpid(), total=cfg.steps, error=None,
                         **({"it_s": None, "eta_s": None} if resume else {"step": 0}),
                         device=str(accelerator.device), processes=accelerator.num_processes,
                         mixed_precision=cfg.mixed_precision)
    threads = ThreadShare(cfg.cpu_threads, accelerator.device.type)
    threads.update()
    try:
        backbone = load_backbone(cfg.model, device=str(accelerator.device),
                                 dtype=frozen_dtype(cfg, use_cuda))
        torch.manual_seed(cfg.seed)
        params = setup_student(backbone, cfg)
        stage = make_stage(cfg, backbone)
        if hasattr(stage, "setup"):  # a stage's own adapters (feedback: frozen TSCD; DMD: fake score)
            params = stage.setup(params)
        enable_checkpointing(backbone, cfg, use_cuda)
        data = make_loader(backbone, cfg, accelerator.device.type)  # workers decode, prefetch
    except Exception as err:  # before the loop: no state to save, but say why
        if main:
            run.write_status(state="failed", error=f"{type(err).__name__}: {err}")
        raise
    optimizer = make_optimizer(cfg, params)  # AdamW, or 8-bit AdamW (bitsandbytes)
    ema = None  # the student LoRA's EMA, exported as final_ema/ (training/ema.py)
    if cfg.lora_ema_decay > 0:
        from hypersd_core.training.ema import LoraEMA

        ema = LoraEMA(backbone.unet, STUDENT, cfg.lora_ema_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))

    step, nonfinite = 0, 0
    if resume:
        step, nonfinite = _resume_state(run, backbone.unet, optimizer, lr_sched, stage, scaler, data)
        if step and not data.draws:  # a checkpoint without the loader's state: every step draws
            data.load_state_dict({"draws": step * cfg.grad_accum})
        if ema is not None and step:
            ema.load(run.checkpoints_dir / f"step-{step:07d}")
        if main:
            run.truncate_metrics(step)
            run.stop_path.unlink(missing_ok=True)
            run.write_status(step=step)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.stage}{cfg.k if cfg.stage == 'tscd' else ''}",
               disable=not main, dynamic_ncols=True)
    t_start, step_start = time.perf_counter(), step
    rank = accelerator.process_index
    trackers = Trackers(accelerator, cfg.report_to, run.dir.name, cfg.to_dict())

    def write_state(tmp: Path, s: int) -> None:
        _save_state(tmp, backbone.unet, optimizer, lr_sched, stage, s, nonfinite, scaler, data)
        if ema is not None:
            ema.save(tmp)

    def save(s: int) -> Path | None:
        """A checkpoint at step ``s``; never one whose weights are non-finite (None then)."""
        if not _weights_finite(backbone.unet):
            print(f"warning: no checkpoint written at step {s}: the student's weights are "
                  "non-finite", file=sys.stderr, flush=True)
            return None
        return run.save_checkpoint(
            s, lambda tmp: write_state(tmp, s), cfg.keep_checkpoints)

    stopping = collective.agree(stop.requested())
    try:
        while step < cfg.steps:
            if stopping:  # decided together at the end of the previous step
                break
            if threads.update() is not None and main and step > step_start:
                print(f"cpu threads: {threads.threads} (runs on this machine changed)",
                      file=sys.stderr, flush=True)
            generator = _step_generator(cfg, step, rank, accelerator.num_processes)
            logs: dict[str, float] = {}
            optimizer.zero_grad(set_to_none=True)
            if hasattr(stage, "begin_step"):  # a stage's own optimisers count optimizer steps
                stage.begin_step(step)
            total = torch.zeros((), device=accelerator.device)
            backpropagated = False  # the same on every process (a stage's schedule is by step)
            for _ in range(cfg.grad_accum):
                batch = data.next()
                with accelerator.autocast():
                    loss, micro_logs = stage.loss(batch, generator)
                logs.update(micro_logs)
                if loss is None:  # e.g. a DMD critic-only step
                    continue
                loss = loss.float().mean() / cfg.grad_accum
                accelerator.backward(loss)  # scaled under fp16
                total += loss.detach()
                backpropagated = True
            if backpropagated:
                # average the (fp16: still scaled) gradients first, then unscale: every
                # process's GradScaler sees the same overflow and skips the same steps
                all_reduce_grads(params)  # flat buckets; no-op in one process
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.zeros((), device=accelerator.device)
            # one host sync and one collective per step: the loss and the gradient finite on
            # every process, and whether any process was asked to stop
            verdict = collective.step_verdict(total, grad_norm, stop.requested())
            loss_ok, grad_ok, stopping = verdict.loss_ok, verdict.grad_ok, verdict.stop
            if scaler is not None and loss_ok and not grad_ok:  # fp16 overflow: skip, lower the scale
                optimizer.zero_grad(set_to_none=True)
                _scaler_update(scaler, overflow=True)
                logs["fp16_scale"] = scaler.get_scale()
                loss_ok = grad_ok = True
                backpropagated = False
            if not (loss_ok and grad_ok):
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None and backpropagated:
                    _scaler_update(scaler, overflow=not grad_ok)
                if main:
                    run.log_metrics({"step": step + 1, "skipped_nonfinite": nonfinite})
                if nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite} non-finite losses in a row at step {step + 1}; lower lr "
                        "or check the data")
                step += 1
                continue
            nonfinite = 0
            if backpropagated:  # a step without gradients takes no optimizer step
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if ema is not None:
                    ema.update()
            lr_sched.step()
            if hasattr(stage, "after_step"):  # e.g. the discriminator's step: same autocast
                with accelerator.autocast():
                    logs.update(stage.after_step(step))
            step += 1
            bar.update(1)
            if main and (step % cfg.log_every == 0 or step == cfg.steps):
                elapsed = time.perf_counter() - t_start
                its = (step - step_start) / max(elapsed, 1e-9)
                record = {"step": step, "loss": float(total), "lr": lr_sched.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "it_s": its, **logs}
                if threads.threads is not None:
                    record["cpu_threads"] = threads.threads
                record["data_skipped"] = getattr(data, "skipped", 0)  # unreadable samples so far
                if use_cuda:
                    record["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                run.log_metrics(record)
                trackers.log(record, step)
                run.write_status(step=step, it_s=its, eta_s=(cfg.steps - step) / max(its, 1e-9))
                bar.set_postfix(loss=f"{float(total):.4g}")
            if main and (step % cfg.sample_every == 0 or step == cfg.steps):
                images = sample_grid(backbone, cfg, run.samples_dir / f"step-{step:07d}.png")
                trackers.log_images(images, step)
                if hasattr(stage, "score_samples"):
                    scores = stage.score_samples(images, cfg.sample_prompts)
                    if scores:
                        run.log_metrics({"step": step, **{f"reward/{k}": v for k, v in scores.items()}})
                        trackers.log({f"reward/{k}": v for k, v in scores.items()}, step)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                if main:
                    save(step)
                accelerator.wait_for_everyone()  # only here: no barrier in every step
    except Exception as err:
        if main:
            save(step)
            last = run.latest_checkpoint()
            where = f"last good checkpoint: {last}" if last else "no good checkpoint was written"
            run.write_status(state="failed", step=step, error=f"{type(err).__name__}: {err}; {where}")
            if isinstance(err, NonFiniteLossError):
                raise NonFiniteLossError(f"{err}; {where}") from None
        raise
    finally:
        bar.close()
        trackers.close()
    if step < cfg.steps:  # stopped: every process at the same step (a collective decision)
        if main:
            save(step)
            run.write_status(state="stopped", step=step)
    elif main:
        save_lora(backbone.unet, run.final_dir, adapter_name=STUDENT)
        if ema is not None:
            from hypersd_core.training.export import EMA_DIR

            ema.export(backbone.unet, run.dir / EMA_DIR, STUDENT)
        if hasattr(stage, "finalize"):
            stage.finalize(run)
        save(step)
        run.write_status(state="done", step=step, eta_s=0,
                         seconds=time.perf_counter() - t_start)
    if accelerator.num_processes > 1:  # each process records its weights: they must agree
        from hypersd_core.models.lora import lora_state_dict

        digest = hashlib.sha256()
        for key, value in sorted(lora_state_dict(backbone.unet, STUDENT).items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().float().numpy().tobytes())
        run.final_dir.mkdir(parents=True, exist_ok=True)
        (run.final_dir / f"weights-rank{rank}.sha256").write_text(digest.hexdigest())
    accelerator.wait_for_everyone()
    return run.status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one stage in a run folder.")
    parser.add_argument("--run-dir", "--run", dest="run", required=True,
                        help="run folder (holds config.yaml); --run-dir also works under torchrun")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args(argv)
    try:
        status = train(args.run, resume=args.resume)
    except (RunLockedError, FileNotFoundError, ValueError, ResumeRefusedError) as err:  # refused
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    print(f"run {args.run}: {status.get('state')} at step {status.get('step')}/{status.get('total')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
