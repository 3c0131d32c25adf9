"""A CLIP tokenizer for a miniature world's vocabulary, written from scratch (no download)."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_BOS, SPECIAL_EOS = "<|startoftext|>", "<|endoftext|>"


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the best-ranked adjacent pair until
    none of the pairs is a merge (as ``CLIPTokenizer.bpe`` does)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in
                 enumerate(zip(pieces, pieces[1:]))]
        rank, at = min(pairs)
        if rank > len(ranks):
            break
        first, second = pieces[at], pieces[at + 1]
        out, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == (first, second):
                out.append(first + second)
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def write_clip_tokenizer(folder: str | Path, words: list[str], max_tokens: int,
                         whole_words: bool = False) -> None:
    """Write a CLIPTokenizer (vocab.json + merges.txt) whose merges spell ``words``.

    Single characters are always in the vocabulary, so any lower-case ASCII prompt
    tokenizes. Each word gets left-to-right merges; since a merge made for one word can
    outrank the next word's own (``r e`` from "red" splits "green" into g/re/e/n), with
    ``whole_words`` merges are added until CLIP's own BPE spells every word as one token
    (a later, lower-ranked merge never changes how an earlier word is spelled). The digits
    world keeps the first rule, which its shipped tokenizer was written with.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(a: str, b: str) -> None:
        if (a, b) not in ranks:
            ranks[(a, b)] = len(merges)
            merges.append(f"{a} {b}")
            vocab.append(a + b)

    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            add(pieces[0], pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
        while whole_words and len(pieces := bpe(word, ranks)) > 1:
            add(pieces[0], pieces[1])
    vocab += [SPECIAL_BOS, SPECIAL_EOS]
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": SPECIAL_BOS, "eos_token": SPECIAL_EOS,
                    "unk_token": SPECIAL_EOS, "pad_token": SPECIAL_EOS})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_tokens,
            "bos_token": SPECIAL_BOS,
            "eos_token": SPECIAL_EOS,
            "unk_token": SPECIAL_EOS,
            "pad_token": SPECIAL_EOS,
            "do_lower_case": True,
        })
    )
