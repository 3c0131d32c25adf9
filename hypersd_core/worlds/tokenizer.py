"""A CLIP tokenizer for a miniature world's vocabulary, written from scratch (no download)."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_BOS, SPECIAL_EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(folder: str | Path, words: list[str], max_tokens: int) -> None:
    """Write a CLIPTokenizer (vocab.json + merges.txt) whose merges spell ``words``.

    Single characters are always in the vocabulary, so any lower-case ASCII prompt
    tokenizes; the world's words are merged into whole-word tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
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
