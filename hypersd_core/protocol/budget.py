"""Equal budgets: what a compared row cost to train, in training samples, UNet
forward-equivalents, seconds and LoRA rank.

Forward-equivalents are counted, not declared: ``measure_step_cost`` runs a stage's
training steps (one full cycle of its schedule, e.g. DMD's critic and generator steps)
on the world's model with a counter on every UNet call. A call counts its batch rows; a
call made with gradients on counts 3 per row (the forward and a backward of about twice
its cost), one without counts 1. A call that a hook stops early (the discriminator's
encoder features) still counts as a whole forward: the figure is an upper bound there.
A row's budget includes its parents' (a run starts from its parent's adapter).
"""

from __future__ import annotations

import torch

BACKWARD_FACTOR = 2.0  # a backward costs about two forwards


class ForwardCounter:
    """Counts UNet rows forwarded while active: ``rows`` (no gradients) and ``rows_grad``."""

    def __init__(self, class_name: str = "UNet2DConditionModel"):
        self.class_name = class_name
        self.calls = self.rows = self.rows_grad = 0
        self._handle = None

    def _hook(self, module, args, kwargs=None):
        if type(module).__name__ != self.class_name:
            return
        x = args[0] if args else (kwargs or {}).get("sample")
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) else 1
        self.calls += 1
        if torch.is_grad_enabled():
            self.rows_grad += n
        else:
            self.rows += n

    def __enter__(self) -> ForwardCounter:
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, a: self._hook(m, a))
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def forward_equivalents(self) -> float:
        return self.rows + (1 + BACKWARD_FACTOR) * self.rows_grad


def cycle_steps(cfg) -> int:
    """Trainer steps in one period of a stage's schedule (a DMD critic/generator cycle)."""
    return max(1, int(getattr(cfg, "critic_steps", 1) or 1)) if cfg.stage == "dmd" else 1


def measure_step_cost(cfg, batch_size: int = 4, device: str = "cpu") -> dict:
    """Run one schedule cycle of ``cfg``'s stage the way the trainer does (micro-batches,
    backward, update, ``after_step``) and count UNet forward-equivalents per training
    sample. Returns {"fe_per_sample", "unet_calls_per_step", "steps", "batch_size"}."""
    import dataclasses

    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.data import make_data
    from hypersd_core.training.trainer import make_stage, setup_student

    cfg = dataclasses.replace(cfg, batch_size=batch_size, init_adapter="")
    backbone = load_backbone(cfg.model, device=device)
    torch.manual_seed(0)
    params = setup_student(backbone, cfg)
    stage = make_stage(cfg, backbone)
    if hasattr(stage, "setup"):
        params = stage.setup(params)
    opt = torch.optim.AdamW(params, lr=1e-8)
    data = make_data(backbone, cfg.data if hasattr(cfg, "data") else cfg.model)
    g = torch.Generator().manual_seed(0)
    steps = cycle_steps(cfg)
    accum = int(getattr(cfg, "grad_accum", 1) or 1)
    with ForwardCounter() as counter:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(accum):
                loss, _ = stage.loss(data.sample(batch_size, g), g)
                if loss is not None:
                    loss.float().mean().backward()
            opt.step()
            if hasattr(stage, "after_step"):
                stage.after_step(step)
    samples = steps * accum * batch_size
    return {"fe_per_sample": counter.forward_equivalents / samples,
            "unet_calls_per_step": counter.calls / steps, "steps": steps,
            "batch_size": batch_size}


def row_budget(runs: dict, name: str) -> dict:
    """A run's budget with its parents': {"samples", "forward_equivalents", "seconds",
    "rank"} from a protocol record's ``runs`` (forward-equivalents None where a run of the
    chain has no measured cost)."""
    r = runs[name]
    parent = row_budget(runs, r["parent"]) if r.get("parent") else {
        "samples": 0, "forward_equivalents": 0.0, "seconds": 0.0}
    own = r["steps"] * r["batch_size"] * r.get("grad_accum", 1)
    fe = r.get("fe_per_sample")
    fe_total = (parent["forward_equivalents"] + own * fe
                if fe is not None and parent["forward_equivalents"] is not None else None)
    return {"samples": parent["samples"] + own, "forward_equivalents": fe_total,
            "seconds": parent["seconds"] + float(r.get("seconds") or 0.0),
            "rank": r.get("lora_rank")}


def budget_table(runs: dict, names: list[str] | None = None) -> str:
    """Markdown: one line per run (with its parents' budget): samples, forward-equivalents,
    seconds, LoRA rank."""
    lines = ["| run | parent | samples | UNet forward-equivalents | seconds | LoRA rank |",
             "|---|---|---|---|---|---|"]
    for name in names or list(runs):
        r = runs.get(name, {})
        if "steps" not in r:
            continue
        b = row_budget(runs, name)
        fe = f"{b['forward_equivalents']:,.0f}" if b["forward_equivalents"] is not None else "-"
        lines.append(f"| {name} | {r.get('parent') or '-'} | {b['samples']:,} | {fe} | "
                     f"{b['seconds']:,.0f} | {b['rank'] if b['rank'] is not None else '-'} |")
    return "\n".join(lines) + "\n"

