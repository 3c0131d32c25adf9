"""Which change makes the scenes teacher learn relations? UNet variants trained for a fixed
wall time with the build's own loss, EMA and data, on the shipped VAE and text encoder,
side by side on one GPU (docs/scenes.md, the table under criterion (a)):

    python -m hypersd_core.scenes.variants --prepare            # render + encode 30,000 scenes
    python -m hypersd_core.scenes.variants --variant b128 --seconds 230 --out DIR &
    python -m hypersd_core.scenes.variants --variant base --seconds 230 --out DIR &

Each writes ``<variant>-last.safetensors`` (the EMA UNet, fp16; also ``-s<N>`` at step N)
and ``<variant>.json`` (config, batch, steps, seconds, loss). The cosine schedule runs over
the wall time, so variants get equal time, not equal steps. Runs on the CPU too (slowly).
The table's GPU rows ran on the second build's text encoder, before the layout heads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from multiprocessing import Pool
from pathlib import Path

import torch
import torch.nn.functional as F

from hypersd_core.paths import SCENES_DIR
from hypersd_core.worlds import scenes as world

PIPE = SCENES_DIR / "pipeline"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _render(args):
    start, n = args
    items = world.scenes("train", n, start)
    return world.render_many(items), [s.prompt for s in items]


def prepare(cache: Path, n: int, workers: int = 14):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from hypersd_core.scenes.captions import tokenize
    t0 = time.time()
    with Pool(workers) as pool:
        parts = pool.map(_render, [(s, min(1000, n - s)) for s in range(0, n, 1000)])
    images = torch.cat([p[0] for p in parts])
    prompts = [q for p in parts for q in p[1]]
    print(f"rendered {len(images)} in {time.time() - t0:.1f}s", flush=True)
    vae = AutoencoderKL.from_pretrained(PIPE / "vae", torch_dtype=torch.float32).to(DEV).eval()
    te = CLIPTextModel.from_pretrained(PIPE / "text_encoder", torch_dtype=torch.float32).to(DEV).eval()
    tok = CLIPTokenizer.from_pretrained(PIPE / "tokenizer")
    with torch.no_grad():
        lat = torch.cat([vae.encode(world.to_model(images[i:i + 1024].to(DEV))).latent_dist.mean
                         for i in range(0, n, 1024)]) * vae.config.scaling_factor
        emb = torch.cat([te(tokenize(tok, prompts[i:i + 2048]).to(DEV))[0]
                         for i in range(0, n, 2048)])
        unc = te(tokenize(tok, [""]).to(DEV))[0]
    torch.save({"latents": lat.cpu(), "embeds": emb.half().cpu(), "uncond": unc.cpu()}, cache)
    print(f"prepared in {time.time() - t0:.1f}s", flush=True)


VARIANTS = {
    # name: (unet_config changes, batch[, loss options])
    "base": ({}, 32),
    "xattn16": ({"down_block_types": ("CrossAttnDownBlock2D",) * 3,
                 "up_block_types": ("CrossAttnUpBlock2D",) * 3}, 32),
    "b128": ({}, 128),
    # the layout of a sample is fixed between t ~ 999 and t ~ 800, where the epsilon loss
    # barely depends on the image (its x0 error is weighted by SNR(t) < 0.05): half the
    # batch drawn from t in [700, 999], each sample's loss weighted by min(max(1/SNR, 1),
    # w_max) (normalised over the batch), so the text's layout is learnt where it decides
    "hinoise": ({}, 32, {"t_high": 0.5, "t_from": 700, "w_max": 20.0}),
    # the text encoder is causal: the first object's word states cannot know the relation
    # that follows them, only the states from the caption's end on do; hiding the words
    # (their states replaced by the start token's) for half the batch makes the UNet
    # learn to read the layout from the end states
    "words": ({}, 32, {"word_drop": 0.5}),
}


def loss_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, w_max: float) -> torch.Tensor:
    """Per-sample weights of the epsilon MSE: min(max(1 / SNR(t), 1), w_max)."""
    ac = alphas_cumprod[t]
    return ((1 - ac) / ac).clamp(min=1.0, max=w_max)


def sample_t(batch: int, t_high: float, t_from: int, device, generator=None) -> torch.Tensor:
    """Timesteps: a ``t_high`` share from [t_from, 999], the rest from [0, 999]."""
    from hypersd_core.distill.schedule import draw

    t = draw(torch.randint, 0, 1000, (batch,), generator=generator, device=device)
    high = draw(torch.randint, t_from, 1000, (batch,), generator=generator, device=device)
    pick = draw(torch.rand, batch, generator=generator, device=device) < t_high
    return torch.where(pick, high, t)


def train(cache: Path, variant: str, seconds: float, out: Path, snap_steps: int,
          init: str | None = None, lr: float | None = None):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    from hypersd_core.digits.build import scheduler_config
    from hypersd_core.scenes.build import SceneBuildConfig, unet_config
    cfg = SceneBuildConfig()
    changes, batch, *rest = VARIANTS[variant]
    opts = rest[0] if rest else {}
    conf = {**unet_config(cfg), **changes}
    base_lr = lr or cfg.unet_lr
    c = torch.load(cache, weights_only=True)
    latents, embeds, uncond = c["latents"].to(DEV), c["embeds"].to(DEV), c["uncond"].to(DEV)
    from hypersd_core.scenes.captions import caption_ends, hide_words
    ends = caption_ends(len(latents)).to(DEV) if opts.get("word_drop") else None
    torch.manual_seed(0)
    if init:  # fine-tune a trained UNet (e.g. the shipped teacher's) instead of a fresh one
        unet = UNet2DConditionModel.from_pretrained(init, torch_dtype=torch.float32).to(DEV)
        conf = dict(unet.config)
    else:
        unet = UNet2DConditionModel(**conf).to(DEV)
    ema = copy.deepcopy(unet).requires_grad_(False)
    ns = DDPMScheduler(**{k: v for k, v in scheduler_config().items()
                          if k in ("num_train_timesteps", "beta_start", "beta_end",
                                   "beta_schedule", "prediction_type")})
    ns.alphas_cumprod = ns.alphas_cumprod.to(DEV)
    opt = torch.optim.AdamW(unet.parameters(), lr=base_lr, weight_decay=1e-4)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    step, last_snap, logs = 0, t0, []

    def snap(tag):
        sd = {k: v.half().cpu().contiguous() for k, v in ema.state_dict().items()}
        save_file(sd, str(out / f"{variant}-{tag}.safetensors"))
        (out / f"{variant}.json").write_text(json.dumps(
            {"variant": variant, "config": conf, "batch": batch, "steps": step,
             "init": init, "lr": base_lr, "options": opts,
             "seconds": time.time() - t0, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
             "loss": logs[-50:]}, default=list))
        print(f"snapshot {tag} at step {step}", flush=True)

    while True:
        frac = (time.time() - t0) / seconds
        if frac >= 1:
            break
        lr_now = base_lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * frac))
        for gr in opt.param_groups:
            gr["lr"] = lr_now
        idx = torch.randint(0, len(latents), (batch,), device=DEV)
        z0 = latents[idx]
        noise = torch.randn_like(z0)
        t = sample_t(batch, opts.get("t_high", 0.0), opts.get("t_from", 0), DEV)
        cond = embeds[idx].float()
        if opts.get("word_drop"):
            cond = hide_words(cond, ends[idx], opts["word_drop"])
        drop = torch.rand(batch, device=DEV) < cfg.cfg_dropout
        cond = torch.where(drop[:, None, None], uncond.expand_as(cond), cond)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            pred = unet(ns.add_noise(z0, noise, t), t, cond).sample
        per = F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3))
        w = loss_weights(t, ns.alphas_cumprod, opts["w_max"]) if "w_max" in opts \
            else torch.ones_like(per)
        loss = (w * per).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        step += 1
        if step % 100 == 0:
            logs.append(round(loss.item(), 4))
        if snap_steps and step == snap_steps:
            snap(f"s{snap_steps}")
        if time.time() - last_snap > 45:
            snap("last")
            last_snap = time.time()
            print(f"{variant}: step {step} {time.time() - t0:.0f}s loss {logs[-1] if logs else '-'}",
                  flush=True)
    snap("last")
    print(f"{variant}: done {step} steps in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--variant")
    p.add_argument("--seconds", type=float, default=150)
    p.add_argument("--n", type=int, default=30000)
    p.add_argument("--cache", default="/tmp/scenes_cache.pt")
    p.add_argument("--out", default="out/scenes-variants")
    p.add_argument("--snap-steps", type=int, default=6000)
    p.add_argument("--init", help="a UNet folder to fine-tune (default: a fresh UNet)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the build's)")
    p.add_argument("--workers", type=int, default=14, help="rendering processes (--prepare)")
    a = p.parse_args()
    if a.prepare:
        prepare(Path(a.cache), a.n, a.workers)
    else:
        train(Path(a.cache), a.variant, a.seconds, Path(a.out), a.snap_steps, a.init, a.lr)
