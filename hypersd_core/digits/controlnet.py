"""The digits ControlNet: ``ControlNetModel.from_unet`` on the digits teacher, trained on
the train split with each digit's own ink mask as the control image.

Why the ink mask and not an edge map: the digits are 32x32 with strokes two to four
pixels wide, so an edge map of a stroke is the stroke itself plus noise (no interior to
lose); a mask is what a user draws on a sketchpad, and it is exactly what the control
fidelity metric (IoU of the generated ink with the mask) compares against.

``python -m hypersd_core build-controlnet`` rebuilds it (a few minutes on one CPU
thread); the folder it writes, ``assets/digits/controlnet``, is a stock diffusers
ControlNet (fp16 weights, loaded as fp32 on the CPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hypersd_core.digits.finetune import encode_training_set, warmup_cosine
from hypersd_core.models.controlnet import DIGITS_CONTROLNET
from hypersd_core.worlds import digits

# the digits VAE downsamples 32 -> 8: two stride-2 convs in the conditioning embedding
CONDITIONING_CHANNELS = (16, 32, 64)


@dataclass
class ControlNetConfig:
    steps: int = 2500
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 50
    text_dropout: float = 0.1  # CFG still works under control: unconditional prompts seen
    seed: int = 0
    max_seconds: float = 0.0  # > 0: stop after this long (steps_done is recorded)


def control_tensor(masks: torch.Tensor) -> torch.Tensor:
    """Bool/float masks [B,H,W] -> control images [B,3,H,W] in [0,1], exactly what the
    stock pipeline's control-image processor gives for ``mask_image(mask)``."""
    x = masks.float().clamp(0, 1)
    x = torch.round(x * 255) / 255  # the uint8 round trip of a PIL image
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def make_controlnet(unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)


def train_controlnet(backbone, cfg: ControlNetConfig, log=print):
    """Train a ControlNet on ``backbone``'s frozen UNet; return (controlnet, seconds, steps)."""
    unet = backbone.unet.requires_grad_(False).eval()
    controlnet = make_controlnet(unet).float().to(backbone.device).train()
    data = digits.DigitsDataset("train").tensors()
    gen = torch.Generator().manual_seed(cfg.seed)
    latents, embeds, uncond, prompt_of = encode_training_set(backbone, data)
    dev = backbone.device
    control = control_tensor(data["masks"]).to(dev)
    ac = backbone.alphas_cumprod.float().to(dev)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    t0 = time.perf_counter()
    done = 0
    bar = tqdm(range(cfg.steps), desc="controlnet", mininterval=10)
    for step in bar:
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
            break
        done = step + 1
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen).to(dev)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, backbone.num_train_timesteps, (len(idx),), generator=gen).to(dev)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = embeds[prompt_of[idx]]
        drop = (torch.rand(len(idx), generator=gen) < cfg.text_dropout).to(dev)
        cond = torch.where(drop[:, None, None], uncond.expand_as(cond), cond)
        down, mid = controlnet(zt, t, encoder_hidden_states=cond, controlnet_cond=control[idx],
                               return_dict=False)
        pred = unet(zt, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(f"step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f} s")
    return controlnet.eval().requires_grad_(False), time.perf_counter() - t0, done


def save_controlnet(controlnet, out: str | Path, info: dict) -> Path:
    """Save in diffusers format, fp16 weights (a plain from_pretrained loads it as fp32)."""
    out = Path(out)
    controlnet.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    controlnet.to(torch.float32)
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return out


def build_controlnet(out: str | Path = DIGITS_CONTROLNET, cfg: ControlNetConfig | None = None,
                     device: str = "cpu", log=print) -> dict:
    """Train and save the digits ControlNet; return the training info (seconds included)."""
    from hypersd_core.models.backbone import load_backbone

    cfg = cfg or ControlNetConfig()
    torch.manual_seed(cfg.seed)
    backbone = load_backbone("digits", device=device)
    controlnet, seconds, done = train_controlnet(backbone, cfg, log=log)
    info = {"config": asdict(cfg), "steps_done": done,
            "seconds": round(seconds, 1), "control": "ink mask",
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else
            f"cpu, {torch.get_num_threads()} thread(s)"}
    save_controlnet(controlnet, out, info)
    log(f"wrote {out} in {seconds:.0f} s")
    return info
