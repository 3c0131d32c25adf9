"""Experiment trackers beside ``metrics.jsonl`` (which stays the app's record).

``report_to`` in a stage config picks one of accelerate's trackers: ``tensorboard``
(event files under ``<run>/trackers/``), ``wandb`` (offline unless ``WANDB_MODE`` says
otherwise; its files go under ``<run>/trackers/`` too, ``wandb sync`` uploads them later)
or ``trackio`` (a local database; images are not sent to it), or ``none``. Losses, reward
scores, the learning rate and the sample grids go to the tracker on the main process.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
TRACKER_DIR = "trackers"


def tracker_missing(name: str) -> str:
    """Why ``report_to=name`` cannot work here ('' when it can)."""
    package = PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        return f"report_to={name} needs the {package} package (pip install {package})"
    return ""


def accelerator_kwargs(report_to: str, run_dir: Path) -> dict:
    """Arguments for ``Accelerator``: the tracker and where it writes (nothing for none)."""
    if report_to == "none":
        return {}
    folder = Path(run_dir) / TRACKER_DIR
    if report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # works with no network or account
        os.environ.setdefault("WANDB_DIR", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    return {"log_with": report_to, "project_dir": str(folder)}


def hparams(config: dict) -> dict:
    """The config as tracker hyperparameters: scalars kept, lists and dicts as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
            for k, v in config.items()}


class Trackers:
    """The run's tracker (a no-op for ``none`` and on other processes than the main one)."""

    def __init__(self, accelerator, report_to: str, run_name: str, config: dict):
        self.accelerator = accelerator
        self.on = report_to != "none" and accelerator.is_main_process
        if self.on:
            accelerator.init_trackers(run_name, config=hparams(config))

    def log(self, record: dict, step: int) -> None:
        """Numbers of a metrics record (step excluded)."""
        if not self.on:
            return
        values = {k: float(v) for k, v in record.items() if k != "step"
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.accelerator.log(values, step=step)

    def log_images(self, images, step: int, tag: str = "samples") -> None:
        """The sample grid's images as one strip, at ``step``."""
        if not self.on or not images:
            return
        import numpy as np
        from PIL import Image

        w, h = images[0].size
        strip = Image.new("RGB", (w * len(images), h))
        for i, im in enumerate(images):
            strip.paste(im.convert("RGB"), (i * w, 0))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: np.asarray(strip)[None]}, step=step,
                                   dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({tag: [strip]}, step=step)

    def close(self) -> None:
        if self.on:
            self.accelerator.end_training()
            self.on = False
