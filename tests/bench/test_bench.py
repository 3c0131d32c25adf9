"""Benchmarks and the paper-style evaluation on tiny random models: the code paths and
the output keys (never timings)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# the tiny reward builders of the rewards tests, through the same loading code
from rewards.test_rewards import TINY_CLIP, tiny_imagereward, tiny_open_clip, tiny_pickscore  # noqa: F401
from safetensors.torch import save_file

from hypersd_core.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_ARGS = ["--quick", "--steps", "1,2", "--methods", "hypersd,lcm", "--teacher-steps", "2",
             "--repeats", "1", "--big-batch", "2", "--train-batch", "2", "--batches", "1,2"]


@pytest.mark.slow  # every part of both models (the smoke steps: tests/bench/test_gpu_check.py)
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's code at tiny sizes on the CPU: every part runs, one JSON file."""
    from hypersd_core.bench.gpu import load_configs, run_gpu_check

    out = tmp_path / "gpu.json"
    result = run_gpu_check(out=out, dry_run=True, log=lambda *a: None)
    assert json.loads(out.read_text())["dry_run"] is True
    for kind in ("sdxl", "sd15"):
        m = result["models"][kind]
        for part in ("latency", "vae", "lora_fused", "resolution_scaling", "training"):
            assert "error" not in json.dumps(m[part]), (kind, part, m[part])
        assert {"hypersd_1step", "hypersd_4step", "teacher_3step_cfg"} <= set(m["latency"])
        assert 0 < m["vae"]["vae_decode_share"]
        assert {"fused_1step_ms", "unfused_1step_ms", "fused_4step_ms"} <= set(m["lora_fused"])
        assert [r["batch"] for r in m["training"]] == [1, 2]
        assert all(r["step_ms"] > 0 and r["peak_mb"] > 0 for r in m["training"])
    # the shipped configs are the full public architectures (nothing downloaded)
    cfg = load_configs("sdxl")
    assert cfg["unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert cfg["text_encoder_2"]["hidden_size"] == 1280
    assert load_configs("sd15")["unet"]["block_out_channels"] == [320, 640, 1280, 1280]


def test_gpu_check_needs_cuda_or_dry_run():
    from hypersd_core.bench.gpu import run_gpu_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="--dry-run"):
        run_gpu_check(dry_run=False)


def _run_tiny_bench(model, out, stages: str, pass_out: bool = True) -> dict:
    """Run the tiny bench; ``pass_out=False`` leaves --out to its default (``out`` is then
    where the run is expected to write)."""
    where = ["--out", str(out)] if pass_out else []
    assert cli_main(["bench", "--model", str(model), *where, "--device", "cpu",
                     "--stages", stages, *TINY_ARGS]) == 0
    return json.loads(out.read_text())


def _git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    """A git checkout holding the project's .gitignore and tracked assets/results/bench.*,
    as the working directory."""
    from hypersd_core.paths import ROOT

    repo = tmp_path / "repo"
    (repo / "assets" / "results").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    for name in ("bench.json", "bench.md", "bench.png"):
        shutil.copy(ROOT / "assets" / "results" / name, repo / "assets" / "results" / name)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tracked")
    monkeypatch.chdir(repo)
    return repo


