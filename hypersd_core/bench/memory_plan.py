"""Expected peak GPU memory of each training stage, counted on the "meta" device.

``python -m hypersd_core.bench.memory_plan [--kinds sd15,sdxl] [--out FILE]``

The real SD1.5 / SDXL architectures (``assets/configs``) are built on the meta device
(no memory, no weights), in the dtype training uses, with the preset's LoRA; one
training step of the stage (the stage's own ``loss``, backward, AdamW step) runs on
meta tensors under a dispatch mode that plays allocator: every tensor an op makes is
counted until it is freed, and the peak is kept. Frozen weights (UNet, VAE, text
encoders: all resident in ``train``) are added. Attention is counted as a fused kernel
(flash / memory-efficient: q, k, v, out and the log-sum-exp kept for backward), as
PyTorch's SDPA runs on a GPU, not the materialised attention matrix of the math path.

Not counted: the CUDA context and cuBLAS/cuDNN workspaces (~0.5-1 GiB), the caching
allocator's fragmentation (reserved exceeds allocated by ~5-15%), the reward models of
the feedback / DMD stages (replaced by a stand-in: ImageReward + the aesthetic
predictor add ~1-2 GiB in bf16), and the data pipeline. Meta tensors have no values:
``.item()`` reads 0 and branches on tensor values take the "false" side.

An upper bound on one point: meta tensors have no autocast, so the fp32 LoRA layers
keep an fp32 copy of their input for backward where autocast keeps a bf16 one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2**30
SHIPPED_ROWS = Path(__file__).resolve().parents[2] / "assets" / "results" / "memory_plan.json"


class AllocatorCount(TorchDispatchMode):
    """Live bytes of the tensors made under the mode (storages counted once), and the peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage id -> [tensor count, bytes]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._track(t)
        return out


