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
import warnings
from pathlib import Path

import torch

from hypersd_core.distill.optim import all_reduce_grads
from hypersd_core.training import collective
from hypersd_core.training import runs as runs_mod
from hypersd_core.training.config import StageConfig
from hypersd_core.training.engines import check_lora_engine
from hypersd_core.training.runs import Run, RunLockedError
from hypersd_core.training.threads import ThreadShare

STUDENT = "student"


class NonFiniteLossError(RuntimeError):
    pass


class ResumeRefusedError(RuntimeError):
    """The processes of a run cannot resume from the same checkpoint."""


def make_stage(cfg: StageConfig, backbone):
    """The stage object: ``loss(batch, generator) -> ([B], logs)`` plus optional hooks."""
    if cfg.stage in ("tscd", "lcm", "tcd"):
        from hypersd_core.distill.adversarial import AdversarialTerm
        from hypersd_core.distill.tscd import ConsistencyStage

        disc = None
        if cfg.adv_weight > 0:
            disc = AdversarialTerm(backbone.unet, backbone.alphas_cumprod.to(backbone.device).float(),
                                   backbone.num_train_timesteps, cfg.adv_lr, cfg.adv_hidden,
                                   cfg.adv_heads, cfg.adv_real, cfg.adv_schedule, cfg.grad_accum,
                                   cfg.adv_renoise_span)
        return ConsistencyStage(cfg, backbone, discriminator=disc)
    if cfg.stage == "feedback":
        from hypersd_core.distill.feedback import FeedbackStage

        return FeedbackStage(cfg, backbone)
    if cfg.stage == "dmd":
        from hypersd_core.distill.dmd import DMDStage

        return DMDStage(cfg, backbone)
    raise ValueError(f"unknown stage {cfg.stage!r}")


def schedule_period(cfg: StageConfig) -> int:
    """Trainer steps in one period of a stage's schedule: DMD2's ``critic_steps`` (critic-only
    steps, then a generator step), 2 for PCM's alternating adversarial term (a discriminator
    step, then a student step), else 1. Stages count by the step given to ``begin_step``."""
    if cfg.stage == "dmd":
        return cfg.critic_steps
    if cfg.stage in ("tscd", "tcd") and cfg.adv_weight > 0 and cfg.adv_schedule == "alternate":
        return 2
    return 1


def sample_method(cfg: StageConfig) -> str:
    return {"tscd": "hypersd", "lcm": "lcm", "tcd": "tcd", "feedback": "hypersd",
            "dmd": "hypersd-unified"}[cfg.stage]


@torch.no_grad()
def sample_grid(backbone, cfg: StageConfig, out_path: Path):
    """The fixed prompts/seeds with the current weights, saved as one PNG row; returns images."""
    from PIL import Image

    from hypersd_core.models.sampling import get_recipe, make_scheduler, recipe_eta

    method = sample_method(cfg)
    recipe = get_recipe(method)
    pipe = backbone.pipe
    old = pipe.scheduler
    pipe.scheduler = make_scheduler(backbone, method, cfg.default_sample_steps)
    try:
        eta = recipe_eta(recipe, cfg.default_sample_steps)
        kwargs = {"eta": eta} if eta is not None else {}
        images = pipe(prompt=cfg.sample_prompts, num_inference_steps=cfg.default_sample_steps,
                      guidance_scale=0.0, **kwargs,
                      generator=[torch.Generator().manual_seed(i)
                                 for i in range(len(cfg.sample_prompts))]).images
    finally:
        pipe.scheduler = old
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return images


def _step_generator(cfg: StageConfig, step: int, rank: int, world: int = 1) -> torch.Generator:
    """A generator per (seed, step, process): a resumed run draws the same batches, and no
    two (step, process) pairs of a run share one."""
    return torch.Generator().manual_seed(collective.step_seed(cfg.seed, step, rank, world))


def _save_state(tmp: Path, unet, optimizer, lr_sched, stage, step: int, nonfinite: int,
                scaler=None, data=None):
    from safetensors.torch import save_file

    from hypersd_core.models.lora import lora_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(unet, STUDENT).items()}
    save_file(state, str(tmp / "lora.safetensors"))
    extra = {"optimizer": optimizer.state_dict(), "lr_sched": lr_sched.state_dict(),
             "step": step, "nonfinite": nonfinite}
    if hasattr(stage, "state_dict"):
        extra["stage"] = stage.state_dict()
    if scaler is not None:  # fp16: the loss scale and its growth count
        extra["scaler"] = scaler.state_dict()
    if data is not None:  # the loader's position (a streamed source resumes where it was)
        extra["data"] = data.state_dict()
    torch.save(extra, tmp / "trainer.pt")


def _load_state(ckpt: Path, unet, optimizer, lr_sched, stage, scaler=None,
                data=None) -> tuple[int, int]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(unet, load_file(str(ckpt / "lora.safetensors")), adapter_name=STUDENT)
    extra = torch.load(ckpt / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    lr_sched.load_state_dict(extra["lr_sched"])
    if "stage" in extra and hasattr(stage, "load_state_dict"):
        stage.load_state_dict(extra["stage"])
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])
    if "data" in extra and data is not None:
        data.load_state_dict(extra["data"])
    return int(extra["step"]), int(extra["nonfinite"])


