"""Settings of a many-process run: per-step seeds distinct on every process, the
accelerate config's mixed precision honoured (a conflict refused in one line), and the
memory plan's table printed as documented."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image_folder

from hypersd_core.training.config import make_config
from hypersd_core.training.runs import Run
from hypersd_core.training.trainer import _step_generator, train


def test_step_seeds_never_repeat_across_processes():
    """A 1024-process run: every (step, process) draws its own stream. A CPU generator
    uses the low 32 bits of its seed; the old ``seed*1_000_003 + step*101 + rank`` gave
    rank 101 at step 0 the stream of rank 0 at step 1."""
    cfg = make_config({"model": "digits", "seed": 7})
    world = 1024
    seeds = {_step_generator(cfg, step, rank, world).initial_seed() % 2**32
             for step in range(200) for rank in range(world)}
    assert len(seeds) == 200 * world
    a, b = (torch.randn(4, generator=_step_generator(cfg, 0, r, world)) for r in (0, 101))
    assert not torch.equal(a, b)
    # one process keeps its stream (a run resumed after this change draws the same batches)
    assert _step_generator(cfg, 5, 0).initial_seed() == 7 * 1_000_003 + 5 * 101


@pytest.fixture
def small_run(tiny_sd15, tmp_path):
    (tmp_path / "data").mkdir()
    data = make_image_folder(tmp_path / "data", 4)

    def make(**kw):
        cfg = make_config({"model": str(tiny_sd15), "data": str(data), "steps": 1, "batch_size": 2,
                           "log_every": 1, "sample_every": 100, "checkpoint_every": 100,
                           "lora_rank": 4, "lora_alpha": 4, "sample_prompts": ["a red digit 1"],
                           **kw})
        return Run.create(tmp_path / "run", cfg)

    return make


def test_the_accelerate_configs_mixed_precision_is_honoured(small_run, monkeypatch):
    """`accelerate launch --config_file X` passes X's mixed_precision in the environment;
    a run config with "no" trains in it (status.json records what it trained in)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = small_run(mixed_precision="no")
    status = train(run.dir)
    assert status["state"] == "done" and status["mixed_precision"] == "bf16"


def test_a_mixed_precision_conflict_is_one_line(small_run, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    run = small_run(mixed_precision="bf16")
    with pytest.raises(ValueError, match="mixed_precision conflict: the run config says bf16, "
                                         "the accelerate config says fp16") as err:
        train(run.dir)
    assert "\n" not in str(err.value)
    assert run.status()["state"] == "failed"


def test_memory_plan_markdown_prints_the_shipped_table(capsys):
    """README: `python -m hypersd_core.bench.memory_plan --markdown` (no file: the shipped rows)."""
    from hypersd_core.bench.memory_plan import main

    assert main(["--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| model | stage |")
    assert any(line.startswith("| sdxl | DMD |") for line in lines)
