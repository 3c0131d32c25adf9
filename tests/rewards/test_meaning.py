"""Every reward the app can show is explained (what, range, direction, known failure,
where shown), and the explanation agrees with the reward class it describes."""

from __future__ import annotations

import importlib
import inspect

import pytest

from hypersd_core.rewards.base import REWARDS, Reward
from hypersd_core.rewards.meaning import SCORES, meaning_markdown

MODULES = ("digits", "scenes", "aesthetic", "clipscore", "pickscore", "imagereward",
           "perception")


def _classes() -> list[type[Reward]]:
    out = []
    for name in MODULES:
        module = importlib.import_module(f"hypersd_core.rewards.{name}")
        out += [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, Reward)
                and c is not Reward and c.__module__ == module.__name__]
    return out


def test_every_registered_reward_is_explained():
    assert set(REWARDS) <= set(SCORES)
    for m in SCORES.values():
        assert m.measures and m.range_text and m.failure and m.shown, m.name


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_explanation_agrees_with_the_reward_class(cls):
    m = SCORES[cls.name]
    assert m.range == cls.range and m.higher_is_better == cls.higher_is_better


def test_markdown_says_direction_range_and_failure():
    text = meaning_markdown(["digits-quality", "digits-alignment", "unknown-score"])
    quality = text.splitlines()[0]
    assert "higher is better" in quality and "0 to 1" in quality
    assert "gamed" in quality and "1-step teacher" in quality
    assert "**unknown-score**: no explanation recorded" in text
    assert "lower is better" in meaning_markdown(["digits-perception"])
