"""The scenes world's data: 64x64 compositional scenes drawn procedurally from a seed.

Each scene holds 2-3 objects on a 2x2 grid of 32-pixel cells. An object has a class (four
shapes, two letters), a colour, a size and a place; shapes are drawn filled, outlined (2 px
strokes), striped or shaded, letters in one of four fonts. Captions follow a small grammar
like real prompts:

- relation: ``"a small red triangle left of a large blue letter K"`` (left of / above: a
  relation names its objects in reading order, the left or upper one first; the size word
  is sometimes left out, and then not constrained);
- count: ``"three small green circles"`` (two or three identical objects).

Everything a scene is made of is its ground truth (objects, attributes, cells, boxes), so
evaluation needs no detector trained on anything but renders. Nothing is downloaded: the
fonts are the DejaVu fonts that ship with matplotlib.

Seeds fix everything. The splits are disjoint seed ranges (``SPLITS``): the model trains on
``train``, the rewards on ``reward``, the evaluation nets on ``evalnet``; ``reference`` is
the real set evaluations compare against and ``eval`` / ``tune`` draw evaluation prompts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from hypersd_core.worlds.tokenizer import SPECIAL_BOS, SPECIAL_EOS  # noqa: F401 (re-export)

RESOLUTION = 64
CELL = RESOLUTION // 2
SUPERSAMPLE = 4  # drawn at 4x, then box-filtered down: antialiased thin strokes

CLASSES = ["circle", "square", "triangle", "star", "letter K", "letter R"]
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "star": "stars", "letter K": "letters K", "letter R": "letters R"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 255),
    "yellow": (240, 220, 40),
    "white": (235, 235, 235),
}
COLOUR_NAMES = list(COLOURS)
SIZES = {"small": (13, 17), "large": (23, 28)}  # box side in pixels, inclusive range
SIZE_NAMES = list(SIZES)
RELATIONS = ["left of", "right of", "above", "below"]  # what prompts may say
# A scene's own caption names the left or upper object first: "B right of A" is captioned
# "A left of B". The same seed draws the same image either way; only the caption changes.
# With all four relations in the captions, a stock UNet (no positional input) never learnt
# to turn the relation word into a side (position at chance in eight probes,
# docs/scenes.md); in reading order it must still tell "left of" from "above" and bind each
# object's attributes to its place.
READING_ORDER = {"right of": "left of", "below": "above"}
CAPTION_RELATIONS = ["left of", "above"]
COUNTS = {2: "two", 3: "three"}
STYLES = 4  # drawing styles: fonts for letters, fill styles for shapes
FONTS = ["DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf",
         "DejaVuSans.ttf"]
SHAPE_STYLES = ["filled", "outline", "striped", "shaded"]
BACKGROUND = (12, 12, 16)
P_RELATION = 0.6
P_SIZE_WORD = 0.75

SPLITS = {"train": 0, "reward": 10_000_000, "evalnet": 20_000_000,
          "reference": 30_000_000, "eval": 40_000_000, "tune": 50_000_000,
          "test": 60_000_000}
SPLIT_SIZE = 10_000_000


@dataclass
class SceneObject:
    cls: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, col) in the 2x2 grid
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 in pixels

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    """A scene's ground truth: the caption, what it asks for, and what was drawn."""

    prompt: str
    template: str  # "relation" or "count"
    objects: list[SceneObject]
    relation: str | None = None
    count: int | None = None
    size_given: list[bool] = field(default_factory=list)  # per prompted object
    style: int = 0
    seed: int = 0

    @property
    def source(self) -> str:
        """The generator source: layout (template, relation or count, cells) and style.

        Real-vs-real floors split by source and intervals resample by source, never by image.
        """
        cells = "".join(f"{o.cell[0]}{o.cell[1]}" for o in self.objects)
        kind = self.relation if self.template == "relation" else f"n{self.count}"
        return f"{self.template}/{kind}/{cells}/s{self.style}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["source"] = self.source
        return d

    @staticmethod
    def from_json(d: dict) -> Scene:
        objs = [SceneObject(o["cls"], o["colour"], o["size"], tuple(o["cell"]), tuple(o["box"]))
                for o in d["objects"]]
        return Scene(d["prompt"], d["template"], objs, d.get("relation"), d.get("count"),
                     list(d.get("size_given", [])), d.get("style", 0), d.get("seed", 0))


