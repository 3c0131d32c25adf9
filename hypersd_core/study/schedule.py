"""Which pair to show next: balanced (least-shown-first) or active scheduling. Pure.

A *cell* is a method pair at a step count (plus, with an anchor, the anchor against each
method at each step count). ``balanced`` shows the least-shown cell (ties broken at
random); inside a cell the (prompt, seed slot) combinations are cycled, prompts fastest,
from a per-cell offset; sides are balanced per cell (the method shown on the left less
often goes left, ties at random). ``active`` shows the cell whose head-to-head win rate is
most uncertain (widest Wilson interval; cells with no votes first), then least shown.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from hypersd_core.study.config import StudyConfig
from hypersd_core.study.stats import wilson


@dataclass(frozen=True)
class Cell:
    """Two (method, steps) sides in canonical order; equal steps unless an anchor pair."""

    method_a: str
    steps_a: int
    method_b: str
    steps_b: int

    @property
    def steps(self) -> int:
        """The step count the cell belongs to (the non-anchor side for anchor pairs)."""
        return self.steps_b

    @property
    def key(self) -> str:
        return f"{self.method_a}@{self.steps_a}|{self.method_b}@{self.steps_b}"


def cells(config: StudyConfig) -> list[Cell]:
    """Every cell of the study, in a fixed order."""
    out = [Cell(a, n, b, n) for n in config.steps for a, b in combinations(config.methods, 2)]
    if config.anchor is not None:
        am, an = config.anchor.method, config.anchor.steps
        out += [Cell(am, an, m, n) for n in config.steps for m in config.methods
                if (m, n) != (am, an)]
    return out


def choose_cell(all_cells: list[Cell], shown: dict[str, int], rng: random.Random,
                mode: str = "balanced", votes: dict[str, tuple[float, float]] | None = None,
                ) -> Cell:
    """The next cell.

    Args:
        shown: pairs shown so far per cell key (voted or skipped).
        votes: for 'active': (score, n) per cell key, score = wins of side a + ties / 2.
    """
    if mode == "active":
        votes = votes or {}

        def width(c: Cell) -> float:
            s, n = votes.get(c.key, (0.0, 0.0))
            if n == 0:
                return 2.0
            lo, hi = wilson(s, n, 1.96)
            return hi - lo
        widths = np.array([width(c) for c in all_cells])
        pool = [c for c, w in zip(all_cells, widths) if w >= widths.max() - 1e-12]
    else:
        pool = all_cells
    low = min(shown.get(c.key, 0) for c in pool)
    return rng.choice([c for c in pool if shown.get(c.key, 0) == low])


def prompt_and_slot(config: StudyConfig, cell_index: int, times_shown: int) -> tuple[str, int]:
    """The (prompt, seed slot) of the cell's next showing: cycled, prompts fastest."""
    n_p, n_s = len(config.prompts), len(config.seeds)
    combo = (times_shown + cell_index * 7) % (n_p * n_s)
    return config.prompts[combo % n_p], config.seeds[(combo // n_p) % n_s]


def left_first(left_counts: tuple[int, int], rng: random.Random) -> bool:
    """True to show side a on the left: the side shown on the left less often goes left."""
    a_left, b_left = left_counts
    if a_left != b_left:
        return a_left < b_left
    return rng.random() < 0.5