class _FusedAttention(torch.autograd.Function):
    """SDPA as a fused kernel: saves q, k, v, out and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FusedAttention.apply(q, k, v)


@contextlib.contextmanager
def meta_semantics():
    """Values of meta tensors read as 0 / False; SDPA counted as a fused kernel."""
    item, boolean, sdpa = torch.Tensor.item, torch.Tensor.__bool__, F.scaled_dot_product_attention

    def meta_item(self):
        return 0 if self.device.type == "meta" else item(self)

    def meta_bool(self):
        return False if self.device.type == "meta" else boolean(self)

    torch.Tensor.item, torch.Tensor.__bool__ = meta_item, meta_bool
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.__bool__ = item, boolean
        F.scaled_dot_product_attention = sdpa


def _module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def count_stage(kind: str, stage_name: str, batch: int, checkpointing: bool,
                dtype: torch.dtype = torch.bfloat16, lora_rank: int | None = None,
                res: int | None = None) -> dict:
    """Peak memory (GiB) of one training step of a smoke stage (``bench/gpu_train.py``)
    at full size on the meta device, with the frozen weights resident."""
    from hypersd_core.bench.gpu_train import StandInReward, smoke_config
    from hypersd_core.models.backbone import Backbone
    from hypersd_core.models.random_model import build_pipeline, load_configs
    from hypersd_core.training.data import Batch
    from hypersd_core.training.trainer import enable_checkpointing, make_stage, setup_student

    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    cfg = smoke_config(kind, stage_name, precision, precision)
    cfg.batch_size = batch
    cfg.gradient_checkpointing = "on" if checkpointing else "off"
    if lora_rank:
        cfg.lora_rank, cfg.lora_alpha = lora_rank, float(lora_rank)
    with meta_semantics():
        pipe = build_pipeline(kind, load_configs(kind), "meta", dtype)
        bb = Backbone(kind, f"random:{kind}", pipe, 7.5)
        res = res or bb.resolution
        frozen = sum(_module_bytes(getattr(pipe, n)) for n in
                     ("unet", "vae", "text_encoder", "text_encoder_2")
                     if getattr(pipe, n, None) is not None)
        # autocast's casts at the model inputs (meta tensors have no autocast)
        for module in (pipe.unet, pipe.vae.post_quant_conv, pipe.vae.decoder):
            module.register_forward_pre_hook(_cast_first_input)
        params = setup_student(bb, cfg)
        stage = make_stage(cfg, bb)
        if hasattr(stage, "setup"):
            params = stage.setup(params)
        pipe.unet.to("meta")  # PEFT makes a second adapter's layers on the CPU beside meta ones
        if getattr(stage, "losses", None) is not None and stage.losses.rewards:
            stage.losses.rewards = {n: StandInReward() for n in stage.losses.rewards}
        if checkpointing:
            enable_checkpointing(bb, cfg, use_cuda=True)
        adapters = sum(p.numel() * p.element_size() for n, p in pipe.unet.named_parameters()
                       if "lora_" in n)
        heads = 0
        disc = getattr(stage, "discriminator", None)
        if disc is not None:
            heads = _module_bytes(disc.disc.heads)
        f = pipe.vae_scale_factor
        hidden = pipe.unet.config.cross_attention_dim
        with torch.device("meta"):
            embeds = _embeds(kind, batch, hidden, res)
            uncond = _embeds(kind, batch, hidden, res)
            data = Batch(torch.empty(batch, 4, res // f, res // f), embeds, uncond,
                         ["a photo"] * batch, torch.empty(batch, 3, res, res))
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        mode = AllocatorCount()
        with mode:
            # DMD: critic-only, then both; the adversarial term: a D step, then a G step
            for step in range(2 if cfg.stage == "dmd" or cfg.adv_weight > 0 else 1):
                optimizer.zero_grad(set_to_none=True)
                if hasattr(stage, "begin_step"):
                    stage.begin_step(step)
                loss, _ = stage.loss(data, torch.Generator().manual_seed(step))
                if loss is not None:
                    loss.float().mean().backward()
                    optimizer.step()
                if hasattr(stage, "after_step"):
                    stage.after_step(step)
        activations = mode.peak
    return {"kind": kind, "stage": stage_name, "batch": batch, "resolution": res,
            "lora_rank": cfg.lora_rank, "checkpointing": checkpointing,
            "frozen_gib": round(frozen / GIB, 2), "adapters_gib": round((adapters + heads) / GIB, 2),
            "step_peak_gib": round(activations / GIB, 2),
            "peak_gib": round((frozen + adapters + heads + activations) / GIB, 1)}


def _cast_first_input(module, args):
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        dtype = next(module.parameters()).dtype
        return (args[0].to(dtype), *args[1:])
    return None


def _embeds(kind: str, batch: int, hidden: int, res: int):
    from hypersd_core.models.backbone import PromptEmbeds

    if kind == "sdxl":
        return PromptEmbeds(torch.empty(batch, 77, hidden, dtype=torch.bfloat16),
                            torch.empty(batch, 1280, dtype=torch.bfloat16),
                            torch.empty(batch, 6, dtype=torch.bfloat16))
    return PromptEmbeds(torch.empty(batch, 77, hidden, dtype=torch.bfloat16))


PLAN_STAGES = ("tscd", "tscd_adv", "feedback", "dmd")  # LCM and TCD count as TSCD


def preset_batch(kind: str, stage_name: str) -> int:
    from hypersd_core.bench.gpu_train import SMOKE_STAGES
    from hypersd_core.training.config import load_preset

    return load_preset(f"{kind}-{SMOKE_STAGES[stage_name][0]}").batch_size


CARDS_GIB = (24, 48, 80)
CONTEXT_GIB = 1.5  # CUDA context, cuBLAS / cuDNN workspaces
FRAGMENTATION = 1.1  # the caching allocator reserves more than it allocates
REWARD_GIB = 2.0  # ImageReward + the aesthetic predictor (bf16) in feedback / DMD


def needed_gib(rows: list[dict], kind: str, stage: str, batch: int, checkpointing: bool) -> float:
    """Card memory a setting needs: the counted peak (interpolated in the batch from the
    counted rows) x fragmentation + context (+ the reward models)."""
    mine = {(r["batch"], r["checkpointing"]): r for r in rows
            if r["kind"] == kind and r["stage"] == stage}
    base = next(iter(mine.values()))
    fixed = base["frozen_gib"] + base["adapters_gib"]
    one, big = mine[(1, True)], max((r for r in mine.values() if r["checkpointing"]),
                                     key=lambda r: r["batch"])
    per_sample_on = ((big["step_peak_gib"] - one["step_peak_gib"]) / max(1, big["batch"] - 1))
    if checkpointing:
        step = one["step_peak_gib"] + per_sample_on * (batch - 1)
    else:  # counted at the preset's batch only
        step = mine[(batch, False)]["step_peak_gib"]
    extra = REWARD_GIB if stage in ("feedback", "dmd") else 0.0
    return (fixed + step) * FRAGMENTATION + CONTEXT_GIB + extra


def card_settings(rows: list[dict], kind: str, stage: str, card: float) -> str:
    """A setting that keeps the preset's effective batch on a ``card`` GiB card: the
    preset's batch without checkpointing if it fits (counted), else checkpointing on with
    the largest batch that fits (linear between the counted batches, at most twice the
    preset's)."""
    from hypersd_core.bench.gpu_train import SMOKE_STAGES
    from hypersd_core.training.config import load_preset

    cfg = load_preset(f"{kind}-{SMOKE_STAGES[stage][0]}")
    total = cfg.batch_size * cfg.grad_accum
    if needed_gib(rows, kind, stage, cfg.batch_size, False) <= card:
        return f"batch {cfg.batch_size} x accum {cfg.grad_accum}, checkpointing off"
    for b in sorted({b for b in (cfg.batch_size * 2, cfg.batch_size, 4, 2, 1)
                     if total % b == 0 and b <= 2 * cfg.batch_size}, reverse=True):
        if needed_gib(rows, kind, stage, b, True) <= card:
            return f"batch {b} x accum {total // b}"
    return "does not fit"


def markdown(rows: list[dict]) -> str:
    """README's memory-plan table from the counted rows."""
    out = ["| model | stage | counted peak GiB, batch 1 (checkpointing) | preset batch: "
           "checkpointing on / off | 24 GB | 48 GB | 80 GB |", "|---" * 7 + "|"]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        for stage in dict.fromkeys(r["stage"] for r in rows if r["kind"] == kind):
            mine = {(r["batch"], r["checkpointing"]): r for r in rows
                    if r["kind"] == kind and r["stage"] == stage}
            b = max(bb for bb, _ in mine)
            on, off = mine.get((b, True)), mine.get((b, False))
            name = {"tscd": "TSCD / LCM / TCD", "tscd_adv": "TSCD + adversarial",
                    "feedback": "feedback", "dmd": "DMD"}[stage]
            cards = [card_settings(rows, kind, stage, c) if off else "-" for c in CARDS_GIB]
            out.append(f"| {kind} | {name} | {mine[(1, True)]['peak_gib']} | b{b}: "
                       f"{on['peak_gib'] if on else '-'} / {off['peak_gib'] if off else '-'} | "
                       + " | ".join(cards) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="sd15,sdxl")
    p.add_argument("--stages", default=",".join(PLAN_STAGES))
    p.add_argument("--out", help="JSON file for the rows (one JSON line each is printed too)")
    p.add_argument("--markdown", nargs="*", metavar="JSON",
                   help="print README's table from counted rows (files written by --out; "
                        "none: the shipped assets/results/memory_plan.json)")
    args = p.parse_args(argv)
    if args.markdown is not None:
        files = args.markdown or [SHIPPED_ROWS]
        missing = [str(f) for f in files if not Path(f).is_file()]
        if missing:
            p.error(f"no counted rows at {', '.join(missing)}: write them with --out FILE")
        print(markdown([r for f in files for r in json.loads(Path(f).read_text())]))
        return 0
    rows = []
    for kind in args.kinds.split(","):
        for stage in args.stages.split(","):
            b = preset_batch(kind, stage)  # checkpointing on at batch 1 and the preset's
            for ckpt, batch in ((True, 1), (True, b), (False, b)):  # batch; off at the preset's
                row = count_stage(kind, stage, batch, ckpt)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
