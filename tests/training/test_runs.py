"""Runs: every consistency stage trains, stop + resume continues the same curve,
partial checkpoints are skipped, bad configs fail before any model loads, non-finite
losses stop a run, and a two-process CPU run keeps the processes in agreement."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_image_folder

from hypersd_core.training.config import load_preset, make_config
from hypersd_core.training.runs import Run, launch
from hypersd_core.training.trainer import NonFiniteLossError, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), 8)


def _cfg(model, data, **kw):
    values = {"model": str(model), "data": str(data), "steps": 4, "batch_size": 2,
              "log_every": 1, "sample_every": 2, "checkpoint_every": 2, "lora_rank": 4,
              "lora_alpha": 4, "sample_prompts": ["a red handwritten digit 1"], **kw}
    return make_config(values)


def _lora(run):
    from safetensors.torch import load_file

    return load_file(str(run.final_dir / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("stage,extra", [
    ("tscd", {"k": 8}), ("tscd", {"k": 1, "adv_weight": 0.5, "t_end": "edge", "distance": "huber"}),
    ("lcm", {"num_solver_steps": 50}), ("tcd", {"num_solver_steps": 50, "target": "ema", "ema_decay": 0.5}),
])
def test_every_consistency_stage_trains(kind, stage, extra, tiny_sd15, tiny_sdxl, data_dir, tmp_path):
    model = tiny_sd15 if kind == "sd15" else tiny_sdxl
    run = Run.create(tmp_path / "run", _cfg(model, data_dir, stage=stage, **extra))
    status = train(run.dir)
    assert status["state"] == "done" and status["step"] == 4
    records, _ = run.read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    if extra.get("adv_weight"):
        # PCM's alternation: the discriminator on steps 1, 3, the student's term on 2, 4
        assert [r["step"] for r in records if "loss_adv_g" in r] == [2, 4]
        assert [r["step"] for r in records if "loss_adv_d" in r] == [1, 3]
    assert sorted(p.name for p in run.samples_dir.iterdir()) == ["step-0000002.png", "step-0000004.png"]
    lora = _lora(run)
    assert lora and all(k.startswith("unet.") for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it learned


def test_stop_and_resume_continue_the_same_curve(tiny_sd15, data_dir, tmp_path):
    cfg = _cfg(tiny_sd15, data_dir, steps=12, checkpoint_every=3, sample_every=100)
    straight = Run.create(tmp_path / "straight", cfg)
    train(straight.dir)

    run = Run.create(tmp_path / "stopped", cfg)
    proc = launch(run)
    deadline = time.time() + 240
    while run.status().get("step", 0) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    run.request_stop()
    proc.wait(timeout=240)
    status = run.status()
    assert status["state"] == "stopped", (status, run.log_path.read_text()[-2000:])
    stopped_at = status["step"]
    assert 4 <= stopped_at < 12
    assert run.latest_checkpoint().name == f"step-{stopped_at:07d}"

    status = train(run.dir, resume=True)
    assert status["state"] == "done" and status["step"] == 12
    records, _ = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    a, b = _lora(straight), _lora(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # the same curve


def test_partial_or_corrupt_checkpoints_are_skipped(tiny_sd15, data_dir, tmp_path):
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir, steps=4, checkpoint_every=2,
                                            keep_checkpoints=3))
    train(run.dir)
    assert [p.name for p in run.checkpoints()] == ["step-0000002", "step-0000004"]
    # a write interrupted before its rename, and one renamed but with a truncated file
    shutil.copytree(run.checkpoints_dir / "step-0000004", run.checkpoints_dir / "step-0000006.tmp")
    bad = run.checkpoints_dir / "step-0000008"
    shutil.copytree(run.checkpoints_dir / "step-0000004", bad)
    with open(bad / "lora.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="skipping incomplete or corrupt checkpoint"):
        latest = run.latest_checkpoint()
    assert latest.name == "step-0000004"
    missing = run.checkpoints_dir / "step-0000010"
    missing.mkdir()  # renamed but without its COMPLETE manifest
    with pytest.warns(UserWarning):
        assert run.latest_checkpoint().name == "step-0000004"


@pytest.mark.parametrize("overrides,message", [
    ({"stage": "tscd", "k": 3}, "k must be one of the TSCD chain"),
    ({"stage": "tscd", "k": 8, "num_solver_steps": 50}, "does not divide the segments"),
    ({"lora_rank": 0}, "lora_rank must be >= 1, got 0"),
    ({"not_a_key": 1}, "unknown config keys ['not_a_key']"),
    ({"lr": "fast"}, "lr must be float"),
    ({"w_min": 5, "w_max": 1}, "w_min (5.0) must be <= w_max (1.0)"),
])
def test_bad_configs_fail_clearly_before_loading(overrides, message, monkeypatch):
    import hypersd_core.models.backbone as models

    monkeypatch.setattr(models, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError) as err:
        make_config({"model": "nowhere", **overrides})
    assert message in str(err.value)
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("no-such-preset")
    with pytest.raises(ValueError, match="key=value"):
        load_preset("digits-tscd-k8", ["k8"])


def test_cli_rejects_bad_set_before_loading(tmp_path):
    res = subprocess.run([sys.executable, "-m", "hypersd_core", "train", "--preset", "digits-tscd-k8",
                          "--set", "k=3", "--run-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "k must be one of the TSCD chain" in res.stderr
    assert not (tmp_path / "r").exists()


def test_nonfinite_losses_skip_then_stop(tiny_sd15, data_dir, tmp_path, monkeypatch):
    from hypersd_core.distill import tscd

    real = tscd.ConsistencyStage.loss
    calls = {"n": 0}

    def flaky(self, batch, generator):
        calls["n"] += 1
        loss, logs = real(self, batch, generator)
        return (loss * float("nan") if calls["n"] >= 3 else loss), logs

    monkeypatch.setattr(tscd.ConsistencyStage, "loss", flaky)
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir, steps=20, max_nonfinite=3))
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train(run.dir)
    status = run.status()
    assert status["state"] == "failed" and "non-finite" in status["error"]
    records, _ = run.read_metrics()
    assert [r["skipped_nonfinite"] for r in records if "skipped_nonfinite" in r] == [1, 2, 3]
    assert run.latest_checkpoint() is not None


def test_two_process_cpu_run_agrees(tiny_sd15, data_dir, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU: accelerate runs MULTI_CPU over gloo."""
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir, steps=3, sample_every=100))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", "-m", "hypersd_core.training.trainer", "--run-dir", str(run.dir)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    status = run.status()
    assert status["state"] == "done" and status["processes"] == 2
    digests = [(run.final_dir / f"weights-rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]


def test_status_marks_a_dead_process_failed(tiny_sd15, data_dir, tmp_path):
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir))
    run.write_status(state="running", pid=2**22 + 12345)
    assert run.status()["state"] == "failed" and "gone" in run.status()["error"]
    with pytest.raises(FileExistsError, match="already holds a run"):
        Run.create(run.dir, _cfg(tiny_sd15, data_dir))
