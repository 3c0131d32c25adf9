"""How images are shown: digits-world images (32 px) are enlarged by an integer factor
with nearest-neighbour sampling so a person can judge them; SD-sized images are left as
they are. These helpers only make display copies: API outputs keep the model's pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from PIL import Image

MIN_DISPLAY_PX = 256  # every digits image is shown at least this large
SMALL_PX = 128  # an image (or grid cell) this small or smaller is enlarged

# Pixelated rendering for components that hold small images; the sizes make a 32 px image
# fill its box instead of sitting at its native size in the middle of it.
APP_CSS = """
.pixelated img, img.pixelated { image-rendering: pixelated; image-rendering: crisp-edges; }
.pixelated.fill-box img { width: 100% !important; height: 100% !important;
  object-fit: contain !important; }
.hsd-grid { border-collapse: collapse; }
.hsd-grid th { font-weight: 600; padding: 4px 8px; text-align: center; }
.hsd-grid th.row { text-align: right; max-width: 180px; }
.hsd-grid td { padding: 3px; vertical-align: top; text-align: center; }
.hsd-grid .note { font-size: 11px; color: #a33; max-width: 256px; }
.hsd-plots { display: flex; flex-wrap: wrap; gap: 8px; }
.hsd-plots > svg { flex: 0 1 calc(50% - 4px); min-width: 360px; }
"""


def is_small(image: Image.Image, cell: int | None = None) -> bool:
    """True for digits-sized images (or grids of digits-sized cells)."""
    return (cell or max(image.size)) <= SMALL_PX


def enlarge(image: Image.Image, cell: int | None = None,
            min_px: int = MIN_DISPLAY_PX) -> Image.Image:
    """A nearest-neighbour enlargement so each cell (default: the whole image, its longer
    side) is at least ``min_px``; SD-sized images are returned unchanged."""
    cell = cell or max(image.size)
    if not is_small(image, cell):
        return image
    factor = math.ceil(min_px / cell)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def retile(strip: Image.Image, cols: int) -> Image.Image:
    """A one-row strip of square cells (the trainer's sample grid) as rows of ``cols``."""
    cell = strip.height
    n = strip.width // cell if cell else 0
    if n <= cols or strip.width % cell:
        return strip
    rows = math.ceil(n / cols)
    out = Image.new(strip.mode, (cols * cell, rows * cell), (255, 255, 255))
    for i in range(n):
        tile = strip.crop((i * cell, 0, (i + 1) * cell, cell))
        out.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    return out


def data_uri(image: Image.Image) -> str:
    """The image inline: PNG for small images, JPEG (quality 92) for SD-sized ones."""
    buf = io.BytesIO()
    if is_small(image):
        image.save(buf, format="PNG")
        kind = "png"
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=92)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}"


def img_tag(image: Image.Image, alt: str, width: int | None = None) -> str:
    """An <img> of ``image``: small ones drawn pixelated at ``width`` (default 256 px)."""
    small = is_small(image)
    shown = width or (MIN_DISPLAY_PX if small else min(image.width, MIN_DISPLAY_PX))
    cls = ' class="pixelated"' if small else ""
    return (f'<img{cls} src="{data_uri(image)}" alt="{html.escape(alt)}" width="{shown}" '
            f'height="{round(shown * image.height / image.width)}" '
            f'style="image-rendering:{"pixelated" if small else "auto"}">')


def small_model(model: str) -> bool:
    """True when the model makes digits-sized images (the digits world, or a pipeline
    folder marked as the digits kind); SD1.5 / SDXL are not enlarged."""
    if model in ("digits", "scenes"):
        return True
    index = Path(model) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_hypersd", {}).get("kind") in ("digits",
                                                                                 "scenes")
    except (OSError, ValueError, AttributeError):
        return False


def image_classes(model: str, fill: bool = True) -> list[str]:
    """``elem_classes`` for an image component: pixelated (and filling its box) for digits."""
    if not small_model(model):
        return []
    return ["pixelated", "fill-box"] if fill else ["pixelated"]
