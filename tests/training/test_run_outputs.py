"""What a run gives a researcher besides final/: TensorBoard event files (report_to), the
EMA adapter, the downloadable files (diffusers + kohya with recipe metadata), the run as
an arm of the Compare grid and the study, and the monitor's curves."""

from __future__ import annotations

import zipfile

import pytest
import torch
from conftest import make_image_folder
from safetensors import safe_open
from safetensors.torch import load_file

from hypersd_core.training.config import make_config
from hypersd_core.training.runs import Run
from hypersd_core.training.trainer import train

DECAY = 0.5


@pytest.fixture(scope="module")
def tiny_run(tiny_sd15, tmp_path_factory):
    """A 3-step TSCD k=8 run on the tiny model: TensorBoard, an EMA, a checkpoint per step."""
    data = make_image_folder(tmp_path_factory.mktemp("data"), 8)
    cfg = make_config({"model": str(tiny_sd15), "data": str(data), "steps": 3, "batch_size": 2,
                       "log_every": 1, "sample_every": 2, "checkpoint_every": 1,
                       "keep_checkpoints": 5, "lora_rank": 4, "lora_alpha": 4, "lr": 1e-3,
                       "warmup_steps": 0, "sample_prompts": ["a red handwritten digit 1"],
                       "report_to": "tensorboard", "lora_ema_decay": DECAY})
    run = Run.create(tmp_path_factory.mktemp("runs") / "tiny-k8", cfg)
    assert train(run.dir)["state"] == "done"
    return run


def test_tensorboard_reader_loads_the_loss_and_the_sample_grid(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = next((tiny_run.dir / "trackers").glob("*/events.out.tfevents.*")).parent
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    loss = acc.Scalars("loss")
    records, _ = tiny_run.read_metrics()
    logged = [r["loss"] for r in records if "loss" in r]
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(logged, rel=1e-6)  # same as metrics.jsonl
    assert "lr" in tags["scalars"] and "samples" in tags["images"]
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 3]  # sample_every=2, and the last step
    assert images[0].width == 32 and images[0].height == 32  # one prompt, one 32 px cell


def _ema_state(ckpt):
    return {k.replace(".student", ""): v for k, v in load_file(str(ckpt / "ema.safetensors")).items()}


