"""Build the scenes world from scratch on a CPU, resumably.

Phases, each saved in the work folder when done (a finished phase is never redone):

1. ``data``: render the training scenes (uint8, in chunks);
2. ``vae``: a 64x64 -> 4x16x16 AutoencoderKL;
3. ``text_encoder``: a tiny CLIP text model trained to encode each caption's meaning
   (every slot of the grammar: template, relation, count, each object's class, colour, size);
4. ``unet``: an epsilon-prediction UNet on the cached latents with CFG dropout and EMA;
5. ``pipeline``: the stock diffusers ``StableDiffusionPipeline`` folder, stored fp16;
6. ``eval``: the evaluation nets (``hypersd_core.scenes.evalnets``), trained on a split
   disjoint from training and rewards.

Long phases checkpoint every ``checkpoint_every`` steps (model, optimiser, schedule, EMA and
random state), so a stopped build resumes where it stopped and ends on the same weights.
``python -m hypersd_core build-scenes`` runs it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypersd_core.digits.build import scheduler_config  # SD's schedule, shared by both worlds
from hypersd_core.paths import ROOT, SCENES_DIR
from hypersd_core.scenes.captions import (
    LAYOUT_SIZES,
    SLOT_SIZES,
    caption_ends,
    caption_slots,
    hide_words,
    layout_loss,
    layout_slots,
    tokenize,
)
from hypersd_core.worlds import scenes as world

GUIDANCE_SCALE = 3.0  # recommended CFG of the scenes teacher (docs/scenes.md)
PHASES = ("data", "vae", "text_encoder", "unet", "pipeline", "eval")


@dataclass
class SceneBuildConfig:
    n_train: int = 30_000
    vae_steps: int = 1100
    vae_fg_weight: float = 4.0  # extra weight of object pixels (colour fidelity of small objects)
    vae_fg_from: int = 600  # ... from this step on
    vae_batch: int = 16
    text_steps: int = 1500
    # the states after the caption (its end token and the padding, which see all of it)
    # also name what the caption puts in each half of the image: padding position p
    # speaks for half p % 4 (left, right, top, bottom), for the UNet's cross-attention to
    # fetch "what goes on my side" by position (LAYOUT_HALVES). It has not yet taught the
    # teacher the relations (docs/scenes.md, criterion (a))
    text_layout: bool = True
    # the share of UNet training captions whose word states are hidden (replaced by the
    # start token's state), leaving the states from the caption's end on: the text encoder
    # is causal, so only those know the whole caption (the first object's words cannot
    # know the relation after them); the UNet must learn to read the layout there
    unet_word_drop: float = 0.0
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    eval_steps: int = 1200
    eval_images: int = 12_000
    checkpoint_every: int = 100
    seed: int = 0
    # model widths (the tiny test build shrinks these)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    text_hidden: int = 96
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (48, 96, 96)

    def __post_init__(self):
        for name in ("n_train", "vae_steps", "vae_batch", "text_steps", "unet_steps",
                     "unet_batch", "eval_steps", "eval_images", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


TINY = dict(n_train=64, vae_steps=3, vae_batch=4, text_steps=3, unet_steps=3, unet_batch=4,
            eval_steps=3, eval_images=64, checkpoint_every=2, vae_channels=(8, 16, 16),
            text_hidden=32, text_layers=1, unet_channels=(16, 32, 32))


def vae_config(cfg: SceneBuildConfig) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        norm_num_groups=min(16, cfg.vae_channels[0]), sample_size=world.RESOLUTION,
        mid_block_add_attention=False,
    )


def text_config(cfg: SceneBuildConfig, vocab_size: int, bos: int, eos: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden,
        intermediate_size=2 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=4, max_position_embeddings=world.MAX_TOKENS,
        projection_dim=cfg.text_hidden, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )


def unet_config(cfg: SceneBuildConfig) -> dict:
    """One plain level at 16x16, cross-attention below it (one level per channel entry)."""
    deep = len(cfg.unet_channels) - 1
    return dict(
        sample_size=world.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels), norm_num_groups=16,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * deep,
        up_block_types=("CrossAttnUpBlock2D",) * deep + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=16,
    )


# ---------------------------------------------------------------- resumable loops

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resumable_loop(name: str, work: Path, modules: dict, opt, sched, steps: int,
                   step_fn: Callable[[int, torch.Generator], dict], cfg: SceneBuildConfig,
                   after_step: Callable[[int], None] | None = None) -> None:
    """Run ``step_fn(step, generator)`` for ``steps`` steps, checkpointing every
    ``cfg.checkpoint_every`` steps into ``work/<name>.ckpt``; resume from it if present."""
    ckpt = work / f"{name}.ckpt"
    generator = torch.Generator().manual_seed(cfg.seed + zlib.crc32(name.encode()) % 1000)
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        print(f"{name}: resuming at step {start}/{steps}", flush=True)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, mininterval=10)
    for step in bar:
        logs = step_fn(step, generator)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(step)
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            _atomic_save({"modules": {k: m.state_dict() for k, m in modules.items()},
                          "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "generator": generator.get_state(),
                          "torch_rng": torch.get_rng_state(), "step": step + 1}, ckpt)


def _warmup_cosine(opt, steps: int, warm: int = 100):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))


# ---------------------------------------------------------------- phases

def build_data(work: Path, cfg: SceneBuildConfig, chunk: int = 2000) -> dict:
    """Render the training split in chunks (each saved; a stop loses one chunk at most)."""
    parts = work / "data"
    parts.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, cfg.n_train, chunk), desc="render", mininterval=10):
        path = parts / f"{start:08d}.pt"
        if path.is_file():
            continue
        items = world.scenes("train", min(chunk, cfg.n_train - start), start)
        _atomic_save({"images": world.render_many(items),
                      "prompts": [s.prompt for s in items]}, path)
    chunks = [torch.load(p, weights_only=True) for p in sorted(parts.glob("*.pt"))]
    return {"images": torch.cat([c["images"] for c in chunks])[:cfg.n_train],
            "prompts": [p for c in chunks for p in c["prompts"]][:cfg.n_train]}


def train_vae(work: Path, images_u8: torch.Tensor, cfg: SceneBuildConfig):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config(cfg))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = _warmup_cosine(opt, cfg.vae_steps, warm=50)

    background = world.to_model(torch.tensor(world.BACKGROUND, dtype=torch.uint8)).view(1, 3, 1, 1)

    def step(i, g):
        x = world.to_model(images_u8[torch.randint(0, len(images_u8), (cfg.vae_batch,),
                                                   generator=g)])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=g)).sample
        weight = torch.ones_like(x[:, :1])
        if i >= cfg.vae_fg_from:  # objects are ~15% of pixels: their colour errors weigh more
            weight = weight + cfg.vae_fg_weight * ((x - background).abs().amax(1, keepdim=True)
                                                   > 0.1).float()
        err = recon - x
        rec = (weight * err.pow(2)).mean() + 0.5 * (weight * err.abs()).mean()
        kl = post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        (rec + 1e-4 * kl).backward()
        return {"rec": rec.item(), "kl": kl.item()}

    resumable_loop("vae", work, {"vae": vae}, opt, sched, cfg.vae_steps, step, cfg)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(world.to_model(images_u8[i:i + 256])).latent_dist.mean
                          for i in range(0, min(len(images_u8), 4096), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return vae


def train_text_encoder(work: Path, tokenizer, cfg: SceneBuildConfig):
    """Tiny CLIP text model whose pooled (EOS) state must name every slot of the caption."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(
        cfg, len(vocab), vocab[world.SPECIAL_BOS], vocab[world.SPECIAL_EOS])))
    heads = torch.nn.ModuleList(torch.nn.Linear(cfg.text_hidden, n) for n in SLOT_SIZES)
    modules = {"text": text_encoder, "heads": heads}
    if cfg.text_layout:
        modules["layout"] = torch.nn.ModuleList(torch.nn.Linear(cfg.text_hidden, n)
                                                for n in LAYOUT_SIZES)
    opt = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=1e-3)
    sched = _warmup_cosine(opt, cfg.text_steps, warm=50)
    eos = vocab[world.SPECIAL_EOS]

    def step(i, g):
        seeds = torch.randint(0, world.SPLIT_SIZE, (128,), generator=g).tolist()
        batch = [world.sample_scene(world.scene_seed("train", s)) for s in seeds]
        slots = torch.tensor([caption_slots(s) for s in batch])
        ids = tokenize(tokenizer, [s.prompt for s in batch])
        out = text_encoder(ids)
        loss = sum(F.cross_entropy(h(out.pooler_output), slots[:, j])
                   for j, h in enumerate(heads))
        logs = {"loss": loss.item()}
        if cfg.text_layout:
            lay = layout_loss(out.last_hidden_state, ids, eos, modules["layout"],
                              torch.tensor([layout_slots(s) for s in batch]))
            loss = loss + lay
            logs["layout"] = lay.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return logs

    resumable_loop("text_encoder", work, modules, opt, sched, cfg.text_steps, step, cfg)
    return text_encoder.eval().requires_grad_(False)


