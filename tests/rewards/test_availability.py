"""Rewards whose weights are not on disk are not offered and never loaded (no network):
they say which files they need and where; present files make them available."""

from __future__ import annotations

import pytest


@pytest.fixture()
def empty_places(tmp_path, monkeypatch):
    """No reward folder and an empty hub cache; any hub download fails the test."""
    import huggingface_hub

    monkeypatch.setenv("HYPERSD_REWARDS_DIR", str(tmp_path / "rewards"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    return tmp_path / "rewards"


def test_missing_weights_are_named_with_their_folder(empty_places):
    from hypersd_core.app.choices import reward_choices, unavailable_rewards
    from hypersd_core.rewards.availability import availability

    offered = reward_choices()
    assert {"digits-quality", "digits-alignment"} <= set(offered)  # shipped
    off = unavailable_rewards()
    assert {"aesthetic", "imagereward", "pickscore", "clip-score"} <= set(off)
    assert not set(off) & set(offered)
    note = availability("aesthetic").note
    assert "sac+logos+ava1-l14-linearMSE.pth" in note and "HYPERSD_REWARDS_DIR" in note
    assert str(empty_places / "aesthetic") in note
    assert "ImageReward.pt" in off["imagereward"] and "\n" not in off["imagereward"]


def test_present_weights_make_a_reward_available(empty_places):
    from hypersd_core.rewards.availability import availability

    folder = empty_places / "clip-score"
    folder.mkdir(parents=True)
    (folder / "open_clip_model.safetensors").write_bytes(b"not really weights")
    found = availability("clip-score")
    assert found.ok and found.kwargs == {"path": folder / "open_clip_model.safetensors"}


def test_unavailable_reward_fails_at_once_in_one_line(empty_places):
    from PIL import Image

    from hypersd_core.app.service import ModelService

    service = ModelService("digits", device="cpu")
    image = Image.new("RGB", (32, 32))
    scores, errors = service.score([image], ["a red handwritten digit 7"],
                                   ["aesthetic", "digits-quality"])
    assert list(scores) == ["digits-quality"]
    assert errors["aesthetic"].startswith("RewardWeightsMissing: needs the LAION aesthetic MLP")
    assert "\n" not in errors["aesthetic"]
