"""``bench --gpu-speed --dry-run``: the GPU comparison's code at tiny sizes on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from hypersd_core.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_speed_dry_run_through_the_command_line(tmp_path):
    out = tmp_path / "speed.json"
    assert cli_main(["bench", "--gpu-speed", "--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["errors"] == []
    for kind in ("sd15", "sdxl"):
        m = result["models"][kind]
        assert [(r["method"], r["steps"]) for r in m["vs_stock"]] == [("hypersd", 1), ("hypersd", 2)]
        for r in m["vs_stock"]:
            assert {"ours", "stock_unfused", "stock_fused"} <= set(r)
            assert r["ratio_vs_unfused"] > 0 and r["ratio_vs_fused"] > 0
            assert r["max_pixel_diff_vs_unfused"] <= 2 and r["max_pixel_diff_vs_fused"] <= 2, r
        assert m["switch"]["median_s"] > 0 and m["switch"]["originals_mb"] > 0
        assert m["breakdown"]["speedup"] > 0


def test_gpu_speed_needs_cuda_or_dry_run(tmp_path):
    from hypersd_core.bench.gpu_speed import run_gpu_speed

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="--dry-run"):
        run_gpu_speed(out=tmp_path / "x.json")