def train_unet(work: Path, latents, embeds, uncond, cfg: SceneBuildConfig):
    """Epsilon-prediction UNet on cached latents, CFG dropout, EMA weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_config(cfg))
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items()
                                   if k in ("num_train_timesteps", "beta_start", "beta_end",
                                            "beta_schedule", "prediction_type")})
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-4)
    sched = _warmup_cosine(opt, cfg.unet_steps, warm=200)

    ends = caption_ends(len(latents)) if cfg.unet_word_drop > 0 else None

    def step(_, g):
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        cond = embeds[idx].float()
        if ends is not None:
            cond = hide_words(cond, ends[idx], cfg.unet_word_drop, g)
        drop = torch.rand(len(idx), generator=g) < cfg.cfg_dropout
        cond = torch.where(drop[:, None, None], uncond.expand_as(cond), cond)
        loss = F.mse_loss(unet(noise_sched.add_noise(z0, noise, t), t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        return {"loss": loss.item()}

    def ema_update(step):
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)

    resumable_loop("unet", work, {"unet": unet, "ema": ema}, opt, sched, cfg.unet_steps,
                   step, cfg, after_step=ema_update)
    return ema.eval()


def _save_part(module, work: Path, name: str) -> None:
    module.save_pretrained(work / name, safe_serialization=True)


def build(out_dir: str | Path = SCENES_DIR, work: str | Path | None = None,
          cfg: SceneBuildConfig | None = None, phases: tuple[str, ...] = PHASES) -> dict:
    """Build (or resume building) the scenes world; return seconds per phase run now."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = cfg or SceneBuildConfig()
    out_dir = Path(out_dir)
    work = Path(work) if work else ROOT / "runs" / "build-scenes"
    work.mkdir(parents=True, exist_ok=True)
    saved_cfg = work / "config.json"
    if saved_cfg.is_file() and json.loads(saved_cfg.read_text()) != json.loads(
            json.dumps(asdict(cfg))):
        raise ValueError(f"{work} holds a build with another configuration; pass a new --work "
                         "folder or delete that one")
    saved_cfg.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}

    def timed(phase: str, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        times[phase] = {"wall_s": times.get(phase, {}).get("wall_s", 0.0) + wall,
                        "cpu_s": times.get(phase, {}).get("cpu_s", 0.0) + cpu}
        times_path.write_text(json.dumps(times, indent=2))
        return out

    tok_dir = work / "tokenizer"
    world.write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    data = timed("data", lambda: build_data(work, cfg)) if "data" in phases else None

    if "vae" in phases and not (work / "vae").is_dir():
        _save_part(timed("vae", lambda: train_vae(work, data["images"], cfg)), work, "vae")
    if "text_encoder" in phases and not (work / "text_encoder").is_dir():
        _save_part(timed("text_encoder", lambda: train_text_encoder(work, tokenizer, cfg)),
                   work, "text_encoder")
    if "unet" in phases and not (work / "unet").is_dir():
        def unet_phase():
            vae = AutoencoderKL.from_pretrained(work / "vae")
            text_encoder = CLIPTextModel.from_pretrained(work / "text_encoder")
            cache = work / "latents.pt"
            if cache.is_file():
                c = torch.load(cache, weights_only=True)
            else:
                with torch.no_grad():
                    lat = torch.cat([vae.encode(world.to_model(data["images"][i:i + 256]))
                                     .latent_dist.mean for i in range(0, cfg.n_train, 256)])
                    emb = torch.cat([text_encoder(tokenize(tokenizer, data["prompts"][i:i + 512]))[0]
                                     for i in range(0, cfg.n_train, 512)])
                    unc = text_encoder(tokenize(tokenizer, [""]))[0]
                c = {"latents": lat * vae.config.scaling_factor, "embeds": emb.half(),
                     "uncond": unc}
                _atomic_save(c, cache)
            return train_unet(work, c["latents"], c["embeds"], c["uncond"], cfg)
        _save_part(timed("unet", unet_phase), work, "unet")
    if "pipeline" in phases:
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(work / "vae"),
            text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
            tokenizer=tokenizer, unet=UNet2DConditionModel.from_pretrained(work / "unet"),
            scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.to(torch.float16).save_pretrained(out_dir / "pipeline", safe_serialization=True)
        te_config = out_dir / "pipeline" / "text_encoder" / "config.json"
        te = json.loads(te_config.read_text())
        te["dtype"] = "float32"  # stored fp16, loaded fp32 like every other part
        te_config.write_text(json.dumps(te, indent=2))
        index_path = out_dir / "pipeline" / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_hypersd"] = {"kind": "scenes", "guidance_scale": GUIDANCE_SCALE,
                             "resolution": world.RESOLUTION, "build": asdict(cfg)}
        index_path.write_text(json.dumps(index, indent=2))
    if "eval" in phases and not (out_dir / "eval" / "detector.safetensors").is_file():
        from hypersd_core.scenes.evalnets import train_eval_nets

        timed("eval", lambda: train_eval_nets(out_dir / "eval", cfg.eval_images, cfg.eval_steps,
                                              seed=cfg.seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    total = {k: round(v["wall_s"], 1) for k, v in times.items()}
    summary = {"wall_s": total, "cpu_s": {k: round(v["cpu_s"], 1) for k, v in times.items()},
               "total_wall_s": round(sum(total.values()), 1), "config": asdict(cfg)}
    (out_dir / "build_times.json").write_text(json.dumps(summary, indent=2))
    return summary
