"""Prompt embeddings computed once per text and reused: a bounded LRU per backbone.

A stock pipeline call encodes its prompts every time (and the empty negative prompt
for classifier-free guidance). ``PromptCache.pipeline_kwargs`` gives the same
embeddings, computed by the pipeline's own ``encode_prompt`` for one text at a time,
as the ``prompt_embeds`` (and SDXL's pooled / negative) arguments of a pipeline call,
so a grid of methods and step counts over a few prompts encodes each prompt once.

The cache belongs to one backbone and assumes its text encoders do not change: call
``clear()`` after changing them (the samplers never put a LoRA on a text encoder).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PromptCache:
    """LRU of per-text embeddings for one pipeline (``max_entries`` texts)."""

    def __init__(self, pipe, max_entries: int = 256):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.pipe = pipe
        self.max_entries = max_entries
        self.sdxl = hasattr(pipe, "text_encoder_2")
        self._entries: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, ...]:
        """(cond, uncond[, pooled, pooled_uncond]) for one text, batch 1, as the
        pipeline computes them when given ``prompt=[text]`` and no negative prompt."""
        pipe = self.pipe
        device = pipe._execution_device
        if self.sdxl:
            return tuple(pipe.encode_prompt([text], device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=True))
        cond, uncond = pipe.encode_prompt([text], device, 1, True)
        return cond, uncond

    def get(self, text: str) -> tuple[torch.Tensor, ...]:
        if text in self._entries:
            self._entries.move_to_end(text)
            self.hits += 1
            return self._entries[text]
        self.misses += 1
        value = self._entries[text] = self._encode(text)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def pipeline_kwargs(self, prompts: list[str], guidance: bool) -> dict:
        """The embedding arguments of a pipeline call for ``prompts`` (in place of
        ``prompt=prompts``); negative embeddings only when ``guidance`` (CFG) is on."""
        rows = [self.get(p) for p in prompts]

        def stack(i: int) -> torch.Tensor:
            return torch.cat([r[i] for r in rows])

        out = {"prompt_embeds": stack(0)}
        if guidance:
            out["negative_prompt_embeds"] = stack(1)
        if self.sdxl:
            out["pooled_prompt_embeds"] = stack(2)
            if guidance:
                out["negative_pooled_prompt_embeds"] = stack(3)
        return out
