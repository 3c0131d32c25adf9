"""The scenes build: a tiny world end to end, resuming on the same weights, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hypersd_core.scenes import build as B


def test_a_stopped_loop_resumes_on_the_uninterrupted_weights(tmp_path):
    cfg = B.SceneBuildConfig(**{**B.TINY, "checkpoint_every": 2})

    def run(work, stop_at=None):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        sched = B._warmup_cosine(opt, 8, warm=2)

        def step(i, g):
            if i == stop_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 4, generator=g)
            loss = (net(x) - x.flip(1)).pow(2).mean() + 0.0 * torch.rand(1).sum()
            opt.zero_grad()
            loss.backward()
            return {"loss": loss.item()}

        B.resumable_loop("t", work, {"net": net}, opt, sched, 8, step, cfg)
        return net

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=5)
    resumed = run(tmp_path / "b")
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_a_changed_configuration_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_train": 1}))
    with pytest.raises(ValueError, match="another configuration"):
        B.build(tmp_path / "out", tmp_path, B.SceneBuildConfig(**B.TINY), phases=("data",))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    out = subprocess.run(
        [sys.executable, "-m", "hypersd_core", "build-scenes", "--tiny", "--threads", "1",
         "--work", str(root / "work"), "--out", str(root / "world")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return root


def test_the_tiny_build_is_a_stock_pipeline_that_samples_64px(tiny_world, tmp_path):
    from PIL import Image

    from hypersd_core.models.backbone import load_backbone

    world = tiny_world / "world"
    backbone = load_backbone(str(world / "pipeline"))
    assert backbone.kind == "scenes" and backbone.resolution == 64
    times = json.loads((world / "build_times.json").read_text())
    assert set(times["wall_s"]) >= {"data", "vae", "text_encoder", "unet", "eval"}
    assert (world / "eval" / "detector.safetensors").is_file()
    prompt = json.loads(subprocess.run(
        [sys.executable, "-m", "hypersd_core", "prompts", "--model", "scenes", "--n", "1",
         "--json"], capture_output=True, text=True, check=True).stdout)["prompt"]
    res = subprocess.run(
        [sys.executable, "-m", "hypersd_core", "sample", "--model", str(world / "pipeline"),
         "--method", "teacher", "--steps", "2", "--prompt", prompt, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    images = sorted(tmp_path.glob("*.png"))
    assert images and Image.open(images[0]).size == (64, 64)


@pytest.mark.slow
def test_evaluate_runs_on_the_tiny_world(tiny_world, tmp_path):
    from hypersd_core.scenes.evaluate import main

    world = tiny_world / "world"
    assert main(["--model", str(world / "pipeline"), "--rows", "teacher:1,teacher:2",
                 "--num-images", "8", "--reference-images", "16", "--bootstrap", "5",
                 "--floor-splits", "3",
                 "--eval-nets", str(world / "eval"), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "scenes_eval.json").read_text())
    assert set(res["rows"]) == {"teacher@1", "teacher@2"}
    row = res["rows"]["teacher@1"]
    assert 0 <= row["all_correct"] <= 100 and len(row["fd_detector_ci"]) == 2
    md = (tmp_path / "scenes_eval.md").read_text()
    assert "real vs real" in md and "(c) at 2 steps" in md
    assert "a" not in res["criteria"] and res["criteria"]["c2"]["met"] is None


def test_prompts_cli_gives_ground_truth_for_both_worlds():
    for model, key in (("scenes", "objects"), ("digits", "digit")):
        out = subprocess.run([sys.executable, "-m", "hypersd_core", "prompts", "--model", model,
                              "--n", "3", "--seed", "7", "--json"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert len(out) == 3 and all(key in json.loads(line) for line in out)
    bad = subprocess.run([sys.executable, "-m", "hypersd_core", "prompts", "--n", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--n must be >= 1" in bad.stderr


def test_hidden_words_leave_only_the_states_that_saw_the_whole_caption():
    """The text encoder is causal: the first object's word states are the same whatever
    relation follows; hiding the words must keep exactly the states from the end token on."""
    from transformers import CLIPTokenizer

    from hypersd_core.paths import SCENES_DIR
    from hypersd_core.scenes.captions import caption_ends, hide_words, tokenize
    from hypersd_core.worlds import scenes as world

    tok = CLIPTokenizer.from_pretrained(SCENES_DIR / "pipeline" / "tokenizer")
    items = world.scenes("train", 64)
    ids = tokenize(tok, [s.prompt for s in items])
    ends = caption_ends(64)
    assert torch.equal((ids == ids[0, -1]).int().argmax(1), ends)  # the end token's place
    cond = torch.randn(64, ids.shape[1], 8)
    g = torch.Generator().manual_seed(0)
    out = hide_words(cond, ends, 0.5, g)
    hidden = [i for i in range(64) if not torch.equal(out[i], cond[i])]
    assert 16 < len(hidden) < 48
    for i in hidden:
        e = int(ends[i])
        assert torch.equal(out[i, 1:e], cond[i, :1].expand(e - 1, 8))  # words: the start state
        assert torch.equal(out[i, e:], cond[i, e:]) and torch.equal(out[i, 0], cond[i, 0])
    assert torch.equal(hide_words(cond, ends, 0.0), cond)


def test_build_configuration_overrides_are_typed_and_refuse_unknown_keys():
    from hypersd_core.cli_worlds import config_overrides

    assert config_overrides(["unet_word_drop=0.5", "unet_channels=48,96,96",
                             "text_layout=false", "unet_steps=10"]) == {
        "unet_word_drop": 0.5, "unet_channels": (48, 96, 96), "text_layout": False,
        "unet_steps": 10}
    with pytest.raises(ValueError, match="KEY one of"):
        config_overrides(["unet_word_dropp=0.5"])
    with pytest.raises(ValueError, match="cannot read 'x' as int"):
        config_overrides(["unet_steps=x"])
