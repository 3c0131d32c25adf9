"""Optimiser steps that hold on a GPU and across processes.

* ``all_reduce_grads``: average the gradients of a module over the processes in flat
  buckets (one collective per bucket, not one per tensor).
* ``OwnStep``: the update of a module that a stage trains beside the student (the
  discriminator heads, DMD's fake score): backward with loss scaling under fp16
  autocast, gradient averaging across processes (before unscaling), clipping, and the
  optimiser step (skipped on every process when the averaged gradient is not finite).
"""

from __future__ import annotations

import torch

BUCKET_NUMEL = 1 << 24  # 16M elements (64 MB in fp32) per collective


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_grads(params: list[torch.nn.Parameter], bucket_numel: int = BUCKET_NUMEL) -> int:
    """Average ``p.grad`` over the processes, in flat buckets; returns the collective count.

    A parameter without a gradient on this process counts as zero (every process must
    send the same buckets). One process: nothing to do, 0.
    """
    world = world_size()
    if world == 1:
        return 0
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    calls = 0
    for grads in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel()
            if size >= bucket_numel or i == len(grads) - 1:
                flat = torch.cat([x.reshape(-1) for x in bucket])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for x in bucket:
                    x.copy_(flat[offset:offset + x.numel()].view_as(x))
                    offset += x.numel()
                calls += 1
                bucket, size = [], 0
    return calls


def fp16_autocast() -> bool:
    """True under CUDA autocast to float16 (where gradients need loss scaling)."""
    return (torch.cuda.is_available() and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.float16)


class OwnStep:
    """backward + (unscale) + all-reduce + clip + step for one optimiser.

    Call it under the same autocast as the student's step. Under fp16 autocast it
    keeps its own ``GradScaler`` (a separate scale from the student's optimiser).
    ``accumulate`` then ``step`` split one update over the micro-batches of a step
    (gradient accumulation); calling the object does both on one loss.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 grad_clip: float | None = None):
        self.optimizer = optimizer
        self.params = list(params)
        self.grad_clip = grad_clip
        self.scaler: torch.amp.GradScaler | None = None
        self.pending = False  # gradients accumulated since the last step

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = False

    def accumulate(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (a scalar, already divided by the micro-batch count)."""
        if self.scaler is None and fp16_autocast():
            self.scaler = torch.amp.GradScaler("cuda")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.pending = True

    def step(self) -> torch.Tensor | None:
        """One update from the accumulated gradients; returns the gradient norm if clipped."""
        # average first, unscale after: every process then holds the same gradients, so
        # every GradScaler sees the same overflow and every process skips the same steps
        all_reduce_grads(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped on inf/nan gradients
            self.scaler.update()
        elif torch.isfinite(norm):  # the same gradients everywhere: the same decision
            self.optimizer.step()
        self.zero_grad()
        return norm if self.grad_clip else None

    def __call__(self, loss: torch.Tensor) -> torch.Tensor | None:
        """One update from ``loss`` (a scalar); returns the gradient norm if clipped."""
        self.zero_grad()
        self.accumulate(loss)
        return self.step()
