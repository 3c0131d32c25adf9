"""Write the README's results section from the result files the commands produced:

    python -m hypersd_core report

It reads assets/results/*.md (tables written by `evaluate` and the feedback
comparison), assets/digits/build_times.json and assets/digits/adapters/stage_times.json,
and replaces the text between the README's results markers. Nothing is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypersd_core.paths import ASSETS, DIGITS_ADAPTERS, DIGITS_DIR, ROOT

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = ASSETS / "results"
# (file stem, heading, the command that regenerates it)
SECTIONS = [
    ("protocol", "Hyper-SD against LCM and TCD under one protocol (see "
     "[How the comparison is run](#how-the-comparison-is-run))",
     "python -m hypersd_core.digits.protocol --root runs/protocol --jobs 2 && "
     "python -m hypersd_core.digits.protocol --root runs/protocol --ship && "
     "python -m hypersd_core.digits.protocol_eval --root runs/protocol --out results/protocol && "
     "python -m hypersd_core.digits.protocol_report --eval results/protocol "
     "--protocol runs/protocol/protocol.json --out assets/results/protocol"),
    ("feedback", "Human-feedback stage: digits rewards and FD before / after (held-out seeds; "
     "k1 = the shipped TSCD k=1 adapter the feedback stage was trained on)",
     "python -m hypersd_core.digits.reward_eval --entry k1=hypersd:1:hypersd-k1 --entry "
     "k1-feedback=hypersd:1:hypersd-k1-feedback --entry k1@2=hypersd:2:hypersd-k1 --entry "
     "k1-feedback@2=hypersd:2:hypersd-k1-feedback --num-images 800 --out assets/results/feedback.json"),
]


def _times_table(path: Path, title: str) -> str:
    if not path.is_file():
        return ""
    times = json.loads(path.read_text())
    budgets = any(isinstance(v, dict) and "samples" in v for v in times.values())
    head = ("| part | seconds | steps x batch | training samples (with its parents) |\n"
            "|---|---|---|---|\n" if budgets else "| part | seconds |\n|---|---|\n")
    rows = []
    for name, v in times.items():
        secs = v["seconds"] if isinstance(v, dict) else v
        row = f"| {name} | {secs:.0f} |"
        if budgets:
            row += f" {v.get('steps', '-')} x {v.get('batch_size', '-')} | {v.get('samples', '-')} |"
        rows.append(row)
    return f"{title}\n\n{head}" + "\n".join(rows) + "\n"


def build_section() -> str:
    parts = []
    for stem, heading, command in SECTIONS:
        md = RESULTS / f"{stem}.md"
        if not md.is_file():
            continue
        parts.append(f"### {heading}\n\n`{command}`\n\n{md.read_text().strip()}\n")
        for png in (RESULTS / f"{stem}.png", RESULTS / f"{stem}-curves.png"):
            if png.is_file():
                parts.append(f"![{png.stem}]({png.relative_to(ROOT).as_posix()})\n")
    parts.append(_times_table(DIGITS_DIR / "build_times.json",
                              "Build time of the digits world on a 2-core CPU "
                              "(`python -m hypersd_core build-digits`):"))
    parts.append(_times_table(DIGITS_ADAPTERS / "stage_times.json",
                              "Training time and budget of each shipped adapter on a 2-core "
                              "CPU, one thread per run, two runs side by side "
                              "(`python -m hypersd_core.digits.protocol`):"))
    return "\n".join(p for p in parts if p)


def update_readme(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{build_section()}\n{END}{tail}")


def main() -> int:
    update_readme()
    print("README results section updated")
    return 0
