"""Engines through accelerate: the shipped configs validate, a combination that cannot
work is refused in one line, and one FSDP config trains the digits one-step UNet on two
CPU processes (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_image_folder

from hypersd_core.paths import ROOT
from hypersd_core.training.config import make_config
from hypersd_core.training.engines import check_engine, launcher_engine
from hypersd_core.training.runs import Run
from hypersd_core.training.trainer import train

CONFIGS = ROOT / "assets" / "accelerate"


def _load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


@pytest.mark.parametrize("name,kind,machines", [
    ("one-gpu.yaml", "NO", 1), ("multi-gpu-ddp.yaml", "MULTI_GPU", 1),
    ("multi-node-ddp.yaml", "MULTI_GPU", 2), ("fsdp-onestep-unet.yaml", "FSDP", 1),
    ("fsdp-onestep-unet-cpu.yaml", "FSDP", 1), ("multi-node-fsdp-onestep-unet.yaml", "FSDP", 2),
    ("zero2-onestep-unet.yaml", "DEEPSPEED", 1), ("zero3-onestep-unet.yaml", "DEEPSPEED", 1),
])
def test_shipped_accelerate_configs_validate(name, kind, machines):
    """accelerate's own loader reads each config; the engine settings are the ones the
    trainer needs (FSDP2, ZeRO stage 2 / 3, a main node address for several machines)."""
    cfg = _load(name)
    assert str(cfg.distributed_type).split(".")[-1] == kind and cfg.num_machines == machines
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2 and not cfg.use_cpu
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == (2 if "zero2" in name else 3)
    if machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port
        assert cfg.num_processes % machines == 0
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {name}


@pytest.mark.parametrize("flag,engine", [("ACCELERATE_USE_FSDP", "fsdp"),
                                         ("ACCELERATE_USE_DEEPSPEED", "deepspeed")])
def test_a_lora_stage_refuses_sharded_engines_in_one_line(flag, engine, tiny_sd15, tmp_path,
                                                         monkeypatch):
    """Before: an FSDP config was silently ignored and a DeepSpeed one crashed in backward."""
    (tmp_path / "data").mkdir()
    data = make_image_folder(tmp_path / "data", 2)
    run = Run.create(tmp_path / "run", make_config({"model": str(tiny_sd15), "data": str(data),
                                                    "steps": 1, "batch_size": 2}))
    monkeypatch.setenv(flag, "true")
    assert launcher_engine() == engine
    with pytest.raises(ValueError, match=f"trains a LoRA data parallel; {engine} is for the "
                                         "full-UNet one-step stage") as err:
        train(run.dir)
    assert "\n" not in str(err.value) and "multi-gpu-ddp.yaml" in str(err.value)
    assert run.status()["state"] == "failed"


def test_deepspeed_without_cuda_or_package_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed needs CUDA GPUs"):
        check_engine(use_cuda=False)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install deepspeed==\d"):
            check_engine(use_cuda=True)


@pytest.mark.slow
def test_fsdp_config_trains_the_digits_onestep_unet_on_two_cpu_processes(tmp_path):
    """assets/accelerate/fsdp-onestep-unet-cpu.yaml: FSDP2 over gloo, 2 processes, 3 steps
    of the full one-step UNet; the saved UNet moved away from its start and is finite."""
    from diffusers import UNet2DConditionModel

    from hypersd_core.digits.onestep import fused_student

    out = tmp_path / "onestep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(CONFIGS / "fsdp-onestep-unet-cpu.yaml"), "--main_process_port", "29581",
         "-m", "hypersd_core", "build-onestep-unet", "--device", "cpu", "--steps", "3",
         "--batch-size", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env=env, cwd=str(ROOT))
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-3000:]
    print(res.stdout[-1500:])  # the loss per step (docs/distributed.md)
    info = json.loads((out / "training.json").read_text())
    assert info["engine"] == "fsdp" and info["processes"] == 2
    assert info["last_logs"]["steps_done"] == 3
    trained = UNet2DConditionModel.from_pretrained(out).float().state_dict()
    start = fused_student().state_dict()
    assert all(torch.isfinite(v).all() for v in trained.values())
    # 3 warm-up steps move the weights by ~1e-5: visible against the fp16-rounded start
    changed = sum(int((trained[k] != start[k].half().float()).sum()) for k in start)
    assert changed > 1000