@pytest.mark.slow  # a whole tiny bench run (the fast checks: out_path, publish_section)
def test_bench_quick_on_tiny_model(tiny_sd15, project_copy, capsys):
    """A tiny ``bench --quick``-like run through the command line, without --out: JSON keys,
    tables, plot, all under the git-ignored out/bench/; no tracked file changes."""
    out = project_copy / "out" / "bench" / "bench.json"
    result = _run_tiny_bench(tiny_sd15, out, "tscd,dmd", pass_out=False)
    assert _git(project_copy, "status", "--porcelain") == ""
    for key in ("header", "plan", "sampling", "vs_stock", "breakdown", "grid", "switch", "training",
                "scaling_sampling", "scaling_training", "summary"):
        assert key in result, key
    for key in ("torch", "diffusers", "cpu", "cpu_count", "device"):
        assert key in result["header"]
    pairs = {(r["method"], r["steps"]) for r in result["sampling"]}
    assert pairs == {("teacher", 2), ("hypersd", 1), ("hypersd", 2), ("lcm", 1), ("lcm", 2)}
    row = result["sampling"][1]
    assert {"median_s", "images_per_s", "speedup_vs_teacher"} <= set(row["b1"]) and "b2" in row
    # ours vs stock unfused / fused per (method, steps) of the plan, the same images
    assert {(r["method"], r["steps"]) for r in result["vs_stock"]} == {
        ("teacher", 2), ("lcm", 1), ("hypersd", 1)}
    for r in result["vs_stock"]:
        assert r["max_pixel_diff_vs_unfused"] <= 1 and r["max_pixel_diff_vs_fused"] <= 1, r
        assert r["ratio_vs_unfused"] > 0 and r["ratio_vs_fused"] > 0
    br = result["breakdown"]
    assert br["speedup"] > 0 and br["hypersd_1step_parts_s"]["unet"] > 0
    assert set(br["hypersd_1step_parts_s"]) == set(br["teacher_parts_s"])
    grid = result["grid"]
    from hypersd_core.app.service import COMPARE_METHODS, COMPARE_STEPS

    assert grid["cells"] == 1 + len(COMPARE_METHODS) * len(COMPARE_STEPS)
    assert grid["new_prompt_seed"]["median_s"] > 0
    assert grid["errors"] < grid["cells"]  # adapters missing on the tiny model fill notes only
    assert result["switch"]["share_of_one_step"] > 0
    stages = {r["stage"]: r for r in result["training"]}
    assert set(stages) == {"tscd", "dmd"}
    assert all(r["ratio"] > 0 and r["memory"]["peak_mb"] > 0 for r in stages.values())
    assert [r["batch"] for r in result["scaling_training"]] == [1, 2]
    assert {"hypersd1_speedup_vs_teacher", "ours_vs_stock_unfused_1step", "ours_vs_stock_fused_1step",
            "grid_s", "switch_share_of_one_step", "tscd_step_ratio"} <= set(result["summary"])
    md = out.with_suffix(".md").read_text()
    assert "| tscd |" in md and "speed-up vs teacher-2" in md
    assert "stock unfused ms" in md and "| pipeline_overhead |" in md and "Compare grid" in md
    assert out.with_suffix(".png").stat().st_size > 0
    assert "Key figures" in capsys.readouterr().out


@pytest.mark.slow  # a whole tiny bench run (the fast checks: out_path, publish_section)
def test_bench_every_stage_type(tiny_sdxl, tmp_path):
    """Every stage type's training step on a tiny SDXL-shaped model."""
    result = _run_tiny_bench(tiny_sdxl, tmp_path / "bench.json",
                             "tscd,tscd+adv,lcm,tcd,feedback,dmd,dmd-critic")
    stages = {r["stage"]: r for r in result["training"]}
    assert set(stages) == {"tscd", "tscd+adv", "lcm", "tcd", "feedback", "dmd", "dmd-critic"}
    # the digits DMD preset (DMD2's two time scales) has critic-only steps to time
    for name, r in stages.items():
        assert "skipped" not in r, (name, r)
        assert r["ratio"] > 0 and r["samples_per_s"] > 0 and r["memory"]["peak_mb"] > 0


def test_bench_arguments_are_checked(tiny_sd15, tmp_path):
    assert cli_main(["bench", "--model", str(tiny_sd15), "--methods", "nope",
                     "--out", str(tmp_path / "b.json")]) == 2
    assert cli_main(["bench", "--dry-run", "--out", str(tmp_path / "b.json")]) == 2


def test_only_update_readme_publishes(tmp_path, monkeypatch):
    """--update-readme writes assets/results (never with --out) and the docs section, whose
    links resolve from the doc's own folder."""
    import argparse

    from hypersd_core.bench import report, run

    args = argparse.Namespace(update_readme=False, out=None)
    assert run.out_path(args, "bench.json") == Path("out/bench/bench.json")
    args.out = str(tmp_path / "x.json")
    assert run.out_path(args, "bench.json") == tmp_path / "x.json"
    args.update_readme = True
    with pytest.raises(ValueError, match="leave out --out"):
        run.out_path(args, "bench.json")
    args.out = None
    assert run.out_path(args, "bench_gpu.json") == run.PUBLISHED / "bench_gpu.json"

    doc = tmp_path / "docs" / "performance.md"
    doc.parent.mkdir()
    doc.write_text("# Performance\n\nnotes\n\n## Bench figures\n\nold\n")
    monkeypatch.setattr(report, "PERFORMANCE_DOC", doc)
    run.publish_section()
    text = doc.read_text()
    assert "old" not in text and "notes" in text and "Digits world on the CPU" in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert any(link.endswith("bench.png") for link in links)
    for link in links:
        if not link.startswith("http"):
            assert (doc.parent / link).is_file(), link


