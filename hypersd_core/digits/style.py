"""A second digits backbone in another style, made the way users make style models from
SD: a full fine-tune of the teacher's UNet on restyled training digits.

The style is "glow": every stroke keeps its colour and gains a soft halo (the ink,
dilated and blurred, at 45% intensity). The captions are unchanged (the style is the
model's, not a prompt word). The digits VAE reconstructs the glow well (L1 0.021 on
held-out digits, against 0.009 for plain ones), unlike fine textures such as stripes
(0.09), which it cannot represent.

A small style-recognition network (plain vs glow, the evaluation nets' SmallCNN) is
trained only for measuring. ``python -m hypersd_core build-style`` rebuilds both.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypersd_core.digits.finetune import encode_training_set, warmup_cosine
from hypersd_core.paths import DIGITS_DIR, DIGITS_EVAL, DIGITS_PIPELINE
from hypersd_core.worlds import digits

STYLE = "glow"
STYLE_PIPELINE = DIGITS_DIR / f"style-{STYLE}"
STYLE_NET = DIGITS_EVAL / f"style-{STYLE}.safetensors"
GLOW = 0.45


@dataclass
class StyleConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 50
    ema_decay: float = 0.99
    cfg_dropout: float = 0.1
    style_net_steps: int = 300
    seed: int = 0
    max_seconds: float = 0.0  # > 0: stop after this long (steps_done is recorded)


def glow(ink: torch.Tensor) -> torch.Tensor:
    """Ink [..., H, W] in [0,1] -> the glow style's ink: max(ink, 0.45 blur(dilate(ink)))."""
    shape = ink.shape
    x = ink.reshape(-1, 1, *shape[-2:])
    halo = F.avg_pool2d(F.max_pool2d(x, 5, 1, 2), 5, 1, 2, count_include_pad=False)
    return torch.maximum(x, GLOW * halo).reshape(shape)


def style_tensors(split: str = "train") -> dict[str, torch.Tensor]:
    """DigitsDataset(split).tensors() with every image drawn in the glow style."""
    data = digits.DigitsDataset(split).tensors()
    ds = digits.DigitsDataset(split)
    idx = torch.as_tensor(ds.indices).repeat_interleave(len(ds.colours))
    col = torch.arange(len(ds.colours)).repeat(len(ds.indices))
    rgb = torch.tensor([digits.COLOURS[c] for c in ds.colours], dtype=torch.float32) / 255.0
    ink = glow(digits.ink_32()[idx])
    data["images"] = (ink[:, None] * rgb[col][:, :, None, None]) * 2 - 1
    return data


def finetune_unet(backbone, cfg: StyleConfig, log=print):
    """Fine-tune (all weights) a copy of the backbone's UNet on glow digits; EMA weights.
    Returns (unet, seconds, steps done)."""
    from diffusers import UNet2DConditionModel

    dev = backbone.device
    data = style_tensors("train")
    gen = torch.Generator().manual_seed(cfg.seed)
    latents, embeds, uncond, prompt_of = encode_training_set(backbone, data)
    unet = UNet2DConditionModel.from_config(backbone.unet.config).to(dev)
    unet.load_state_dict(backbone.unet.state_dict())
    unet.float().train().requires_grad_(True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    ac = backbone.alphas_cumprod.float().to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    t0 = time.perf_counter()
    done = 0
    for step in tqdm(range(cfg.steps), desc=f"style {STYLE}", mininterval=10):
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
            break
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen).to(dev)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, backbone.num_train_timesteps, (len(idx),), generator=gen).to(dev)
        a = ac[t].view(-1, 1, 1, 1)
        cond = embeds[prompt_of[idx]]
        drop = (torch.rand(len(idx), generator=gen) < cfg.cfg_dropout).to(dev)
        cond = torch.where(drop[:, None, None], uncond.expand_as(cond), cond)
        loss = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        done = step + 1
        if step % 100 == 0:
            log(f"style step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f} s")
    return ema.eval(), time.perf_counter() - t0, done


def save_style_pipeline(unet, out: str | Path, info: dict) -> Path:
    """A full diffusers pipeline folder: the base's VAE, text encoder, tokenizer and
    scheduler, the fine-tuned UNet (fp16); ``_hypersd`` names its kind, style and base."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(DIGITS_PIPELINE, out, ignore=shutil.ignore_patterns("unet"))
    unet.to("cpu", torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_hypersd"] = {**index.get("_hypersd", {}), "style": STYLE, "base": "digits",
                         "finetune": info}
    index_path.write_text(json.dumps(index, indent=2))
    return out


def train_style_net(steps: int, generator: torch.Generator, out: str | Path = STYLE_NET):
    """Plain (0) vs glow (1) classifier on the train split; saved as safetensors."""
    from safetensors.torch import save_file

    from hypersd_core.digits.evalnets import train_classifier

    plain = digits.DigitsDataset("train").tensors()["images"]
    styled = style_tensors("train")["images"]
    images = torch.cat([plain, styled])
    targets = torch.cat([torch.zeros(len(plain)), torch.ones(len(styled))]).long()
    net = train_classifier(images, targets, 2, steps, generator, "style net")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return net


def load_style_net(path: str | Path = STYLE_NET):
    from safetensors.torch import load_file

    from hypersd_core.digits.evalnets import SmallCNN

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"style network {path} is missing; rebuild it with "
                                "`python -m hypersd_core build-style`")
    net = SmallCNN(2)
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def build_style(out: str | Path = STYLE_PIPELINE, cfg: StyleConfig | None = None,
                device: str = "cpu", net_out: str | Path = STYLE_NET, log=print) -> dict:
    """Fine-tune the glow backbone and train the style net; return the timings."""
    from hypersd_core.models.backbone import load_backbone

    cfg = cfg or StyleConfig()
    torch.manual_seed(cfg.seed)
    backbone = load_backbone("digits", device=device)
    unet, seconds, done = finetune_unet(backbone, cfg, log=log)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else \
        f"cpu, {torch.get_num_threads()} thread(s)"
    info = {"config": asdict(cfg), "steps_done": done, "seconds": round(seconds, 1),
            "device": where}
    save_style_pipeline(unet, out, info)
    t0 = time.perf_counter()
    train_style_net(cfg.style_net_steps, torch.Generator().manual_seed(cfg.seed), net_out)
    info["style_net_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"wrote {out} and {net_out}: {json.dumps(info)}")
    return info
