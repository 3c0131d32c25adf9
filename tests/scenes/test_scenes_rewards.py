"""The scenes rewards: what the alignment score reads from the cells, the degradations the
quality score learns, and (once shipped) that they rank clean above noisy and off-hue."""

from __future__ import annotations

import pytest
import torch

from hypersd_core.rewards import scenes as R
from hypersd_core.worlds import scenes as W


def _logits(items, swap=False, colour_shift=0, extra=False):
    """CellNet-shaped logits that say exactly what the scenes hold (or one error)."""
    b = len(items)
    cls = torch.full((b, 4, R.EMPTY + 1), -20.0)
    cls[..., R.EMPTY] = 20.0
    col = torch.full((b, 4, len(W.COLOURS)), -20.0)
    size = torch.full((b, 4, len(W.SIZES)), -20.0)
    for i, s in enumerate(items):
        objs = s.objects
        cells = [o.cell[0] * 2 + o.cell[1] for o in objs]
        if swap and len(cells) == 2:
            cells = cells[::-1]
        for o, c in zip(objs, cells):
            cls[i, c, R.EMPTY] = -20.0
            cls[i, c, W.CLASSES.index(o.cls)] = 20.0
            col[i, c, (W.COLOUR_NAMES.index(o.colour) + colour_shift) % len(W.COLOURS)] = 20.0
            size[i, c, W.SIZE_NAMES.index(o.size)] = 20.0
        if extra:
            free = next(c for c in range(4) if c not in cells)
            cls[i, free, R.EMPTY] = -20.0
            cls[i, free, 0] = 20.0
    return {"cls": cls, "colour": col, "size": size}


def test_alignment_is_full_for_the_truth_and_drops_for_each_error():
    items = [s for s in W.scenes("eval", 60)]
    rel = [s for s in items if s.template == "relation"][:10]
    cnt = [s for s in items if s.template == "count" and s.count == 2][:10]
    truth = R.alignment_from_logits(_logits(rel + cnt), rel + cnt)
    assert torch.allclose(truth, torch.ones_like(truth), atol=1e-4)
    assert (R.alignment_from_logits(_logits(rel, colour_shift=1), rel) < 0.1).all()
    assert (R.alignment_from_logits(_logits(rel, swap=True), rel) < 0.1).all()
    assert (R.alignment_from_logits(_logits(cnt, extra=True), cnt) < 0.9).all()


def test_degradations_are_identity_at_zero_and_grow_with_severity():
    g = torch.Generator().manual_seed(0)
    x = W.render_many(W.scenes("reward", 8)).float() / 255
    for kind in range(5):
        k = torch.full((8,), kind)
        assert torch.allclose(R.degrade(x, torch.zeros(8), k, g), x, atol=1e-5)
        err = [(R.degrade(x, torch.full((8,), s), k, g) - x).abs().mean() for s in (0.2, 0.6, 1.0)]
        assert err[0] < err[1] < err[2], kind


def test_tiny_rewards_load_by_name_and_are_differentiable(tmp_path):
    from hypersd_core.rewards.base import load_reward
    from hypersd_core.rewards.scenes_train import train_scenes_rewards

    train_scenes_rewards(tmp_path, n_images=16, steps=2, batch_size=4, width=4)
    items = W.scenes("test", 3)
    x = (W.render_many(items).float() / 255).requires_grad_(True)
    for name in ("scenes-quality", "scenes-alignment"):
        r = load_reward(name, path=tmp_path)
        s = r.score(x, [i.prompt for i in items])
        assert s.shape == (3,) and ((0 <= s) & (s <= 1)).all()
        s.sum().backward()
        assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not a scenes prompt"):
        load_reward("scenes-alignment", path=tmp_path).score(x[:1], ["a red digit 7"])


@pytest.mark.skipif(not (R.REWARDS_DIR / "quality.safetensors").is_file(),
                    reason="the scenes rewards are not built")
def test_shipped_quality_ranks_clean_above_noise_blur_and_off_hue():
    from hypersd_core.rewards.base import load_reward

    q = load_reward("scenes-quality")
    g = torch.Generator().manual_seed(1)
    x = W.render_many(W.scenes("test", 64)).float() / 255
    clean = q.score(x, "").mean()
    for kind in (0, 1, 3):
        bad = R.degrade(x, torch.full((64,), 0.8), torch.full((64,), kind), g)
        assert q.score(bad, "").mean() < clean - 0.2, kind
    assert q.score(torch.rand(64, 3, 64, 64, generator=g), "").mean() < 0.2


@pytest.mark.slow
@pytest.mark.skipif(not (R.REWARDS_DIR / "quality.safetensors").is_file(),
                    reason="the scenes rewards are not built")
def test_shipped_rewards_rank_the_teachers_steps_and_degradations_on_held_out_scenes():
    """On held-out ``test`` scenes: scenes-quality and scenes-alignment rank the teacher's
    1 < 2 < 4 <= 25 steps (within 0.02) below real renders, and uniform noise, off-hue and
    blotchy renders below the 2-step teacher (the feedback stage must not prefer them)."""
    from hypersd_core.rewards.scenes_rank import ranking_sets, ranking_table

    rows = {r["set"]: r for r in ranking_table(ranking_sets(48), n_boot=10)}
    for name in ("scenes-quality", "scenes-alignment"):
        v = {k: r[name] for k, r in rows.items()}
        assert v["teacher@1"] < v["teacher@2"] < v["teacher@4"] <= v["teacher@25"] + 0.02, (name, v)
        assert v["real renders"] > v["teacher@25"], (name, v)
        for low in ("uniform noise", "off-hue renders", "blotchy renders"):
            assert v[low] < v["teacher@2"], (name, low, v)