def _resume_state(run: Run, unet, optimizer, lr_sched, stage, scaler=None,
                  data=None) -> tuple[int, int]:
    """Load the newest intact checkpoint, the same one on every process.

    Rank 0 lists the checkpoints and verifies them (it alone reads their SHA-256) and
    sends their names. Every process checks that it sees the chosen one (manifest and
    sizes), or all refuse naming the ranks that do not: a process never falls back to
    another checkpoint, or to step 0, alone. One that fails its checksums or does not load
    is skipped on every process with a warning naming it (kept in status.json); (0, 0)
    when there is none.
    """
    main = collective.rank() == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = collective.broadcast([p.name for p in run.checkpoints()] if main else None)
        state = None
        for name in reversed(names):
            ckpt = run.checkpoints_dir / name
            lacking = collective.missing_on(not runs_mod.checkpoint_problem(ckpt, hashes=False))
            if lacking:
                raise ResumeRefusedError(
                    f"checkpoint {ckpt} (the newest intact one on rank 0) is missing or incomplete "
                    f"on rank(s) {lacking}: every process must see the run folder; no process resumed")
            try:
                loaded, why = _load_state(ckpt, unet, optimizer, lr_sched, stage, scaler, data), ""
            except Exception as err:  # e.g. a manifest without checksums over a bad file
                loaded, why = None, (str(err).strip().splitlines() or [""])[0][:200]
                why = f"{type(err).__name__}: {why}"
            failed = collective.missing_on(loaded is not None)
            if not failed:
                state = loaded
                break
            warnings.warn(f"skipping checkpoint {ckpt}: it does not load on rank(s) {failed}"
                          + (f" ({why})" if why else ""), stacklevel=2)
    notes = collective.broadcast([str(w.message) for w in caught])  # rank 0's view
    if main:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    if state is None and notes:
        raise RuntimeError(f"no intact checkpoint to resume {run.dir} from ({'; '.join(notes)})")
    if notes and main:
        run.write_status(warning="; ".join(notes) + f"; resumed from step {state[0]}")
    return state or (0, 0)


def _scaler_update(scaler, overflow: bool) -> None:
    """Advance the fp16 loss scale by the collective verdict (the same on every process),
    not by this process's own found-inf flag: an overflow lowers it, a finite step counts
    towards growing it."""
    if overflow:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    else:
        scaler.update()


def _weights_finite(unet) -> bool:
    from hypersd_core.models.lora import lora_state_dict

    return all(bool(torch.isfinite(v).all()) for v in lora_state_dict(unet, STUDENT).values())


def frozen_dtype(cfg: StageConfig, use_cuda: bool) -> torch.dtype:
    """The dtype of the frozen weights (UNet, VAE, text encoders); LoRAs stay fp32.

    ``auto``: on CUDA the half type of ``mixed_precision`` (fp32 with "no"), fp32 on
    the CPU. Setting it (e.g. bf16 with mixed_precision=bf16) runs the GPU's dtype path
    on the CPU.
    """
    name = cfg.frozen_dtype
    if name == "auto":
        name = cfg.mixed_precision if use_cuda and cfg.mixed_precision != "no" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def checkpointing_on(cfg: StageConfig, use_cuda: bool) -> bool:
    """Gradient checkpointing: ``auto`` is on with CUDA, off on the CPU."""
    return cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and use_cuda)


# stages that decode latents with gradients through the VAE
VAE_GRAD_STAGES = ("feedback", "dmd")


def enable_checkpointing(backbone, cfg: StageConfig, use_cuda: bool) -> bool:
    """UNet gradient checkpointing, and the VAE's for stages that decode with gradients
    (an SDXL 1024^2 decode with gradients alone holds ~19 GiB of activations)."""
    from hypersd_core.models.checkpointing import adapter_aware_checkpoint

    if not checkpointing_on(cfg, use_cuda):
        return False
    # recomputation under the forward's LoRA state (the discriminator runs adapters off)
    backbone.unet.enable_gradient_checkpointing(adapter_aware_checkpoint)
    if cfg.stage in VAE_GRAD_STAGES:
        backbone.vae.enable_gradient_checkpointing()
    return True


# stages that keep init_adapter as a separate frozen adapter under a new student LoRA
SEPARATE_INIT_STAGES = ("feedback",)


def setup_student(backbone, cfg: StageConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, add the student LoRA (fp32), start it from init_adapter if given."""
    from hypersd_core.models.lora import add_lora, load_lora_into

    for module in (backbone.unet, backbone.vae, backbone.pipe.text_encoder):
        module.requires_grad_(False)
    params = add_lora(backbone.unet, cfg.lora_rank, cfg.lora_alpha, adapter_name=STUDENT)
    if cfg.init_adapter and cfg.stage not in SEPARATE_INIT_STAGES:
        load_lora_into(backbone.unet, cfg.init_adapter, STUDENT)
    backbone.unet.set_adapter(STUDENT)
    return params


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