def test_ema_follows_its_formula_and_is_exported_beside_final(tiny_run):
    ckpts = sorted(tiny_run.checkpoints_dir.glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000001", "step-0000002", "step-0000003"]
    e2, e3 = _ema_state(ckpts[1]), _ema_state(ckpts[2])
    theta3 = load_file(str(ckpts[2] / "lora.safetensors"))
    assert set(e2) == set(theta3)
    for k, v in theta3.items():  # e_t = d e_{t-1} + (1 - d) theta_t
        torch.testing.assert_close(e3[k], DECAY * e2[k] + (1 - DECAY) * v.float())
    final = load_file(str(tiny_run.final_dir / "pytorch_lora_weights.safetensors"))
    ema = load_file(str(tiny_run.dir / "final_ema" / "pytorch_lora_weights.safetensors"))
    assert set(final) == set(ema)
    for k, v in ema.items():  # alpha = rank: the export holds the average as it is
        torch.testing.assert_close(v, e3[k.removeprefix("unet.")])
    assert max((final[k] - ema[k]).abs().max().item() for k in final) > 0


def test_export_gives_both_formats_with_the_recipe_and_everything_else(tiny_run, tmp_path):
    from hypersd_core.app.arms import detect_recipe
    from hypersd_core.training.export import export_run

    files = {f.name: f for f in export_run(tiny_run, tmp_path)}
    assert set(files) == {"tiny-k8-lora.safetensors", "tiny-k8-lora-kohya.safetensors",
                          "tiny-k8-lora-ema.safetensors", "tiny-k8-lora-ema-kohya.safetensors",
                          "metrics.jsonl", "config.yaml", "tiny-k8-samples.zip"}
    with safe_open(str(files["tiny-k8-lora-kohya.safetensors"]), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
        assert f.metadata()["hypersd.recipe"] == "hypersd"
    with safe_open(str(files["tiny-k8-lora.safetensors"]), "pt") as f:
        assert f.metadata()["hypersd.k"] == "8" and f.metadata()["hypersd.stage"] == "tscd"
    assert detect_recipe(files["tiny-k8-lora.safetensors"]) == "hypersd"  # from the metadata
    assert zipfile.ZipFile(files["tiny-k8-samples.zip"]).namelist() == [
        "step-0000002.png", "step-0000003.png"]


def test_the_run_is_an_arm(tiny_run, tiny_sd15, tmp_path):
    from hypersd_core.app.arms import ArmError, arm_choices, resolve_arm
    from hypersd_core.app.service import AppSettings

    settings = AppSettings(model=str(tiny_sd15), runs_dir=tiny_run.dir.parent,
                           lora_dir=tmp_path / "loras")
    arm = resolve_arm("run:tiny-k8", settings)
    assert arm.recipe == "hypersd" and arm.steps == 8 and arm.kind == "run"
    assert arm.label == "tiny-k8 [TSCD k=8, 3 steps, hypersd]"
    assert arm.adapter.endswith("final/pytorch_lora_weights.safetensors")
    assert len(arm.weights_hash()) == 16
    assert ("tiny-k8 [TSCD k=8, 3 steps, hypersd]", "run:tiny-k8") in arm_choices(settings)
    other = AppSettings(model="digits", runs_dir=tiny_run.dir.parent, lora_dir=tmp_path)
    with pytest.raises(ArmError, match="no finished run"):  # trained on another base model
        resolve_arm("run:tiny-k8", other)


def test_monitor_overlays_runs_with_smoothing(tiny_run):
    from hypersd_core.training.curves import overlay, smooth

    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    # debiased EMA: s2 = (0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25)
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
    with pytest.raises(ValueError, match="smoothing weight"):
        smooth([1.0], 1.0)
    curves = overlay([tiny_run, tiny_run], "loss", 0.9)
    assert list(curves) == ["tiny-k8"] and [x for x, _ in curves["tiny-k8"]] == [1, 2, 3]


def test_a_study_arm_given_as_the_run_records_its_hash(tiny_run, tiny_sd15, tmp_path):
    from compare_tab.study import StudyHandlers
    from hypersd_core.app.arms import resolve_arm
    from hypersd_core.app.service import AppSettings, ModelService
    from hypersd_core.study.store import StudyConfig, StudyStore

    settings = AppSettings(model=str(tiny_sd15), runs_dir=tiny_run.dir.parent,
                           lora_dir=tmp_path / "loras")
    store = StudyStore(tmp_path / "votes.db", salt="test-salt-0123456789abcdef")
    config = StudyConfig(prompts=["a red handwritten digit 1"], methods=["teacher", "hypersd"],
                         steps=[1], seeds=[0])
    handlers = StudyHandlers(ModelService(str(tiny_sd15), device="cpu"), store, config, settings)
    assert "2 arms" in handlers.use_arms(["teacher", "run:tiny-k8"])
    left, right, _, _, token, *_ = handlers.next_pair()
    assert left.size == right.size
    message, *_ = handlers.vote("A", token)
    assert "tiny-k8 [TSCD k=8" in message  # the reveal names the run
    pair = store.pairs_frame().iloc[-1]
    sides = {pair.method_left: pair.hash_left, pair.method_right: pair.hash_right}
    assert sides["run:tiny-k8"] == resolve_arm("run:tiny-k8", settings).weights_hash()
    assert sides["teacher"] == ""  # the base model has no adapter
    store.close()


def test_push_offline_says_in_one_line_what_it_would_upload(tiny_run, capsys, monkeypatch):
    from hypersd_core.cli import main
    from hypersd_core.training.push import model_card

    card = model_card(tiny_run, "me/tiny-k8")
    for text in ("stage: TSCD k=8", "`DDIMScheduler` with `timestep_spacing='trailing'`",
                 "- steps: 8", "- CFG: none", "3 steps x batch 2", "| loss | 3 |",
                 "weight_name='tiny-k8-lora.safetensors'"):
        assert text in card, text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(tiny_run.dir), "--repo", "me/tiny-k8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offline (HF_HUB_OFFLINE=1): would upload 7 files")
    for name in ("README.md", "tiny-k8-lora.safetensors", "tiny-k8-lora-kohya.safetensors",
                 "tiny-k8-lora-ema.safetensors", "config.yaml", "metrics.jsonl"):
        assert name in lines[0]
    assert main(["push", str(tiny_run.dir), "--repo", "no-owner"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err
