"""``random:sd15`` / ``random:sdxl``: the full-size architectures from assets/configs with
random weights (nothing downloaded), usable by ``sample``, ``train`` and the app; the
``-tiny`` variants keep the tests fast."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image_folder

from hypersd_core.models.random_model import build_modules, load_configs, parse_random


def test_names_and_errors():
    assert parse_random("random:sdxl") == ("sdxl", False)
    assert parse_random("random:sd15-tiny") == ("sd15", True)
    assert parse_random("digits") is None
    with pytest.raises(ValueError, match="known: random:sd15, random:sdxl"):
        parse_random("random:sd3")


@pytest.mark.parametrize("kind,unet_m,te_m", [("sd15", 859.5, 123.1), ("sdxl", 2567.5, 817.6)])
def test_full_size_architectures(kind, unet_m, te_m):
    """Built on the meta device: the public parameter counts, no memory used."""
    m = build_modules(kind, load_configs(kind), "meta")
    count = lambda mod: sum(p.numel() for p in mod.parameters()) / 1e6  # noqa: E731
    assert count(m["unet"]) == pytest.approx(unet_m, abs=0.5)
    te = count(m["text_encoder"]) + (count(m["text_encoder_2"]) if kind == "sdxl" else 0)
    assert te == pytest.approx(te_m, abs=0.5)
    assert m["unet"].device.type == "meta"


def test_sample_cli_and_app_service(tmp_path):
    from hypersd_core.app.service import ModelService
    from hypersd_core.cli import main as cli_main

    out = tmp_path / "samples"
    assert cli_main(["sample", "--model", "random:sdxl-tiny", "--method", "teacher", "--steps", "2",
                     "--prompt", "a red bicycle", "--out", str(out)]) == 0
    assert list(out.glob("*.png"))
    cells = ModelService("random:sd15-tiny").generate("teacher", 2, ["a red bicycle"], [0])
    assert not cells[0].error and cells[0].image.size == (64, 64)


def test_train_on_a_random_model(tmp_path):
    from hypersd_core.training.config import make_config
    from hypersd_core.training.runs import Run
    from hypersd_core.training.trainer import train

    (tmp_path / "data").mkdir()
    data = make_image_folder(tmp_path / "data", 4)
    cfg = make_config({"model": "random:sdxl-tiny", "data": str(data), "stage": "tscd", "k": 4,
                       "steps": 2, "batch_size": 2, "lora_rank": 4, "lora_alpha": 4,
                       "sample_every": 100, "sample_prompts": ["a red bicycle"],
                       "mixed_precision": "bf16", "frozen_dtype": "bf16"})
    run = Run.create(tmp_path / "run", cfg)
    status = train(run.dir)
    assert status["state"] == "done" and status["step"] == 2
    records, _ = run.read_metrics()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
