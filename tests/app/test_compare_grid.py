"""The compare grid: batched and cached, and still the images of per-cell generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypersd_core.app.service import TEACHER_REFERENCE_STEPS, ModelService, compare_grid
from hypersd_core.models import lora as L
from hypersd_core.models.backbone import load_backbone

STEPS = (1, 2)


def _lora(folder, out, seed):
    backbone = load_backbone(str(folder))
    torch.manual_seed(seed)
    params = L.add_lora(backbone.unet, rank=4, alpha=4.0, adapter_name="x")
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    return L.save_lora(backbone.unet, out, adapter_name="x")


@pytest.fixture(scope="module")
def rows(tiny_sd15, tmp_path_factory):
    a = str(_lora(tiny_sd15, tmp_path_factory.mktemp("grid-a"), 21))
    b = str(_lora(tiny_sd15, tmp_path_factory.mktemp("grid-b"), 22))
    return [("teacher", None, "teacher"), ("hypersd", a, "A"), ("lcm", b, "B"),
            ("hypersd-unified", a, "A unified")]


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


def _per_cell(service, cell, rows):
    adapter = next(a for m, a, label in rows if label == cell.label) if cell.label in \
        {r[2] for r in rows} else None
    steps = cell.steps
    return service.generate(cell.method, steps, [cell.prompt], [cell.seed], adapter=adapter)[0]


def test_one_prompt_grid_is_identical_to_per_cell_generation(tiny_sd15, rows):
    service = ModelService(str(tiny_sd15), device="cpu")
    cells, errors, seconds = compare_grid(service, ["a red handwritten digit 7"], [5], rows, STEPS)
    assert errors == {} and seconds > 0
    assert len(cells) == 1 + len(rows) * len(STEPS) and all(c.image is not None for c in cells)
    assert cells[0].label == "teacher (reference)" and cells[0].steps == TEACHER_REFERENCE_STEPS
    assert [(c.label, c.steps) for c in cells[1:]] == [(r[2], n) for r in rows for n in STEPS]
    fresh = ModelService(str(tiny_sd15), device="cpu")  # nothing cached, nothing fused before
    for cell in cells[1:]:
        alone = _per_cell(fresh, cell, rows)
        assert np.array_equal(_pixels(alone.image), _pixels(cell.image)), (cell.label, cell.steps)
    ref = fresh.generate("teacher", TEACHER_REFERENCE_STEPS, [cells[0].prompt], [5])[0]
    assert np.array_equal(_pixels(ref.image), _pixels(cells[0].image))
    # rows differ from each other (the adapters act)
    assert not np.array_equal(_pixels(cells[1].image), _pixels(cells[3].image))


def test_grid_batches_prompts_and_computes_the_reference_once(tiny_sd15, rows):
    service = ModelService(str(tiny_sd15), device="cpu")
    calls = []
    real = service.generate

    def counting(method, steps, prompts, seeds, **kw):
        calls.append((method, steps, tuple(prompts)))
        return real(method, steps, prompts, seeds, **kw)

    service.generate = counting
    prompts = ["a red handwritten digit 7", "a blue handwritten digit 1", "a red handwritten digit 7"]
    cells, _, _ = compare_grid(service, prompts, [5, 5, 5], rows, STEPS)
    assert len(cells) == len(prompts) * (1 + len(rows) * len(STEPS))
    # one call per (row, steps) for the two distinct prompts, one for the reference
    assert len(calls) == 1 + len(rows) * len(STEPS)
    assert all(len(c[2]) == 2 for c in calls)
    grid_cells = cells[len(prompts):]
    for i, cell in enumerate(grid_cells):
        assert cell.prompt == prompts[i % len(prompts)]
        alone = _per_cell(service, cell, rows)
        # the batched CPU kernels may round a last bit differently from a batch of one
        assert np.abs(_pixels(alone.image) - _pixels(cell.image)).max() <= 1, (cell.label, cell.steps)
    calls.clear()
    again, _, _ = compare_grid(service, prompts[:2], [5, 5], rows, STEPS)
    assert not [c for c in calls if c[1] == TEACHER_REFERENCE_STEPS]  # reference from the cache
    assert np.array_equal(_pixels(again[0].image), _pixels(cells[0].image))
    cells[0].scores["x"] = 1.0
    assert again[0].scores == {}  # cached cells are copies
