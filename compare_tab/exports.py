"""Downloads of a compare: the cells table as CSV and the grid as one PNG (rows of methods
with their labels, a column per step count, the teacher reference above), written to a
fresh temporary folder that Gradio serves from its cache."""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from hypersd_core.app.service import COMPARE_STEPS, Cell

LABEL_W = 260  # px for the row labels
HEAD_H = 24
PAD = 4


def _fit(image: Image.Image, size: int) -> Image.Image:
    """A cell scaled to ``size`` px (nearest neighbour for small digits images)."""
    small = max(image.size) <= 128
    method = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
    return image.convert("RGB").resize((size, size), method)


def grid_png(cells: list[Cell], prompts: list[str], cell_px: int = 128) -> Image.Image:
    """The compare grid as one image: per prompt, the reference row, then a row per method
    (label on the left) with one column per step count; a missing cell is grey."""
    reference = [c for c in cells if c.label == "teacher (reference)"]
    grid = [c for c in cells if c not in reference]
    rows: list[tuple[str, list[Cell]]] = []
    for prompt in prompts:
        rows += [(f"teacher, {c.steps} steps (reference) · {prompt}", [c])
                 for c in reference if c.prompt == prompt]
        by_label: dict[str, list[Cell]] = {}
        for c in grid:
            if c.prompt == prompt:
                by_label.setdefault(c.label or c.method, []).append(c)
        rows += [(label + (f" · {prompt}" if len(prompts) > 1 else ""), row)
                 for label, row in by_label.items()]
    width = LABEL_W + len(COMPARE_STEPS) * (cell_px + PAD) + PAD
    height = HEAD_H + len(rows) * (cell_px + PAD) + PAD
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, n in enumerate(COMPARE_STEPS):
        draw.text((LABEL_W + j * (cell_px + PAD) + cell_px // 3, 6),
                  f"{n} step{'s' * (n != 1)}", fill=(0, 0, 0))
    for i, (label, row) in enumerate(rows):
        y = HEAD_H + i * (cell_px + PAD)
        for k, line in enumerate(_wrap(label, 40)[:6]):
            draw.text((PAD, y + 4 + 12 * k), line, fill=(0, 0, 0))
        for j, c in enumerate(row):
            x = LABEL_W + j * (cell_px + PAD)
            if c.image is not None:
                out.paste(_fit(c.image, cell_px), (x, y))
            else:
                draw.rectangle((x, y, x + cell_px - 1, y + cell_px - 1), fill=(200, 200, 200))
                draw.text((x + 4, y + cell_px // 2 - 6), "n/a", fill=(80, 80, 80))
    return out


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def compare_files(cells: list[Cell], prompts: list[str], table) -> tuple[Path, Path]:
    """(CSV of the table, PNG of the grid) in a new temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="hypersd-compare-"))
    csv = folder / "compare.csv"
    table.to_csv(csv, index=False)
    png = folder / "compare-grid.png"
    grid_png(cells, prompts).save(png)
    return csv, png
