"""``bench --gpu``: the smoke run of every stage type and the exit status, through the
``--dry-run`` path (tiny architectures, bf16, on the CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hypersd_core.bench import gpu
from hypersd_core.bench.gpu_train import SMOKE_STAGES
from hypersd_core.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("stages", [
    # the two with their own optimiser steps (discriminator heads; DMD's fake score)
    ("tscd_adv", "dmd"),
    pytest.param(tuple(SMOKE_STAGES), marks=pytest.mark.slow),  # every stage type
])
def test_smoke_steps(stages, tmp_path):
    plan = dataclasses.replace(gpu.DRY_PLAN, models=("sdxl",), parts=("smoke",),
                               smoke_stages=stages)
    result = gpu.run_gpu_check(out=tmp_path / "gpu.json", dry_run=True, plan=plan,
                               log=lambda *a: None)
    assert result["errors"] == [] and result["dtype"] == "bfloat16"
    m = result["models"]["sdxl"]
    assert set(m["smoke_peak_mb"]) == set(stages)
    for name in stages:
        row = m[f"smoke_{name}"]
        assert row["loss_finite"] is True and row["peak_mb"] > 0, (name, row)
        # DMD runs critic-only at step 1, both updates at step 2; the adversarial term (PCM)
        # the discriminator only at step 1, the student at step 2
        assert row["generator_steps"] == (1 if name in ("dmd", "tscd_adv") else 2), (name, row)
    assert m["smoke_tscd_adv"]["adv_weight"] > 0 and m["smoke_dmd"]["stage"] == "dmd"
    assert m["smoke_dmd"]["rewards"].startswith("stand-in")  # the preset's rewards, stood in


def test_a_failed_part_makes_the_command_fail(tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 must have the same dtype")

    monkeypatch.setattr(gpu, "smoke_stage", boom)
    monkeypatch.setattr(gpu, "DRY_PLAN", dataclasses.replace(
        gpu.DRY_PLAN, models=("sd15",), parts=("smoke",), smoke_stages=("tscd",)))
    out = tmp_path / "gpu.json"
    assert cli_main(["bench", "--gpu", "--dry-run", "--out", str(out)]) == 1
    errors = json.loads(out.read_text())["errors"]
    assert errors == ["sd15/smoke_tscd: RuntimeError: mat1 and mat2 must have the same dtype"]
    assert "error: sd15/smoke_tscd" in capsys.readouterr().err


@pytest.mark.slow
def test_full_dry_run_exits_zero(tmp_path):
    """The whole GPU check (both models, every part) at tiny sizes: exit status 0."""
    out = tmp_path / "gpu.json"
    assert cli_main(["bench", "--gpu", "--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == []
    for kind in ("sdxl", "sd15"):
        assert all(f"smoke_{n}" in result["models"][kind] for n in SMOKE_STAGES)


def test_meta_allocator_count_is_exact_on_a_small_graph():
    """The memory plan's counter: tensors alive (saved for backward, gradients) counted
    once per storage until freed; x @ w1 -> relu -> @ w2 of 1024^2 fp32 (4 MiB each)."""
    from hypersd_core.bench.memory_plan import AllocatorCount

    w1 = torch.empty(1024, 1024, device="meta", requires_grad=True)
    w2 = torch.empty(1024, 1024, device="meta", requires_grad=True)
    count = AllocatorCount()
    mib = 2**20
    with count:
        x = torch.empty(1024, 1024, device="meta")
        loss = ((x @ w1).relu().view(-1).view(1024, 1024) @ w2).sum()
        assert count.live // mib == 8  # x, and relu's output (saved); x @ w1 is freed
        loss.backward()
        assert count.live // mib == 12  # x and the two weight gradients
    assert count.peak // mib == 20


@pytest.mark.slow  # four 2-process trainer launches
def test_gpu_full_dry_run(tmp_path):
    """``bench --gpu --full --dry-run``: the GPU check, then the trainer in 2 processes
    (gloo) for TSCD + adversarial and DMD, and a resume, on tiny models on the CPU."""
    from hypersd_core.bench.gpu_full import STEPS, run_gpu_full

    plan = dataclasses.replace(gpu.DRY_PLAN, models=("sd15",), parts=("smoke",),
                               smoke_stages=("tscd",))
    result = run_gpu_full(tmp_path / "full.json", dry_run=True, plan=plan, log=lambda *a: None)
    assert result["errors"] == [], result["errors"]
    mp = result["multi_process"]
    for name in ("tscd_adv", "dmd", "resume"):
        assert mp[name]["state"] == "done" and mp[name]["step"] == STEPS, (name, mp[name])
        assert mp[name]["ranks_agree"], name
    assert mp["resume"]["equals_straight_run"]
    assert json.loads((tmp_path / "full.json").read_text())["settings"]["processes"] == 2


def test_resume_is_judged_against_a_repeat_where_kernels_are_not_deterministic():
    """Bit-identical passes; a difference passes only within twice what a repeat of the
    straight run differs by (GPU kernel noise), and fails with no repeat to judge by."""
    from hypersd_core.bench.gpu_full import resume_verdict

    straight = {"w": torch.zeros(4)}
    assert resume_verdict(straight, None, {"w": torch.zeros(4)})["within_repeat_noise"]
    drifted = {"w": torch.tensor([0.0, 1e-4, 0.0, 0.0])}
    assert not resume_verdict(straight, None, drifted)["within_repeat_noise"]
    noisy_repeat = {"w": torch.tensor([1e-4, 0.0, 0.0, 0.0])}
    verdict = resume_verdict(straight, noisy_repeat, drifted)
    assert verdict["within_repeat_noise"] and not verdict["equals_straight_run"]
    assert verdict["max_diff_resumed"] == pytest.approx(1e-4)
    broken = {"w": torch.tensor([0.0, 1e-2, 0.0, 0.0])}  # 100x the repeat's noise
    assert not resume_verdict(straight, noisy_repeat, broken)["within_repeat_noise"]
    exact_repeat = {"w": torch.zeros(4)}  # a deterministic device: only bit-identical passes
    assert not resume_verdict(straight, exact_repeat, drifted)["within_repeat_noise"]
