"""The stage trainer: entry point of a run process.

``python -m hypersd_core.training.trainer --run DIR [--resume]`` (or under ``torchrun`` /
``accelerate launch`` for several processes). It reads DIR/config.yaml, trains the
stage's LoRA, streams metrics.jsonl and status.json, writes sample grids and
checkpoints, and ends with final/ (a diffusers-format LoRA).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from hypersd_core.training.config import StageConfig
from hypersd_core.training.runs import Run

STUDENT = "student"


class NonFiniteLossError(RuntimeError):
    pass


def make_stage(cfg: StageConfig, backbone):
    """The stage object: ``loss(batch, generator) -> ([B], logs)`` plus optional hooks."""
    if cfg.stage in ("tscd", "lcm", "tcd"):
        from hypersd_core.distill.adversarial import AdversarialTerm
        from hypersd_core.distill.tscd import ConsistencyStage

        disc = None
        if cfg.adv_weight > 0:
            disc = AdversarialTerm(backbone.unet, backbone.alphas_cumprod.to(backbone.device).float(),
                                   backbone.num_train_timesteps, cfg.adv_lr, cfg.adv_hidden)
        return ConsistencyStage(cfg, backbone, discriminator=disc)
    if cfg.stage == "feedback":
        from hypersd_core.distill.feedback import FeedbackStage

        return FeedbackStage(cfg, backbone)
    if cfg.stage == "dmd":
        from hypersd_core.distill.dmd import DMDStage

        return DMDStage(cfg, backbone)
    raise ValueError(f"unknown stage {cfg.stage!r}")


def sample_method(cfg: StageConfig) -> str:
    return {"tscd": "hypersd", "lcm": "lcm", "tcd": "tcd", "feedback": "hypersd",
            "dmd": "hypersd-unified"}[cfg.stage]


@torch.no_grad()
def sample_grid(backbone, cfg: StageConfig, out_path: Path):
    """The fixed prompts/seeds with the current weights, saved as one PNG row; returns images."""
    from PIL import Image

    from hypersd_core.models.sampling import get_recipe, make_scheduler

    method = sample_method(cfg)
    recipe = get_recipe(method)
    pipe = backbone.pipe
    old = pipe.scheduler
    pipe.scheduler = make_scheduler(backbone, method)
    try:
        kwargs = {"eta": recipe.eta} if recipe.eta is not None else {}
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


def _step_generator(cfg: StageConfig, step: int, rank: int) -> torch.Generator:
    """A generator per (seed, step, process): a resumed run draws the same batches."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + rank)


def _save_state(tmp: Path, unet, optimizer, lr_sched, stage, step: int, nonfinite: int):
    from safetensors.torch import save_file

    from hypersd_core.models.lora import lora_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(unet, STUDENT).items()}
    save_file(state, str(tmp / "lora.safetensors"))
    extra = {"optimizer": optimizer.state_dict(), "lr_sched": lr_sched.state_dict(),
             "step": step, "nonfinite": nonfinite}
    if hasattr(stage, "state_dict"):
        extra["stage"] = stage.state_dict()
    torch.save(extra, tmp / "trainer.pt")


