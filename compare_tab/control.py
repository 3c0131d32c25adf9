"""The Compare tab's control input: draw a digit (a sketchpad) or pick a held-out digit's
ink mask; the grid then renders every method under the ControlNet (``/compare_control``)."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from hypersd_core.app.service import AppSettings
from hypersd_core.models.controlnet import mask_image, sketch_to_mask
from hypersd_core.worlds import digits
from ui_common.guard import BoundedSketchpad, guard

NUM_HELDOUT_CHOICES = 24
NO_MASK = "(use the drawing)"
PREVIEW_PX = 256


def heldout_choices() -> list[str]:
    """'held-out #i: digit d' for the first held-out digits (never seen in training)."""
    _, held = digits.split_indices()
    labels = digits.labels()
    return [NO_MASK] + [f"held-out #{i}: digit {int(labels[int(held[i])])}"
                        for i in range(NUM_HELDOUT_CHOICES)]


def heldout_mask(choice: str) -> Image.Image:
    """The control image of a held-out choice."""
    try:
        i = int(choice.split("#", 1)[1].split(":", 1)[0])
    except (IndexError, ValueError):
        raise ValueError(f"not a held-out mask choice: {choice!r}") from None
    _, held = digits.split_indices()
    if not 0 <= i < len(held):
        raise ValueError(f"held-out index {i} out of range (0..{len(held) - 1})")
    return mask_image(digits.ink_32()[int(held[i])] > digits.MASK_THRESHOLD)


def control_from_inputs(sketch, choice: str | None, size: int = digits.RESOLUTION) -> Image.Image:
    """A picked held-out mask wins; else the drawing. Raises gr.Error when neither is usable."""
    try:
        if choice and choice != NO_MASK:
            return heldout_mask(choice)
        return sketch_to_mask(sketch, size)
    except ValueError as err:
        raise gr.Error(str(err)) from None


def build_control_block(settings: AppSettings):
    """(sketchpad, held-out picker, scale slider, preview) in a closed accordion; the
    button that uses them sits next to Compare, right above the results."""
    with gr.Accordion("Control: draw a digit or pick a held-out mask (digits ControlNet), "
                      "then press Compare under control", open=False):
        with gr.Row():
            sketch = BoundedSketchpad(label="Draw a digit", type="pil", height=256, width=256,
                                      canvas_size=(256, 256))
            with gr.Column():
                pick = gr.Dropdown(heldout_choices(), value=NO_MASK,
                                   label="...or a held-out digit's ink mask")
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.1,
                                  label="ControlNet conditioning scale")
            # the 32 px mask fills a 256 px box, pixelated (the API returns its own pixels)
            preview = gr.Image(label="Control image used", type="pil", format="png",
                               interactive=False, height=PREVIEW_PX, width=PREVIEW_PX,
                               elem_id="compare-control-preview",
                               elem_classes=["pixelated", "fill-box"])
    pick.change(guard(picked_preview, "public", settings), pick, preview,
                api_name="compare_control_preview", api_visibility="private",
                show_progress="hidden")
    return sketch, pick, scale, preview


def picked_preview(choice: str | None) -> Image.Image | None:
    """The held-out mask as soon as it is picked (the drawing shows itself)."""
    return heldout_mask(choice) if choice and choice != NO_MASK else None