def _noun(obj: SceneObject, size_word: bool) -> str:
    words = ([obj.size] if size_word else []) + [obj.colour, obj.cls]
    return " ".join(words)


def caption_relation(a: SceneObject, rel: str, b: SceneObject,
                     size_a: bool = True, size_b: bool = True) -> str:
    return f"a {_noun(a, size_a)} {rel} a {_noun(b, size_b)}"


def caption_count(obj: SceneObject, n: int, size_word: bool = True) -> str:
    words = [COUNTS[n]] + ([obj.size] if size_word else []) + [obj.colour, PLURALS[obj.cls]]
    return " ".join(words)


def _cells_for_relation(rel: str, rng: np.random.Generator) -> tuple[tuple, tuple]:
    r1, r2, c1, c2 = (int(v) for v in rng.integers(0, 2, 4))
    if rel == "left of":
        return (r1, 0), (r2, 1)
    if rel == "right of":
        return (r1, 1), (r2, 0)
    if rel == "above":
        return (0, c1), (1, c2)
    return (1, c1), (0, c2)  # below


def sample_scene(seed: int) -> Scene:
    """The scene of a seed: template, objects, cells, sizes, style and boxes."""
    rng = np.random.default_rng(seed)
    style = int(rng.integers(STYLES))

    def obj(cell) -> SceneObject:
        return SceneObject(CLASSES[rng.integers(len(CLASSES))],
                           COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                           SIZE_NAMES[rng.integers(len(SIZE_NAMES))], tuple(cell))

    if rng.random() < P_RELATION:
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        ca, cb = _cells_for_relation(rel, rng)
        a, b = obj(ca), obj(cb)
        while (b.cls, b.colour) == (a.cls, a.colour):  # two distinguishable objects
            b = obj(cb)
        given = [bool(rng.random() < P_SIZE_WORD), bool(rng.random() < P_SIZE_WORD)]
        scene = Scene(caption_relation(a, rel, b, *given), "relation", [a, b], relation=rel,
                      size_given=given, style=style, seed=seed)
    else:
        n = int(rng.integers(2, 4))
        cells = [(int(i) // 2, int(i) % 2) for i in sorted(rng.choice(4, n, replace=False))]
        first = obj(cells[0])
        objs = [SceneObject(first.cls, first.colour, first.size, c) for c in cells]
        given = bool(rng.random() < P_SIZE_WORD)
        scene = Scene(caption_count(first, n, given), "count", objs, count=n,
                      size_given=[given], style=style, seed=seed)
    for o in scene.objects:
        lo, hi = SIZES[o.size]
        side = int(rng.integers(lo, hi + 1))
        x = o.cell[1] * CELL + int(rng.integers(2, CELL - side - 1))
        y = o.cell[0] * CELL + int(rng.integers(2, CELL - side - 1))
        o.box = (x, y, x + side, y + side)
    if scene.relation in READING_ORDER:  # the same draws, captioned in reading order
        a, b = scene.objects[::-1]
        given = scene.size_given[::-1]
        rel = READING_ORDER[scene.relation]
        scene = Scene(caption_relation(a, rel, b, *given), "relation", [a, b], relation=rel,
                      size_given=given, style=style, seed=seed)
    return scene


# ---------------------------------------------------------------- drawing

@lru_cache(maxsize=64)
def _font(style: int, px: int):
    import os

    import matplotlib
    from PIL import ImageFont

    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    return ImageFont.truetype(os.path.join(folder, FONTS[style]), px)


def _star(cx, cy, r) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -np.pi / 2 + i * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def _draw_object(img, o: SceneObject, style: int) -> None:
    from PIL import Image, ImageChops, ImageDraw

    s = SUPERSAMPLE
    x0, y0, x1, y1 = (v * s for v in o.box)
    colour = COLOURS[o.colour]
    mask = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(mask)
    shape_style = SHAPE_STYLES[style]
    if o.cls.startswith("letter"):
        glyph = o.cls[-1]
        font = _font(style, int((y1 - y0) * 1.25))
        gl, gt, gr, gb = d.textbbox((0, 0), glyph, font=font)
        d.text((x0 + (x1 - x0 - (gr - gl)) / 2 - gl, y0 + (y1 - y0 - (gb - gt)) / 2 - gt), glyph,
               fill=255, font=font)
        shape_style = "filled"
    else:
        stroke = 2 * s
        outline = shape_style == "outline"
        kw = {"fill": None if outline else 255, "outline": 255,
              "width": stroke if outline else 1}
        if o.cls == "circle":
            d.ellipse((x0, y0, x1, y1), **kw)
        elif o.cls == "square":
            d.rectangle((x0, y0, x1, y1), **kw)
        elif o.cls == "triangle":
            pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
            d.polygon(pts, **kw)
        else:  # star
            pts = _star((x0 + x1) / 2, (y0 + y1) / 2 + 0.06 * (y1 - y0), (x1 - x0) / 2)
            d.polygon(pts, **kw)
    if shape_style == "striped":  # 2-pixel stripes: fine texture a few-step sampler smears
        stripes = Image.new("L", img.size, 0)
        ds = ImageDraw.Draw(stripes)
        for yy in range(y0, y1 + 1, 4 * s):
            ds.rectangle((x0, yy, x1, yy + 2 * s - 1), fill=255)
        mask = ImageChops.multiply(mask, stripes)
        d2 = ImageDraw.Draw(mask)
        kw = {"fill": None, "outline": 255, "width": s}
        if o.cls == "circle":
            d2.ellipse((x0, y0, x1, y1), **kw)
        elif o.cls == "square":
            d2.rectangle((x0, y0, x1, y1), **kw)
    layer = Image.new("RGB", img.size, colour)
    if shape_style == "shaded":  # light in the top left, dimmer toward the bottom right
        yy, xx = np.mgrid[0:img.size[1], 0:img.size[0]]
        t = ((xx - x0) + (yy - y0)) / max(1, (x1 - x0) + (y1 - y0))
        shade = np.clip(1.0 - 0.45 * t, 0.55, 1.0)[..., None]
        layer = Image.fromarray((np.array(colour)[None, None] * shade).astype(np.uint8))
    img.paste(layer, (0, 0), mask)


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 RGB [64, 64, 3]."""
    from PIL import Image

    size = RESOLUTION * SUPERSAMPLE
    img = Image.new("RGB", (size, size), BACKGROUND)
    for o in scene.objects:
        _draw_object(img, o, scene.style)
    img = img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def scene_seed(split: str, i: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not 0 <= i < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {i}")
    return SPLITS[split] + i


def scenes(split: str, n: int, start: int = 0) -> list[Scene]:
    return [sample_scene(scene_seed(split, start + i)) for i in range(n)]


def render_many(items: list[Scene]) -> torch.Tensor:
    """Scenes -> uint8 tensor [N, 3, 64, 64]."""
    return torch.from_numpy(np.stack([render(s) for s in items])).permute(0, 3, 1, 2).contiguous()


def to_model(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float in [-1, 1]."""
    return images_u8.float() / 127.5 - 1.0


# ---------------------------------------------------------------- captions

def parse_caption(prompt: str) -> Scene:
    """The ground truth a caption asks for (objects without boxes or cells where free).

    Raises ValueError with an example for anything outside the grammar.
    """
    words = prompt.strip().lower().replace(",", " ").split()
    example = "'a small red triangle left of a large blue letter K' or 'three green stars'"

    def noun(ws: list[str]) -> tuple[SceneObject, bool, int]:
        """Parse [size] colour class-words from ws; return the object, size given, words used."""
        i, size = 0, None
        if i < len(ws) and ws[i] in SIZES:
            size, i = ws[i], i + 1
        if i >= len(ws) or ws[i] not in COLOURS:
            raise ValueError(f"not a scenes prompt: {prompt!r} (expected e.g. {example})")
        colour, i = ws[i], i + 1
        for cls in CLASSES:
            for form in (cls, PLURALS[cls]):
                toks = form.lower().split()
                if ws[i:i + len(toks)] == toks:
                    obj = SceneObject(cls, colour, size or "", (0, 0))
                    return obj, size is not None, i + len(toks)
        raise ValueError(f"not a scenes prompt: {prompt!r} (expected e.g. {example})")

    if words and words[0] in COUNTS.values():
        n = {v: k for k, v in COUNTS.items()}[words[0]]
        obj, given, used = noun(words[1:])
        if used + 1 != len(words):
            raise ValueError(f"not a scenes prompt: {prompt!r} (expected e.g. {example})")
        objs = [SceneObject(obj.cls, obj.colour, obj.size, (0, 0)) for _ in range(n)]
        return Scene(prompt, "count", objs, count=n, size_given=[given])
    if not words or words[0] != "a":
        raise ValueError(f"not a scenes prompt: {prompt!r} (expected e.g. {example})")
    a, given_a, used = noun(words[1:])
    rest = words[1 + used:]
    for rel in RELATIONS:
        toks = rel.split()
        if rest[:len(toks)] == toks and rest[len(toks):len(toks) + 1] == ["a"]:
            b, given_b, used_b = noun(rest[len(toks) + 1:])
            if len(toks) + 1 + used_b != len(rest):
                break
            return Scene(prompt, "relation", [a, b], relation=rel, size_given=[given_a, given_b])
    raise ValueError(f"not a scenes prompt: {prompt!r} (expected e.g. {example})")


def prompts(n: int, seed: int) -> list[Scene]:
    """n scenes (prompt + ground truth) drawn from the grammar, from the ``test`` seed range
    offset by ``seed``: never a training, reward or evaluation-net scene."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(SPLIT_SIZE, size=n, replace=False)
    return [sample_scene(scene_seed("test", int(i))) for i in idx]


# ---------------------------------------------------------------- tokenizer

MAX_TOKENS = 20
WORDS = ["a", "two", "three", "of", *SIZES, *COLOURS, "left", "right", "above", "below",
         "circle", "circles", "square", "squares", "triangle", "triangles", "star", "stars",
         "letter", "letters", "k", "r"]


def write_tokenizer(folder: str | Path) -> None:
    """A CLIPTokenizer for the scenes vocabulary (any lower-case ASCII prompt tokenizes)."""
    from hypersd_core.worlds.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(folder, WORDS, MAX_TOKENS, whole_words=True)


def cell_targets(items: list[Scene]) -> dict[str, torch.Tensor]:
    """Per-cell ground truth [N, 4] (cell = row * 2 + col): class index (len(CLASSES) where
    the cell is empty), colour and size indices (-100 where empty: ignored by losses)."""
    cls = torch.full((len(items), 4), len(CLASSES))
    colour = torch.full((len(items), 4), -100)
    size = torch.full((len(items), 4), -100)
    for i, s in enumerate(items):
        for o in s.objects:
            c = o.cell[0] * 2 + o.cell[1]
            cls[i, c] = CLASSES.index(o.cls)
            colour[i, c] = COLOUR_NAMES.index(o.colour)
            size[i, c] = SIZE_NAMES.index(o.size)
    return {"cls": cls, "colour": colour, "size": size}


def save_ground_truth(path: str | Path, items: list[Scene]) -> None:
    Path(path).write_text("\n".join(json.dumps(s.to_json()) for s in items) + "\n")
