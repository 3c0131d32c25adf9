"""Build the digits world from scratch on a CPU: VAE, then a contrastive tiny CLIP
text encoder (frozen), then the UNet with CFG dropout; then the evaluation networks.

The result is a stock diffusers ``StableDiffusionPipeline`` folder in
``assets/digits/pipeline`` plus ``assets/digits/eval``. ``python -m hypersd_core
build-digits`` runs it (progress bars; total time printed).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypersd_core.paths import DIGITS_DIR
from hypersd_core.worlds import digits

GUIDANCE_SCALE = 2.0  # recommended CFG of the digits teacher: best FD at >= 99% accuracy (README)


@dataclass
class BuildConfig:
    vae_steps: int = 800
    clip_steps: int = 400
    unet_steps: int = 3500
    eval_steps: int = 1000
    batch_size: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    seed: int = 0


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=digits.RESOLUTION,
    )


def text_config(vocab_size: int, bos: int, eos: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=digits.MAX_TOKENS, projection_dim=64,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )


def unet_config() -> dict:
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8,
    )


def scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def train_vae(images: torch.Tensor, cfg: BuildConfig, generator: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps)
    bar = tqdm(_batches(len(images), cfg.batch_size, cfg.vae_steps, generator),
               total=cfg.vae_steps, desc="vae")
    for idx in bar:
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=generator)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(images[i:i + 512]).latent_dist.mean
                          for i in range(0, len(images), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return vae


class _ImageTower(torch.nn.Module):
    """A small CNN image encoder, used only to train the text encoder contrastively."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(64, 64, 3, 2, 1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, dim),
        )

    def forward(self, x):
        return self.net(x)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_text_encoder(tokenizer, data: dict, cfg: BuildConfig, generator: torch.Generator):
    """Tiny CLIP: text transformer + CNN image tower trained with the InfoNCE loss."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(
        len(vocab), vocab[digits.SPECIAL_BOS], vocab[digits.SPECIAL_EOS])))
    proj = torch.nn.Linear(64, 64, bias=False)
    tower = _ImageTower()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*text_encoder.parameters(), *proj.parameters(), *tower.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = tokenize(tokenizer, [p for p, _, _ in digits.ALL_PROMPTS])
    prompt_of = data["digits"] * len(digits.COLOUR_NAMES) + data["colours"]
    bar = tqdm(_batches(len(prompt_of), cfg.batch_size * 2, cfg.clip_steps, generator),
               total=cfg.clip_steps, desc="text encoder (contrastive)")
    for idx in bar:
        p = prompt_of[idx]
        txt = F.normalize(proj(text_encoder(ids[p]).pooler_output), dim=-1)
        img = F.normalize(tower(data["images"][idx]), dim=-1)
        logits = logit_scale.exp() * img @ txt.T
        same = (p[:, None] == p[None, :]).float()  # repeated captions are positives too
        target = same / same.sum(1, keepdim=True)
        loss = -(target * logits.log_softmax(1)).sum(1).mean() \
            - (target.T * logits.T.log_softmax(1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        (loss / 2).backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item() / 2:.3f}")
    return text_encoder.eval().requires_grad_(False)


def train_unet(latents, prompt_of, embeds, uncond, cfg: BuildConfig, generator):
    """Epsilon-prediction UNet on precomputed latents, CFG dropout, EMA weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_config())
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items()
                                   if k in ("num_train_timesteps", "beta_start", "beta_end",
                                            "beta_schedule", "prediction_type")})
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-4)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.unet_steps)))
    bar = tqdm(_batches(len(latents), cfg.batch_size, cfg.unet_steps, generator),
               total=cfg.unet_steps, desc="unet")
    for step, idx in enumerate(bar):
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, 1000, (len(idx),), generator=generator)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = embeds[prompt_of[idx]]
        drop = torch.rand(len(idx), generator=generator) < cfg.cfg_dropout
        cond = torch.where(drop[:, None, None], uncond.expand_as(cond), cond)
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


def build(out_dir: str | Path = DIGITS_DIR, cfg: BuildConfig | None = None,
          parts: tuple[str, ...] = ("pipeline", "eval")) -> dict:
    """Train every part of the digits world and save it; return timings in seconds."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    cfg = cfg or BuildConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    data = digits.DigitsDataset("train").tensors()
    times: dict[str, float] = {}
    if "pipeline" in parts:
        tok_dir = out_dir / "pipeline" / "tokenizer"
        digits.write_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

        t0 = time.perf_counter()
        vae = train_vae(data["images"], cfg, generator)
        times["vae"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        text_encoder = train_text_encoder(tokenizer, data, cfg, generator)
        times["text_encoder"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            latents = torch.cat([vae.encode(data["images"][i:i + 512]).latent_dist.mean
                                 for i in range(0, len(data["images"]), 512)])
            latents = latents * vae.config.scaling_factor
            prompts = [p for p, _, _ in digits.ALL_PROMPTS] + [""]
            embeds = text_encoder(tokenize(tokenizer, prompts))[0]
        prompt_of = data["digits"] * len(digits.COLOUR_NAMES) + data["colours"]
        unet = train_unet(latents, prompt_of, embeds[:-1], embeds[-1:], cfg, generator)
        times["unet"] = time.perf_counter() - t0

        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.to(torch.float16).save_pretrained(out_dir / "pipeline", safe_serialization=True)
        # weights are stored fp16, but a plain from_pretrained (no torch_dtype) must give one
        # dtype everywhere: diffusers upcasts its models to fp32; transformers follows "dtype"
        te_config = out_dir / "pipeline" / "text_encoder" / "config.json"
        te = json.loads(te_config.read_text())
        te["dtype"] = "float32"
        te_config.write_text(json.dumps(te, indent=2))
        index_path = out_dir / "pipeline" / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_hypersd"] = {"kind": "digits", "guidance_scale": GUIDANCE_SCALE,
                             "resolution": digits.RESOLUTION, "build": asdict(cfg)}
        index_path.write_text(json.dumps(index, indent=2))
    if "eval" in parts:
        from hypersd_core.digits.evalnets import train_eval_nets

        t0 = time.perf_counter()
        train_eval_nets(out_dir / "eval", data, steps=cfg.eval_steps, generator=generator)
        times["eval_nets"] = time.perf_counter() - t0
    times["total"] = sum(times.values())
    (out_dir / "build_times.json").write_text(json.dumps(times, indent=2))
    return times
