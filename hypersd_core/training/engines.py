"""Distributed engines through accelerate: data parallel, FSDP, DeepSpeed ZeRO.

``accelerate launch --config_file assets/accelerate/X.yaml`` tells the processes which
engine to use (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED and their settings in the
environment). Which stage can use which engine:

* the LoRA stages (``training/trainer.py``: TSCD, LCM, TCD, feedback, DMD) train
  data parallel: their trainable state is a LoRA (a few MB) averaged in flat buckets;
  the frozen base switches adapters and feeds the discriminator's feature hooks inside
  one step, which a sharded wrapper does not allow. FSDP / DeepSpeed are refused there
  with one line naming the config to use instead.
* the one-step full UNet (``digits/onestep.py``: every UNet weight trained with the DMD
  losses) goes through ``accelerator.prepare``: data parallel, FSDP (FSDP2; on the CPU
  too, over gloo) or DeepSpeed ZeRO-2/3 (CUDA only).

accelerate enables FSDP only on accelerators; on the CPU ``make_accelerator`` turns the
same plugin on itself, so one FSDP config runs on a GPU node and on a CPU test box.
"""

from __future__ import annotations

import os

import torch

ENGINES = ("ddp", "fsdp", "deepspeed")
DEEPSPEED_PIN = "deepspeed==0.19.8"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launcher_engine() -> str:
    """The engine the launcher asked for: "fsdp", "deepspeed" or "ddp" (data parallel,
    also one process)."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def check_lora_engine(stage: str) -> None:
    """Refuse FSDP / DeepSpeed for a LoRA stage (one line: what to use instead)."""
    engine = launcher_engine()
    if engine != "ddp":
        raise ValueError(
            f"the {stage} stage trains a LoRA data parallel; {engine} is for the full-UNet one-step "
            "stage: launch it with assets/accelerate/multi-gpu-ddp.yaml (or multi-node-ddp.yaml)")


def check_engine(use_cuda: bool) -> str:
    """The launcher's engine, or one line saying why it cannot run here."""
    engine = launcher_engine()
    if engine == "deepspeed":
        if not use_cuda:
            raise ValueError("DeepSpeed needs CUDA GPUs (ZeRO's kernels and NCCL); on the CPU use "
                             "assets/accelerate/fsdp-onestep-unet-cpu.yaml")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ValueError(f"DeepSpeed configs need the deepspeed package: pip install "
                             f"{DEEPSPEED_PIN}") from None
    return engine


def make_accelerator(mixed_precision: str = "no", use_cuda: bool | None = None):
    """The Accelerator for the launcher's engine (FSDP turned on on the CPU too), in the
    launcher's mixed precision where ``mixed_precision`` is "no"."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from hypersd_core.training.collective import launcher_precision

    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    engine = check_engine(use_cuda)
    mixed_precision = launcher_precision(mixed_precision)
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=mixed_precision)
    if (engine == "fsdp" and accelerator.distributed_type == DistributedType.MULTI_CPU):
        plugin = FullyShardedDataParallelPlugin()  # its settings from the launcher (FSDP_*)
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on the CPU needs fsdp_version: 2 in the accelerate config")
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a prepared model, whole and on the CPU.

    Every process must call it. FSDP: each sharded tensor is gathered on every process;
    DeepSpeed ZeRO-3: gathered on rank 0 only (the others get ``{}``); data parallel:
    the local copy.
    """
    from accelerate.utils import DistributedType
    from torch.distributed.tensor import DTensor

    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.unwrap_model(model).state_dict()
    else:  # also FSDP2 on the CPU, which accelerate reports as MULTI_CPU: DTensors below
        state = accelerator.get_state_dict(model) or {}
    # whole tensors, cloned: a gathered tensor (and on the CPU, ``.cpu()`` of one) can
    # share storage that FSDP2 frees or reshards afterwards
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in state.items()}
