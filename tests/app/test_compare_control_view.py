"""Compare under ControlNet control: the results say they are controlled (control image,
at a readable size, and scale, with the grid), and the button sits next to Compare,
right above the results."""

from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image
from test_app import free_port


@pytest.fixture()
def settings(tmp_path):
    from hypersd_core.app.service import AppSettings

    return AppSettings.from_env(model="digits", runs_dir=tmp_path / "runs",
                                study_db=tmp_path / "study" / "votes.db",
                                lora_dir=tmp_path / "loras", models_dir=tmp_path / "models",
                                data_dir=tmp_path / "data", port=free_port())


def _fake_grid(monkeypatch, seen):
    """compare_grid without a model: one grey 32 px image per cell."""
    import compare_tab.compare as compare
    from hypersd_core.app.service import Cell

    def fake(service, prompts, seeds, rows, steps, rewards, control_image=None,
             control_scale=1.0):
        seen.update(control_image=control_image, control_scale=control_scale)
        cells = [Cell("teacher", 25, prompts[0], seeds[0], Image.new("RGB", (32, 32)), 0.1,
                      label="teacher (reference)")]
        cells += [Cell(m, n, prompts[0], seeds[0], Image.new("RGB", (32, 32)), 0.1, label=lb)
                  for m, _, lb in rows for n in steps]
        return cells, {}, 1.0

    monkeypatch.setattr(compare, "compare_grid", fake)


class _Service:
    device = "cpu"

    def has_onestep_unet(self):
        return False


def test_a_controlled_grid_says_so_with_its_control_image_and_scale(settings, monkeypatch):
    from compare_tab.compare import GRID_KEY, grid_html, run_compare
    from compare_tab.control import heldout_mask

    seen = {}
    _fake_grid(monkeypatch, seen)
    mask = heldout_mask("held-out #0: digit 2")
    *_, summary, images = run_compare(_Service(), settings, "a red handwritten digit 2", 0,
                                      [], [], mask, 0.7)
    assert seen["control_image"] is mask and seen["control_scale"] == 0.7
    assert "Under ControlNet control" in summary and "0.7" in summary
    grid = images[GRID_KEY]
    page = grid_html(grid["cells"], grid["prompts"], grid["control"])
    assert 'id="compare-control-note"' in page and "scale <b>0.7</b>" in page
    note = page.split('id="compare-control-note"')[1].split("</div>")[0]
    assert 'width="128"' in note and "pixelated" in note  # 4x the 32 px mask, never smoothed
    # an uncontrolled grid says nothing of control
    *_, plain_summary, plain = run_compare(_Service(), settings, "a red handwritten digit 2", 0,
                                           [], [])
    assert "control" not in plain_summary.lower()
    assert "compare-control-note" not in grid_html(plain[GRID_KEY]["cells"],
                                                   plain[GRID_KEY]["prompts"],
                                                   plain[GRID_KEY]["control"])


def _order(layout: dict) -> list[int]:
    out = [layout["id"]]
    for child in layout.get("children", []):
        out += _order(child)
    return out


def test_control_button_sits_next_to_compare_above_the_results(settings, tmp_path, monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    demo = app.build_demo(settings)
    try:
        by_elem = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
        order = _order(demo.config["layout"])
        at = {name: order.index(by_elem[name]._id) for name in
              ("compare-button", "compare-control-button", "compare-grid-view")}
        # the two buttons are neighbours, and only the summary lies between them and the grid
        assert abs(at["compare-button"] - at["compare-control-button"]) == 1
        assert 0 < at["compare-grid-view"] - max(at["compare-button"],
                                                 at["compare-control-button"]) <= 2
        preview = by_elem["compare-control-preview"]
        assert isinstance(preview, gr.Image) and preview.height >= 256
        assert "pixelated" in preview.elem_classes
    finally:
        demo.hypersd["store"].close()
