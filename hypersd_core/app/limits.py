"""Bounds on what one app call may ask for, so no input can exhaust memory or hold the
shared queue: image sizes checked from the header before any pixel is decoded, uploads
and prompt lines per call, prompt length, seeds. Each check raises ValueError with
one line the UI shows as it is (no UI code here).

Memory per call is then bounded: at most MAX_UPLOADS images of at most
MAX_UPLOAD_PIXELS pixels (about 12 MB each as RGB) or MAX_PROMPT_LINES generated images.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from hypersd_core.training.config import MAX_SEED

MAX_UPLOAD_PIXELS = 2048 * 2048  # 4x SDXL's 1024^2; reward models resize to <= 512^2
MAX_UPLOADS = 8  # images scored per call
MAX_PROMPT_LINES = 16  # prompts (images) generated and scored per call
MAX_PROMPT_CHARS = 1000  # per prompt: CLIP reads 77 tokens, so this is generous
MAX_STEPS = 50  # sampling steps per call (the Generate tab's slider range)


def guard_decoder() -> None:
    """PIL's decompression-bomb guard at the app's cap: PIL warns above it and refuses
    twice that on open, so even a decode that bypasses open_upload stays bounded."""
    Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS


def open_upload(path: str | Path, name: str | None = None) -> Image.Image:
    """An uploaded image as RGB, refused from its header when it has too many pixels."""
    name = name or Path(path).name
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > MAX_UPLOAD_PIXELS:
                raise ValueError(_too_large(name, w, h))
            return im.convert("RGB")
    except Image.DecompressionBombError as err:  # refused by PIL's guard on open
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ValueError(f"{name} has {pixels}; at most {MAX_UPLOAD_PIXELS:,} (e.g. 2048 x 2048) "
                         "can be scored") from None
    except (OSError, SyntaxError):  # PIL raises SyntaxError for some broken headers
        raise ValueError(f"{name} is not a readable image") from None


def _too_large(name: str, w: int, h: int) -> str:
    return (f"{name} has {w * h:,} pixels ({w} x {h}); at most {MAX_UPLOAD_PIXELS:,} "
            "(e.g. 2048 x 2048) can be scored")


def check_uploads(count: int) -> None:
    if count < 1 or count > MAX_UPLOADS:
        raise ValueError(f"upload 1 to {MAX_UPLOADS} images per call, got {count}")


def prompt_lines(text: str | None, max_lines: int = MAX_PROMPT_LINES) -> list[str]:
    """Non-empty lines of ``text``; at most ``max_lines`` of at most MAX_PROMPT_CHARS each."""
    text = text or ""
    if len(text) > max_lines * (MAX_PROMPT_CHARS + 1):  # refused before it is split
        raise ValueError(f"at most {max_lines} prompts of {MAX_PROMPT_CHARS} characters per "
                         f"call, got {len(text):,} characters")
    lines = [p.strip() for p in text.splitlines() if p.strip()]
    if len(lines) > max_lines:
        raise ValueError(f"at most {max_lines} prompts (one per line) per call, got {len(lines):,}")
    for line in lines:
        check_prompt(line)
    return lines


def check_prompt(prompt: str) -> str:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"a prompt has at most {MAX_PROMPT_CHARS} characters, got {len(prompt):,}")
    return prompt


def check_steps(steps, max_steps: int = MAX_STEPS) -> int:
    try:
        value = int(steps)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"steps must be an integer, got {steps!r}") from None
    if value != steps or not 1 <= value <= max_steps:
        raise ValueError(f"steps must be an integer in [1, {max_steps}], got {steps!r}")
    return value


def check_seed(seed, count: int = 1) -> int:
    """``seed`` as an int such that seed .. seed + count - 1 are valid generator seeds."""
    try:
        value = int(seed or 0)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"seed must be an integer, got {seed!r}") from None
    if value != (seed or 0):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not 0 <= value <= MAX_SEED - (count - 1):
        raise ValueError(f"seed must be in [0, {MAX_SEED - (count - 1)}], got {value}")
    return value
