"""Write the generated results blocks from the result files the commands produced:

    python -m hypersd_core report

Two blocks, nothing in them typed by hand:

* docs/results.md, between ``<!-- results:start -->`` and ``<!-- results:end -->``: every
  table of assets/results/*.md that ``SECTIONS`` names (the protocol, the feedback stage),
  their plots, and the build / training times of assets/digits/build_times.json and
  assets/digits/adapters/stage_times.json;
* README.md, between ``<!-- headline:start -->`` and ``<!-- headline:end -->``: the headline
  table (FD vs real per step count, and who leads) read from assets/results/protocol.json.

Links are written relative to the file that holds them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from hypersd_core.paths import ASSETS, DIGITS_ADAPTERS, DIGITS_DIR, ROOT

START, END = "<!-- results:start -->", "<!-- results:end -->"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
RESULTS = ASSETS / "results"
RESULTS_DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
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
HEADLINE_METHODS = (("lcm", "LCM"), ("tcd", "TCD"))


def _link(path: Path, doc: Path) -> str:
    """``path`` as a Markdown link target from the folder of ``doc``."""
    return Path(os.path.relpath(path, doc.parent)).as_posix()


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


def _nest(markdown: str, level: int) -> str:
    """``markdown`` with its headings shifted so the highest is ``level`` (a table file's
    own headings sit under the section heading this report gives it)."""
    found = [len(m) for m in re.findall(r"^(#+) ", markdown, re.M)]
    if not found:
        return markdown
    shift = level - min(found)
    return re.sub(r"^(#+) ", lambda m: "#" * max(1, len(m.group(1)) + shift) + " ", markdown,
                  flags=re.M)


def build_section(doc: Path = RESULTS_DOC) -> str:
    """The results block of ``doc``: the SECTIONS tables and plots, then the time tables."""
    parts = []
    for stem, heading, command in SECTIONS:
        md = RESULTS / f"{stem}.md"
        if not md.is_file():
            continue
        parts.append(f"## {heading}\n\n`{command}`\n\n{_nest(md.read_text().strip(), 3)}\n")
        for png in (RESULTS / f"{stem}.png", RESULTS / f"{stem}-curves.png"):
            if png.is_file():
                parts.append(f"![{png.stem}]({_link(png, doc)})\n")
    parts.append(_times_table(DIGITS_DIR / "build_times.json",
                              "Build time of the digits world on a 2-core CPU "
                              "(`python -m hypersd_core build-digits`):"))
    parts.append(_times_table(DIGITS_ADAPTERS / "stage_times.json",
                              "Training time and budget of each shipped adapter on a 2-core "
                              "CPU, one thread per run, two runs side by side "
                              "(`python -m hypersd_core.digits.protocol`):"))
    return "\n".join(p for p in parts if p)


def _fd(row: dict | None) -> str:
    if not row:
        return "-"
    lo, hi = row.get("fd_real_ci") or (None, None)
    return f"{row['fd_real']:.2f}" + (f" [{lo:.1f}, {hi:.1f}]" if lo is not None else "")


def _steps_of(row_id: str) -> int:
    """The step count of a row id: "lcm@4" and "lcm@4/u" (the baseline at unified's
    training samples) -> 4."""
    return int(row_id.split("@")[1].split("/")[0])


def build_headline(protocol: Path = RESULTS / "protocol.json") -> str:
    """README's headline: per step count, FD vs real of the teacher, LCM, TCD and the
    Hyper-SD row the protocol picked on tune seeds, and the paired verdicts."""
    if not protocol.is_file():
        return "(no protocol results yet: see docs/results.md for how to produce them)\n"
    data = json.loads(protocol.read_text())
    rows = {r["id"]: r for r in data.get("eval_rows", [])}
    leads = data.get("leads", [])
    lines = ["| steps | teacher (CFG) | LCM | TCD | Hyper-SD | Hyper-SD row | against LCM | "
             "against TCD |", "|---|---|---|---|---|---|---|---|"]
    for steps in sorted({lead["steps"] for lead in leads}):
        same = {lead["baseline"].split("@")[0]: lead for lead in leads
                if lead["steps"] == steps and _steps_of(lead["baseline"]) == steps}
        if not same:
            continue
        ours = next(iter(same.values()))["hypersd"]
        cells = [_fd(rows.get(f"teacher@{steps}"))]
        # each baseline at the compared row's training samples (the row the lead names)
        cells += [_fd(rows.get(same[m]["baseline"] if m in same else f"{m}@{steps}"))
                  for m, _ in HEADLINE_METHODS]
        cells += [_fd(rows.get(ours)), f"`{ours}`"]
        cells += [same[m]["verdict"] if m in same else "-" for m, _ in HEADLINE_METHODS]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    cross = [lead for lead in leads if _steps_of(lead["baseline"]) != lead["steps"]]
    notes = []
    if "teacher@25" in rows:
        notes.append(f"Teacher at 25 steps: {rows['teacher@25']['fd_real']:.2f}")
    if data.get("fd_floor") is not None:
        notes.append(f"real against real (the floor): {data['fd_floor']:.2f}")
    for lead in cross:
        notes.append(f"`{lead['hypersd']}` against the {_steps_of(lead['baseline'])}-step "
                     f"`{lead['baseline']}`: {lead['verdict']}")
    n = next((r.get("n") for r in rows.values() if r.get("n")), None)
    text = ("\n".join(lines) + "\n\nFD vs real held-out digits in the project's feature space, "
            f"lower is better{f', {n} images per cell' if n else ''}, bootstrap 95% intervals. "
            "Hyper-SD row: the adapter the tune seeds picked (`hypersd@N`: the TSCD k=N "
            "adapter; `unified@N/etaE`: the one-step adapter run at N steps, eta E). A verdict "
            "counts the four FDs (vs real and vs the teacher, in the project's and a random "
            "feature space) whose paired 95% interval excludes a tie. Every pair has equal "
            "training samples: LCM and TCD are shown at the compared Hyper-SD row's count "
            "(`lcm@N`: the k=N adapter's; `lcm@N/u`: the unified adapter's). "
            + "; ".join(notes) + ".\n")
    return text


def replace_block(path: Path, start: str, end: str, body: str) -> None:
    """Replace the text between the ``start`` and ``end`` markers of ``path``."""
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def update_docs(results_doc: Path = RESULTS_DOC, readme: Path = README) -> list[Path]:
    """Rewrite both generated blocks; returns the files written."""
    replace_block(results_doc, START, END, build_section(results_doc))
    replace_block(readme, HEADLINE_START, HEADLINE_END, build_headline())
    return [results_doc, readme]


def main() -> int:
    for path in update_docs():
        print(f"updated {path.relative_to(ROOT).as_posix()}")
    return 0
