"""The study's CSV export: one row per shown pair (voted or skipped), columns documented.

``write_export`` writes ``votes.csv`` and ``votes.columns.md`` (the table below) side by
side. No secret is exported: the image seed appears only as its slot, voters only as
salted hashes, and tokens not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

# analysis frame (StudyStore.votes_frame): one row per vote
VOTE_COLUMNS = ["id", "pair_id", "token", "prompt", "seed_slot", "steps", "steps_a", "steps_b",
                "method_a", "method_b", "choice", "voter_hash", "voter_kind", "created_at",
                "decide_seconds", "base_model", "config_hash"]

COLUMN_DOCS = {
    "pair_id": "id of the shown pair (row of the pairs table)",
    "status": "'voted', or 'skipped' (shown, no vote: the voter asked for another pair or "
              "left, or it is still on screen); a skipped pair's method, adapter and hash "
              "cells are empty, so the export never unblinds a pair",
    "shown_at": "UTC time the pair was issued, just before its images were rendered (ISO 8601)",
    "voted_at": "UTC time of the vote (ISO 8601); empty when skipped",
    "decide_seconds": "voted_at - shown_at in seconds (includes rendering time); empty when skipped",
    "prompt": "the prompt of both images",
    "seed_slot": "seed slot of both images; the seed itself is secret (derived from the study "
                 "salt, see hypersd_core/study/config.py) so images cannot be reproduced publicly",
    "steps": "the step count of the cell (for an anchor pair: the non-anchor side's)",
    "method_left": "method shown on the left (A)",
    "steps_left": "sampling steps of the left image",
    "adapter_left": "adapter (LoRA) the left image used; empty for none",
    "hash_left": "first 16 hex digits of the SHA-256 of the left adapter's weight files",
    "method_right": "method shown on the right (B)",
    "steps_right": "sampling steps of the right image",
    "adapter_right": "adapter (LoRA) the right image used; empty for none",
    "hash_right": "first 16 hex digits of the SHA-256 of the right adapter's weight files",
    "choice": "A (left better), B (right better), tie, both_bad; empty when skipped",
    "winner": "the method chosen; empty for tie, both_bad and skipped",
    "voter_hash": "HMAC-SHA256 of the voter id with the study salt; empty when skipped",
    "voter_kind": "login (Hugging Face account), cookie (server-signed voter cookie) or session "
                  "(browser session, only when study.yaml allows it); empty when skipped",
    "viewer_hash": "voter hash of whom the pair was shown to, when known at show time",
    "base_model": "the base model the app served (digits, or a pipeline folder / hub id)",
    "code_version": "git commit of the app (+dirty when tracked files were changed), or the "
                    "package version",
    "config_hash": "id of the study configuration; its snapshot is study_config-<id>.yaml "
                   "next to the vote database",
    "methods_rotation": "methods in rotation when the pair was shown (comma separated)",
    "schedule": "balanced (least-shown-first) or active (most uncertain pair first)",
}
EXPORT_COLUMNS = list(COLUMN_DOCS)
# what would unblind a pair nobody has voted on (it may still be on a voter's screen):
# empty in the export for every pair whose status is not 'voted'
BLIND_COLUMNS = ("method_left", "adapter_left", "hash_left", "method_right", "adapter_right",
                 "hash_right")


def columns_markdown() -> str:
    """The column documentation as a Markdown table."""
    lines = ["| column | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in COLUMN_DOCS.items()]
    return "\n".join(lines) + "\n"


def write_export(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` (columns EXPORT_COLUMNS) to ``path`` and the docs beside it, atomically."""
    missing = [c for c in EXPORT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"export frame lacks columns {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame[EXPORT_COLUMNS].to_csv(tmp, index=False)
    os.replace(tmp, path)
    doc = path.with_name(path.stem + ".columns.md")
    doc.write_text(f"# Columns of {path.name}\n\nOne row per shown pair.\n\n"
                   + columns_markdown())
    return path
