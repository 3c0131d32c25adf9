"""Arms from files (recipe detected or chosen), the compare downloads, and the sample grid's
step band: no model needed."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hypersd_core.app.arms import ArmError, arm_choices, detect_recipe, resolve_arm
from hypersd_core.app.service import COMPARE_STEPS, AppSettings, Cell


def _lora(path, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(4, 8)}, str(path),
              metadata=metadata)
    return path


@pytest.fixture()
def settings(tmp_path):
    loras = tmp_path / "loras"
    _lora(loras / "Hyper-SD15-8steps-lora.safetensors")
    _lora(loras / "lcm-lora-sdv1-5.safetensors")
    _lora(loras / "mine" / "my-adapter.safetensors")
    _lora(loras / "from-a-run.safetensors", {"hypersd.recipe": "tcd"})
    return AppSettings(model="digits", runs_dir=tmp_path / "runs", lora_dir=loras)


def test_recipes_of_files_are_detected_or_chosen(settings):
    root = settings.lora_dir
    assert detect_recipe(root / "Hyper-SD15-8steps-lora.safetensors") == "hypersd"
    assert detect_recipe(root / "lcm-lora-sdv1-5.safetensors") == "lcm"
    assert detect_recipe(root / "from-a-run.safetensors") == "tcd"  # metadata wins
    assert detect_recipe(root / "mine" / "my-adapter.safetensors") is None
    labels = dict((k, v) for v, k in arm_choices(settings))
    assert labels["mine/my-adapter.safetensors"].endswith("[recipe unknown: choose one]")
    with pytest.raises(ArmError, match="recipe of 'mine/my-adapter.safetensors' is unknown"):
        resolve_arm("mine/my-adapter.safetensors", settings)
    chosen = resolve_arm("mine/my-adapter.safetensors", settings, recipe="tcd")
    assert chosen.recipe == "tcd" and chosen.key == "mine/my-adapter.safetensors@tcd"
    assert resolve_arm("lora:mine/my-adapter.safetensors@lcm", settings).recipe == "lcm"
    with pytest.raises(ArmError, match="not one of the LoRA files"):
        resolve_arm("../../etc/passwd", settings)  # only files the server listed
    with pytest.raises(ArmError, match="no finished run"):
        resolve_arm("run:nope", settings)
    assert resolve_arm("tcd", settings).adapter is None  # a recipe: its default adapter


def test_compare_downloads_csv_and_png(tmp_path):
    from compare_tab.compare import cells_table
    from compare_tab.exports import compare_files

    tile = Image.new("RGB", (32, 32), (200, 0, 0))
    cells = [Cell("teacher", 25, "p", 0, tile, label="teacher (reference)")]
    for label in ("teacher", "my-run [TSCD k=8, 3 steps, hypersd]"):
        cells += [Cell("hypersd", n, "p", 0, tile if n != 8 else None, 0.1, label=label,
                       error="" if n != 8 else "failed") for n in COMPARE_STEPS]
    csv, png = compare_files(cells, ["p"], cells_table(cells))
    frame = pd.read_csv(csv)
    assert len(frame) == 9 and "my-run [TSCD k=8, 3 steps, hypersd]" in set(frame.method)
    with Image.open(png) as im:
        assert im.size == (260 + 4 * 132 + 4, 24 + 3 * 132 + 4)  # labels + 4 steps, 3 rows
        assert im.getpixel((260 + 60, 24 + 132 + 60)) == (200, 0, 0)  # a drawn cell
        assert im.getpixel((260 + 3 * 132 + 60, 24 + 2 * 132 + 10)) == (200, 200, 200)  # n/a


def test_sample_grid_says_its_step(tmp_path):
    from train_tab.ui import sample_display

    path = tmp_path / "step-0000120.png"
    Image.new("RGB", (64, 32), (0, 0, 255)).save(path)  # two 32 px cells
    shown = sample_display(path)
    assert shown.size == (512, 256 + 22)  # two cells enlarged to 256 px, under a band
    band = shown.crop((0, 0, shown.width, 22)).convert("L")
    assert min(band.getdata()) < 128  # the "step 120" text is drawn on the white band
