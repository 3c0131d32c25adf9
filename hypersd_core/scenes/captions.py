"""What the scenes UNet is conditioned on, as the build trains it: the caption's tokens,
the meaning the text encoder's pooled state must name (``caption_slots``), what its states
from the caption's end on must name per half of the image (``layout_slots``,
``layout_loss``), and the UNet's option to see only those states (``hide_words``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hypersd_core.distill.schedule import draw
from hypersd_core.worlds import scenes as world


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def caption_slots(scene: world.Scene) -> list[int]:
    """The meaning of a caption as class indices, one per slot of the grammar."""
    a = scene.objects[0]
    b = scene.objects[1] if scene.template == "relation" else None
    given = scene.size_given + [False] * (2 - len(scene.size_given))

    def size(o, g):
        return world.SIZE_NAMES.index(o.size) if g else len(world.SIZE_NAMES)

    none_cls, none_col, none_size = len(world.CLASSES), len(world.COLOUR_NAMES), 3
    return [
        0 if scene.template == "relation" else 1,
        world.RELATIONS.index(scene.relation) if scene.relation else len(world.RELATIONS),
        (scene.count or 1) - 1,
        world.CLASSES.index(a.cls), world.COLOUR_NAMES.index(a.colour), size(a, given[0]),
        world.CLASSES.index(b.cls) if b else none_cls,
        world.COLOUR_NAMES.index(b.colour) if b else none_col,
        size(b, given[1]) if b else none_size,
    ]


SLOT_SIZES = [2, 5, 3, 6, 5, 3, 7, 6, 4]
LAYOUT_HALVES = ("left", "right", "top", "bottom")
LAYOUT_SIZES = [len(world.CLASSES) + 1, len(world.COLOUR_NAMES) + 1, len(world.SIZE_NAMES) + 2]
# where a relation puts its first and second object
_RELATION_HALVES = {"left of": (0, 1), "right of": (1, 0), "above": (2, 3), "below": (3, 2)}


def layout_slots(scene: world.Scene) -> list[list[int]]:
    """Per half of the image (LAYOUT_HALVES), the object the caption puts there as
    [class, colour, size] indices; the last index of each means "none asked for" (and for
    size also "no size word"). Count captions put nothing in a particular half."""
    none = [len(world.CLASSES), len(world.COLOUR_NAMES), len(world.SIZE_NAMES) + 1]
    out = [list(none) for _ in LAYOUT_HALVES]
    if scene.template == "relation":
        given = scene.size_given + [False] * (2 - len(scene.size_given))
        for obj, half, g in zip(scene.objects, _RELATION_HALVES[scene.relation], given):
            out[half] = [world.CLASSES.index(obj.cls), world.COLOUR_NAMES.index(obj.colour),
                         world.SIZE_NAMES.index(obj.size) if g else len(world.SIZE_NAMES)]
    return out


def layout_loss(hidden: torch.Tensor, ids: torch.Tensor, eos: int, heads, targets):
    """Cross-entropy of the layout heads on every state from the caption's end token on:
    position p answers for half p % 4. ``targets``: [B, 4, 3] from ``layout_slots``."""
    first_eos = (ids == eos).int().argmax(1)  # the caption's end; padding repeats it
    pos = torch.arange(ids.shape[1])
    mask = pos[None, :] >= first_eos[:, None]  # [B, T]
    per_pos = targets[:, pos % len(LAYOUT_HALVES), :]  # [B, T, 3]
    states = hidden[mask]
    tgt = per_pos[mask]
    return sum(F.cross_entropy(h(states), tgt[:, j]) for j, h in enumerate(heads))


def caption_ends(n: int, split: str = "train", start: int = 0) -> torch.Tensor:
    """Where each of the first ``n`` captions of ``split`` ends (its end token's position:
    the tokenizer spells every word as one token, plus the start token)."""
    return torch.tensor([len(s.prompt.split()) + 1 for s in world.scenes(split, n, start)])


def hide_words(cond: torch.Tensor, ends: torch.Tensor, p: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """For a share ``p`` of the batch, replace the states of the caption's words (positions
    1 .. end - 1) by the start token's state (the same for every caption), keeping the
    states from the end token on."""
    pick = draw(torch.rand, len(cond), generator=generator, device=cond.device) < p
    pos = torch.arange(cond.shape[1], device=cond.device)
    words = (pos[None, :] >= 1) & (pos[None, :] < ends[:, None]) & pick[:, None]
    return torch.where(words[..., None], cond[:, :1].expand_as(cond), cond)
