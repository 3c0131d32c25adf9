"""Hugging Face Spaces and ZeroGPU: where the app runs, and GPU durations that grow with
the request (``spaces.GPU`` where the ``spaces`` package is present, else a no-op).
"""

from __future__ import annotations

import os


def on_space() -> bool:
    """True on a Hugging Face Space."""
    return bool(os.environ.get("SPACE_ID"))


# seconds per image per denoising step on a ZeroGPU slice (half precision, conservative);
# CFG (the teacher) doubles the UNet batch
GPU_STEP_SECONDS = {"digits": 0.01, "sd15": 0.06, "sdxl": 0.2}
GPU_CALL_OVERHEAD_S = 8  # moving the resident weights in, the VAE decode, slack


def gpu_seconds(images: int, steps: int, kind: str = "sdxl", cfg: bool = False) -> int:
    """A ZeroGPU ``duration`` for a call that makes ``images`` images at ``steps`` steps:
    grows with the grid instead of a fixed 120 s (a short request gets scheduled sooner;
    a large grid is not cut off). Clamped to [10, 300]."""
    per_step = GPU_STEP_SECONDS.get(kind, GPU_STEP_SECONDS["sdxl"]) * (2 if cfg else 1)
    return int(min(300, max(10, GPU_CALL_OVERHEAD_S + 1.5 * images * steps * per_step)))


def image_steps(prompts: int, rows: int, steps: tuple[int, ...], reference_steps: int = 0) -> int:
    """Denoising steps of a grid: ``rows`` x ``steps`` per prompt, plus a CFG reference."""
    return prompts * (rows * sum(steps) + 2 * reference_steps)


def request_seconds(kind, count):
    """A ZeroGPU duration function: ``count(*call_args) -> image-steps`` of the request,
    ``kind()`` the model kind at call time; ``gpu_seconds`` of the two."""
    def duration(*args, **kwargs) -> int:
        try:
            work = int(count(*args, **kwargs))
        except Exception:  # a malformed request fails in the call itself: ask for the most
            return 300
        return gpu_seconds(1, max(1, work), kind())

    return duration


def gpu(fn=None, duration=120):
    """``spaces.GPU(duration=...)`` on ZeroGPU Spaces; a no-op where ``spaces`` is absent.

    ``duration``: seconds, or a function of the call's own arguments returning seconds
    (ZeroGPU's dynamic duration), e.g. ``lambda prompts, steps, *a: gpu_seconds(...)``.
    """
    def wrap(f):
        try:
            import spaces  # type: ignore[import-not-found]
        except ImportError:
            return f
        return spaces.GPU(duration=duration)(f)

    return wrap(fn) if fn is not None else wrap
