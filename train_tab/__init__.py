"""Train & Monitor tab (and the rewards view): UI over hypersd_core.training.runs / chain."""

from .rewards_view import build_rewards_tab
from .ui import build_train_tab

__all__ = ["build_rewards_tab", "build_train_tab"]
