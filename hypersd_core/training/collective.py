"""Decisions that every process of a run must make together.

Under ``torchrun`` / ``accelerate launch`` each process trains its own replica; any
choice taken on one process alone (skip a step, stop, resume from a checkpoint) leaves
the replicas different or one process waiting in a collective for ever. Every such
choice here is made by one collective over the default process group:

* ``step_verdict``: is the step's loss and gradient finite on every process, and has
  any process been asked to stop (one all-reduce of three flags per step);
* ``agree``: one flag for all (any / all);
* ``broadcast``: a value decided on rank 0 (the checkpoint to resume from);
* ``missing_on``: the ranks that lack something rank 0 has (a checkpoint).

With one process (or no process group) every function is local and costs nothing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def _flag_device() -> torch.device:
    """Where a collective's tensor lives: NCCL reduces CUDA tensors, gloo CPU ones."""
    dist = _dist()
    if dist and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_flags(flags: list[bool | torch.Tensor], op: str = "any") -> list[bool]:
    """``flags`` combined over the processes ("any": logical or, "all": logical and).

    Tensors (0-dim bools) are stacked on their device, so one host sync serves the
    local check and the collective together.
    """
    values = torch.stack([torch.as_tensor(f).reshape(()).to(_flag_device(), torch.int32)
                          for f in flags])
    dist = _dist()
    if dist:
        if op == "any":
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        else:
            dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return [bool(v) for v in values.tolist()]


def agree(flag: bool, op: str = "any") -> bool:
    """One flag combined over the processes."""
    return reduce_flags([flag], op)[0]


def broadcast(value, src: int = 0):
    """Rank ``src``'s ``value`` (any picklable object) on every process."""
    dist = _dist()
    if not dist:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=_flag_device())
    return box[0]


def missing_on(have: bool) -> list[int]:
    """The ranks whose ``have`` is False (the same list on every process)."""
    dist = _dist()
    if not dist:
        return [] if have else [0]
    lacks = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_flag_device())
    lacks[dist.get_rank()] = int(not have)
    dist.all_reduce(lacks)  # each rank fills its own slot: the sum is the gather
    return [r for r, v in enumerate(lacks.tolist()) if v]


@dataclass
class Verdict:
    """The step's collective outcome."""

    loss_ok: bool  # the loss is finite on every process
    grad_ok: bool  # the (averaged) gradient norm is finite on every process
    stop: bool  # some process was asked to stop (rank 0's STOP file, any process's signal)


def step_verdict(loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> Verdict:
    """One collective per step: the finiteness of ``loss`` and ``grad_norm`` and ``stop``."""
    device = loss.device
    bad = torch.stack([~torch.isfinite(loss.detach().float().reshape(())),
                       ~torch.isfinite(grad_norm.detach().float().reshape(()).to(device)),
                       torch.tensor(bool(stop), device=device)])
    loss_bad, grad_bad, stop = reduce_flags(list(bad), "any")
    return Verdict(not loss_bad, not grad_bad, stop)


class StopRequest:
    """A stop asked of this process: SIGINT / SIGTERM here, or the run's STOP file.

    Only rank 0 reads the STOP file (a node that does not see the shared folder yet
    cannot decide alone); a signal to any process counts (``torchrun`` forwards its
    SIGTERM to every worker). ``requested()`` is this process's view, to be combined
    over the processes by ``step_verdict`` or ``agree``.
    """

    def __init__(self, run, main: bool):
        self.run, self.main, self.signalled = run, main, False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or (self.main and self.run.stop_requested())


def step_seed(seed: int, step: int, process: int = 0, world: int = 1) -> int:
    """The seed of one (run seed, step, process), in the 32 bits a CPU generator uses.

    ``(step * world + process) * 101`` is distinct for every (step, process) pair while
    steps x processes stays below 2^32 / 101 (42 million: 32 processes x 1.3M steps);
    one process keeps the former ``seed * 1_000_003 + step * 101`` stream.
    """
    return (seed * 1_000_003 + (step * world + process) * 101) % 2**32


def launcher_precision(run_value: str) -> str:
    """The mixed precision to train in: the run config's, or the launcher's.

    ``accelerate launch --config_file X`` passes X's ``mixed_precision`` in
    ACCELERATE_MIXED_PRECISION. A run config with "no" takes the launcher's; two
    different half types are a conflict, refused with one line.
    """
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
    if launcher not in ("no", "fp16", "bf16"):
        raise ValueError(f"the accelerate config's mixed_precision {launcher!r} is not supported "
                         "here; use no, fp16 or bf16")
    if launcher == "no" or launcher == run_value:
        return run_value
    if run_value == "no":
        return launcher
    raise ValueError(f"mixed_precision conflict: the run config says {run_value}, the accelerate "
                     f"config says {launcher}; set one of them to the other (or the run's to no)")