def test_update_readme_replaces_only_its_section(tmp_path):
    from hypersd_core.bench.report import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n## Usage\n\nrun it\n")
    update_readme(readme, "first figures")
    assert readme.read_text() == "# Title\n\nintro\n\n## Usage\n\nrun it\n\n## Bench figures\n\nfirst figures\n"
    readme.write_text(readme.read_text() + "\n## Later\n\nkept\n")
    update_readme(readme, "new figures")
    text = readme.read_text()
    assert "new figures" in text and "first figures" not in text
    assert text.startswith("# Title\n\nintro\n\n## Usage\n\nrun it\n") and text.endswith("## Later\n\nkept\n")


# ---------------------------------------------------------------- evaluate_real


@pytest.fixture(scope="module")
def reward_config(tiny_open_clip, tiny_imagereward, tiny_pickscore, tmp_path_factory):  # noqa: F811
    from hypersd_core.rewards.aesthetic import AestheticMLP

    folder = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(1)
    save_file(AestheticMLP(16).state_dict(), str(folder / "mlp.safetensors"))
    cfg = {"clip": {"path": str(tiny_open_clip), "model": TINY_CLIP},
           "aesthetic": {"path": str(folder / "mlp.safetensors"), "clip_path": str(tiny_open_clip),
                         "model": TINY_CLIP},
           "imagereward": {"path": str(tiny_imagereward)},
           "pickscore": {"path": str(tiny_pickscore)}}
    path = folder / "rewards.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd15, tmp_path_factory):
    from hypersd_core.bench.measure import random_adapter
    from hypersd_core.models.backbone import load_backbone

    return random_adapter(load_backbone(str(tiny_sd15)), "hyper", 4,
                          tmp_path_factory.mktemp("lora"))


def test_evaluate_real_tiny(tiny_sd15, tiny_lora, reward_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red handwritten digit 7\n\na blue handwritten digit 1\n")
    out = tmp_path / "real.json"
    assert cli_main(["evaluate", "--model", str(tiny_sd15), "--methods", "teacher,hypersd",
                     "--steps", "1,2", "--teacher-steps", "2", "--prompts", str(prompts),
                     "--metrics", "clip,aesthetic,imagereward,pickscore",
                     "--adapter", f"hypersd={tiny_lora}", "--reward-config", str(reward_config),
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "sd15" and data["num_prompts"] == 2
    assert [(r["method"], r["steps"]) for r in data["rows"]] == [("teacher", 2), ("hypersd", 1),
                                                                  ("hypersd", 2)]
    for r in data["rows"]:
        for m in ("clip", "aesthetic", "imagereward", "pickscore"):
            assert isinstance(r[m], float) and r[m] == r[m]
    md = out.with_suffix(".md").read_text()
    assert "| method | steps | adapter | CLIP | Aes | IR | Pick |" in md
    assert "Hyper-SD15 (LoRA)" in md  # the paper's rows beside ours


def test_evaluate_real_clear_errors(tiny_sd15, tiny_lora, tmp_path, capsys, monkeypatch):
    from hypersd_core.evaluation.paper_metrics import parse_metrics, reward_settings

    base = ["evaluate", "--model", str(tiny_sd15), "--methods", "hypersd", "--steps", "1",
            "--out", str(tmp_path / "r.json")]
    monkeypatch.delenv("HYPERSD_CLIP_WEIGHTS", raising=False)
    assert cli_main([*base, "--metrics", "clip", "--reward-weights", f"clip={tmp_path}/none"]) == 2
    err = capsys.readouterr().err
    assert "--reward-weights clip=PATH" in err and "HYPERSD_CLIP_WEIGHTS" in err
    with pytest.raises(ValueError, match="unknown metrics"):
        parse_metrics("clip,fid")
    monkeypatch.setenv("HYPERSD_PICKSCORE_WEIGHTS", "/w/pick")
    assert reward_settings(["pickscore"])["pickscore"]["path"] == "/w/pick"
    assert cli_main([*base, "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "prompt file not found" in capsys.readouterr().err


def test_coco_prompts_ship():
    from hypersd_core.evaluation.paper_metrics import DEFAULT_PROMPTS, read_prompts

    prompts = read_prompts(DEFAULT_PROMPTS)
    assert len(prompts) == 100 and len(set(prompts)) == 100
