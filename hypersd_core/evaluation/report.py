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
    ("digits", "All methods, 800 images (all 80 prompts x 10 seeds), 1/2/4/8 steps",
     "python -m hypersd_core evaluate --model digits --methods "
     "teacher,lcm,tcd,hypersd,hypersd-unified --steps 1,2,4,8 --num-images 800 "
     "--out assets/results/digits.json"),
    ("feedback", "Human-feedback stage: digits rewards and FD before / after (held-out seeds; "
     "k1 = the shipped TSCD k=1 adapter the feedback stage was trained on)",
     "python -m hypersd_core.evaluation.reward_eval --entry k1=hypersd:1:hypersd-k1 --entry "
     "k1-feedback=hypersd:1:hypersd-k1-feedback --entry k1@2=hypersd:2:hypersd-k1 --entry "
     "k1-feedback@2=hypersd:2:hypersd-k1-feedback --num-images 800 --out assets/results/feedback.json"),
]


def _times_table(path: Path, title: str) -> str:
    if not path.is_file():
        return ""
    times = json.loads(path.read_text())
    rows = [f"| {name} | {v['seconds'] if isinstance(v, dict) else v:.0f} |"
            for name, v in times.items()]
    return f"{title}\n\n| part | seconds |\n|---|---|\n" + "\n".join(rows) + "\n"


def build_section() -> str:
    parts = []
    for stem, heading, command in SECTIONS:
        md = RESULTS / f"{stem}.md"
        if not md.is_file():
            continue
        parts.append(f"### {heading}\n\n`{command}`\n\n{md.read_text().strip()}\n")
        png = RESULTS / f"{stem}.png"
        if png.is_file():
            parts.append(f"![{stem}]({png.relative_to(ROOT).as_posix()})\n")
    parts.append(_times_table(DIGITS_DIR / "build_times.json",
                              "Build time of the digits world on a 2-core CPU "
                              "(`python -m hypersd_core build-digits`):"))
    parts.append(_times_table(DIGITS_ADAPTERS / "stage_times.json",
                              "Training time of each shipped adapter on a 2-core CPU "
                              "(`python -m hypersd_core chain`):"))
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
