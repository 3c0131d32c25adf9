"""The shipped digits rewards: differentiable, real above degraded, the right digit and
colour above the wrong ones, their ranking of the teacher's steps and of noise, training
them, and scoring image files with them."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_rewards import _check_protocol  # noqa: E402 (the protocol check every reward passes)

from hypersd_core.rewards import (  # noqa: E402
    load_reward,
    score_images,
)
from hypersd_core.worlds import digits as world  # noqa: E402

# ---------------------------------------------------------------- digits rewards (shipped)


@pytest.fixture(scope="module")
def heldout():
    data = world.DigitsDataset("heldout").tensors()
    idx = torch.randperm(data["images"].shape[0], generator=torch.Generator().manual_seed(0))[:96]
    return {k: v[idx] for k, v in data.items()} | {"x": (data["images"][idx] + 1) / 2}


def test_digits_rewards_differentiable():
    for name in ("digits-quality", "digits-alignment"):
        _check_protocol(load_reward(name), "a red handwritten digit 7", 2, 32, 32)
    # any size is scored at 32x32: the 256 px nearest-neighbour enlargement the app shows
    # scores exactly as its 32 px original
    small = torch.rand(2, 3, 32, 32)
    shown = small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    for name in ("digits-quality", "digits-alignment"):
        r = load_reward(name)
        assert torch.allclose(r.score(shown, "a red handwritten digit 7"),
                              r.score(small, "a red handwritten digit 7"), atol=1e-6)
    with pytest.raises(ValueError, match="not a digits-world prompt"):
        load_reward("digits-alignment").score(torch.rand(1, 3, 32, 32), "a cat")


def test_digits_quality_real_beats_degraded(heldout):
    from hypersd_core.rewards.digits_train import DEGRADATIONS

    q = load_reward("digits-quality")
    g = torch.Generator().manual_seed(0)
    real = q.score(heldout["x"], "").mean()
    assert real > 0.7
    for name, fn in DEGRADATIONS.items():
        assert q.score(fn(heldout["x"], g), "").mean() < real - 0.2, name


def test_digits_alignment_correct_beats_wrong(heldout):
    a = load_reward("digits-alignment")
    d, c = heldout["digits"], heldout["colours"]
    right = [world.caption(world.COLOUR_NAMES[ci], int(di)) for ci, di in zip(c, d)]
    wrong_digit = [world.caption(world.COLOUR_NAMES[ci], int(di + 3) % 10) for ci, di in zip(c, d)]
    wrong_colour = [world.caption(world.COLOUR_NAMES[(ci + 2) % 8], int(di)) for ci, di in zip(c, d)]
    s = a.score(heldout["x"], right)
    assert s.mean() > 0.6
    assert (s > a.score(heldout["x"], wrong_digit)).float().mean() > 0.85
    assert (s > a.score(heldout["x"], wrong_colour)).float().mean() > 0.95


def test_digits_perception_wrong_mask_costs_more(heldout):
    from hypersd_core.rewards.perception import mask_to_target

    p = load_reward("digits-perception")
    x, m, d = heldout["x"][:16], heldout["masks"][:16], heldout["digits"][:16]
    right = p.loss_tensors(x, m, d)
    assert right.shape == (16,)
    assert (p.loss_tensors(x, m.roll(8, dims=-1), d) > right).all()
    assert (p.loss_tensors(x, m, (d + 1) % 10) > right).float().mean() > 0.8
    targets = [mask_to_target(m[i], int(d[i]) + 1) for i in range(16)]  # Mask R-CNN's format
    assert torch.allclose(p.loss(x, targets), right)
    xg = x.clone().requires_grad_(True)
    p.loss_tensors(xg, m, d).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_digits_rewards_json():
    from hypersd_core.rewards.digits import REWARDS_DIR

    meta = json.loads((REWARDS_DIR / "rewards.json").read_text())
    assert set(meta["rewards"]) == {"digits-quality", "digits-alignment", "digits-perception"}
    assert sum(f.stat().st_size for f in REWARDS_DIR.iterdir()) < 1_000_000


def test_train_digit_rewards_smoke(tmp_path):
    from hypersd_core.rewards.digits_train import train_digit_rewards

    meta = train_digit_rewards(tmp_path, steps=2, batch=8, width=8,
                               generator=torch.Generator().manual_seed(0), teacher_per_level=0)
    r = load_reward("digits-alignment", path=tmp_path)
    assert meta["rewards"]["digits-alignment"]["width"] == 8
    assert r.score(torch.rand(2, 3, 32, 32), "a red handwritten digit 3").shape == (2,)
    q = load_reward("digits-quality", path=tmp_path)
    assert q.net.conditioned and meta["rewards"]["digits-quality"]["conditioned"]
    # --only keeps the other rewards' files and entries
    before = (tmp_path / "alignment.safetensors").read_bytes()
    meta = train_digit_rewards(tmp_path, steps=1, batch=8, width=8, only=("digits-quality",),
                               teacher_per_level=0)
    assert (tmp_path / "alignment.safetensors").read_bytes() == before
    assert set(meta["rewards"]) == {"digits-quality", "digits-alignment", "digits-perception"}


def test_quality_batch_grades_its_levels():
    from hypersd_core.rewards.digits_train import QUALITY_LEVELS, quality_batch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    colours = torch.arange(64) % 8
    levels = {n: {"images": torch.rand(8, 3, 32, 32), "colours": torch.zeros(8, dtype=torch.long)}
              for n in (1, 2, 4)}
    images, cond, target = quality_batch(torch.arange(64), x, colours, levels, g, drop_colour=0.0)
    assert images.shape == (64, 3, 32, 32) and cond.shape == (64, 4)
    counts = {v: int((target == v).sum()) for v in QUALITY_LEVELS.values()}
    assert counts == {1.0: 16, 0.75: 8, 0.5: 8, 0.25: 8, 0.0: 24}
    assert (cond[:, 3] == 1).all()  # no colour dropped at drop_colour=0
    red = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.equal(cond[0], red) and torch.equal(cond[40], red)  # colour 0, teacher@1 red


def test_off_hue_moves_the_ink_away_from_the_prompted_hue():
    from hypersd_core.digits.measures import hue_error
    from hypersd_core.rewards.digits_train import OFF_HUE_MIN_DEG, off_hue

    x = torch.zeros(16, 3, 32, 32)
    x[:, :, 8:24, 14:18] = 1.0
    colours = torch.arange(16) % 8
    y = off_hue(x, colours, torch.Generator().manual_seed(0))
    names = [world.COLOUR_NAMES[int(c)] for c in colours]
    err = hue_error(y, names)
    chromatic = [i for i, n in enumerate(names) if n != "white"]
    assert (err[chromatic] >= OFF_HUE_MIN_DEG - 1).all()
    assert torch.equal(y.amax(1) > 0, x.amax(1) > 0)  # the same stroke


def test_quality_takes_the_prompted_colour():
    from hypersd_core.rewards.digits import QualityNet, colour_condition

    cond = colour_condition(["a red handwritten digit 7", "a cat", "a white handwritten digit 1"])
    assert cond.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    net = QualityNet(8, conditioned=True)
    x = torch.rand(3, 3, 32, 32)
    assert not torch.allclose(net(x, cond), net(x, torch.zeros(3, 4)))


@pytest.mark.slow
def test_shipped_quality_ranks_the_teachers_steps_and_noise_on_held_out_seeds():
    """digits-quality on held-out prompts and seeds: teacher@1 < @2 < @4 <= @25, and pure
    noise and off-hue digits below the 2-step teacher (the reward the feedback stage
    optimises must not prefer noise)."""
    from hypersd_core.rewards.digits_rank import ranking_sets, ranking_table

    rows = {r["set"]: r["digits-quality"]
            for r in ranking_table(ranking_sets(64), n_boot=10, rewards=("digits-quality",))}
    assert rows["teacher@1"] < rows["teacher@2"] < rows["teacher@4"] <= rows["teacher@25"] + 0.02
    for low in ("uniform noise", "off-hue (held-out digits)"):
        assert rows[low] < min(rows["teacher@2"], 0.3), (low, rows)
    assert rows["real (held-out digits)"] > rows["teacher@2"]


# ---------------------------------------------------------------- score_images


def test_score_images_folder(tmp_path, heldout):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        arr = (heldout["x"][i].permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"{i}.png")
    Image.fromarray(arr).convert("L").save(folder / "3.png")  # grey: converted to RGB
    out = score_images("digits-quality", folder, "a red handwritten digit 7")
    assert [os.path.basename(p) for p, _ in out] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(0.0 <= s <= 1.0 for _, s in out)
    with pytest.raises(ValueError, match="unknown reward"):
        score_images("nope", folder, "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        score_images("digits-quality", empty, "x")
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="non-image files"):
        score_images("digits-quality", folder, "x")
    (folder / "notes.txt").unlink()
    (folder / "broken.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        score_images("digits-quality", folder, "x")