def _load_state(ckpt: Path, unet, optimizer, lr_sched, stage) -> tuple[int, int]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(unet, load_file(str(ckpt / "lora.safetensors")), adapter_name=STUDENT)
    extra = torch.load(ckpt / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    lr_sched.load_state_dict(extra["lr_sched"])
    if "stage" in extra and hasattr(stage, "load_state_dict"):
        stage.load_state_dict(extra["stage"])
    return int(extra["step"]), int(extra["nonfinite"])


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
    """Train the run in ``run_dir`` to completion, a stop request, or an error."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.lora import save_lora
    from hypersd_core.training.data import make_data

    run = Run(run_dir)
    cfg = run.config()
    use_cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not use_cuda,
                              mixed_precision=cfg.mixed_precision if use_cuda else "no")
    main = accelerator.is_main_process
    stop = {"flag": False}

    def on_sigint(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)
    if main:
        run.stop_path.unlink(missing_ok=True) if not resume else None
        run.write_status(state="running", pid=os.getpid(), step=0, total=cfg.steps, error=None,
                         device=str(accelerator.device), processes=accelerator.num_processes)
    try:
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32)
        backbone = load_backbone(cfg.model, device=str(accelerator.device), dtype=weight_dtype)
        torch.manual_seed(cfg.seed)
        params = setup_student(backbone, cfg)
        stage = make_stage(cfg, backbone)
        if hasattr(stage, "setup"):  # a stage's own adapters (feedback: frozen TSCD; DMD: fake score)
            params = stage.setup(params)
        data = make_data(backbone, cfg.data)
    except Exception as err:  # before the loop: no state to save, but say why
        if main:
            run.write_status(state="failed", error=f"{type(err).__name__}: {err}")
        raise
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))

    step, nonfinite = 0, 0
    if resume:
        ckpt = run.latest_checkpoint()
        if ckpt is not None:
            step, nonfinite = _load_state(ckpt, backbone.unet, optimizer, lr_sched, stage)
        if main:
            run.truncate_metrics(step)
            run.stop_path.unlink(missing_ok=True)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.stage}{cfg.k if cfg.stage == 'tscd' else ''}",
               disable=not main, dynamic_ncols=True)
    t_start, step_start = time.perf_counter(), step
    rank = accelerator.process_index
    save = lambda s: run.save_checkpoint(  # noqa: E731
        s, lambda tmp: _save_state(tmp, backbone.unet, optimizer, lr_sched, stage, s, nonfinite),
        cfg.keep_checkpoints)
    try:
        while step < cfg.steps:
            if stop["flag"] or run.stop_requested():
                break
            generator = _step_generator(cfg, step, rank)
            logs: dict[str, float] = {}
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg.grad_accum):
                batch = data.sample(cfg.batch_size, generator)
                with accelerator.autocast():
                    loss, micro_logs = stage.loss(batch, generator)
                if loss is None:  # e.g. a DMD critic-only step
                    logs.update(micro_logs)
                    continue
                loss = loss.float().mean() / cfg.grad_accum
                loss.backward()
                total += loss.item()
                logs.update(micro_logs)
            if accelerator.num_processes > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
                         if grads else 0.0)
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                if main:
                    run.log_metrics({"step": step + 1, "skipped_nonfinite": nonfinite})
                if nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite} non-finite losses in a row at step {step + 1}; lower lr "
                        "or check the data (last good state is in checkpoints/)")
                step += 1
                continue
            nonfinite = 0
            if grads:
                optimizer.step()
            lr_sched.step()
            if hasattr(stage, "after_step"):
                logs.update(stage.after_step(step))
            step += 1
            bar.update(1)
            if main and (step % cfg.log_every == 0 or step == cfg.steps):
                elapsed = time.perf_counter() - t_start
                its = (step - step_start) / max(elapsed, 1e-9)
                record = {"step": step, "loss": total, "lr": lr_sched.get_last_lr()[0],
                          "grad_norm": grad_norm, "it_s": its, **logs}
                if use_cuda:
                    record["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                run.log_metrics(record)
                run.write_status(step=step, it_s=its, eta_s=(cfg.steps - step) / max(its, 1e-9))
                bar.set_postfix(loss=f"{total:.4g}")
            if main and (step % cfg.sample_every == 0 or step == cfg.steps):
                images = sample_grid(backbone, cfg, run.samples_dir / f"step-{step:07d}.png")
                if hasattr(stage, "score_samples"):
                    scores = stage.score_samples(images, cfg.sample_prompts)
                    if scores:
                        run.log_metrics({"step": step, **{f"reward/{k}": v for k, v in scores.items()}})
            if main and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(step)
            accelerator.wait_for_everyone()
    except Exception as err:
        if main:
            save(step)
            run.write_status(state="failed", step=step, error=f"{type(err).__name__}: {err}")
        raise
    finally:
        bar.close()
    if step < cfg.steps:
        if main:
            save(step)
            run.write_status(state="stopped", step=step)
        return run.status()
    if main:
        save_lora(backbone.unet, run.final_dir, adapter_name=STUDENT)
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
    except Exception:
        traceback.print_exc()
        return 1
    print(f"run {args.run}: {status.get('state')} at step {status.get('step')}/{status.get('total')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
