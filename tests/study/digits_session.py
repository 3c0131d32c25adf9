"""A scripted study session on the real digits world, through the app's own HTTP API.

    python tests/study/digits_session.py --out /tmp/study-session [--voters 3 --votes 8]

Launches the app in-process (shipped digits model, assets/study.yaml, a fresh vote DB under
--out), lets ``--voters`` gradio_client sessions (each with its own signed voter cookie)
show pairs and vote (choices drawn at random: this checks the plumbing, not the methods),
skips one pair per voter, exports the CSV through the Study results tab's export event,
and checks that every documented field is present and filled where it must be.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str):
    from gradio_client import Client

    c = Client(url, verbose=False)
    for e in c.endpoints.values():  # the study's events are private (no API docs)
        e.is_valid = True
    return c


def _fn(demo, name: str, button: str | None = None) -> int:
    for i, fn in demo.fns.items():
        if fn.name != name:
            continue
        if button is None or (fn.targets and getattr(demo.blocks[fn.targets[0][0]], "value",
                                                     None) == button):
            return i
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    import app
    from hypersd_core.app.service import AppSettings
    from hypersd_core.study.export import EXPORT_COLUMNS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--voters", type=int, default=3)
    p.add_argument("--votes", type=int, default=8, help="votes per voter")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    settings = AppSettings.from_env(study_db=a.out / "db" / "votes.db", port=_port(),
                                    runs_dir=a.out / "runs")
    demo = app.build_demo(settings)
    kwargs = app.launch_kwargs(settings)
    kwargs.update(prevent_thread_lock=True, quiet=True)
    _, url, _ = demo.launch(**kwargs)
    rng = random.Random(a.seed)
    labels = ["A is better", "B is better", "Tie", "Both bad"]
    try:
        show = _fn(demo, "show_pair")
        for v in range(a.voters):
            c = _client(url)
            c.predict(fn_index=show)  # shown, then skipped (a new pair is asked for)
            for _ in range(a.votes):
                c.predict(fn_index=show)
                out = c.predict(fn_index=_fn(demo, "handler", rng.choice(labels)))
                msg = out if isinstance(out, str) else out[0]
                if not msg.startswith("Thanks"):
                    raise SystemExit(f"voter {v}: vote not stored: {msg}")
        files = _client(url).predict("", fn_index=_fn(demo, "export_files",
                                                      "Export every shown pair as CSV"))
    finally:
        demo.close()
        demo.hypersd["store"].close()
    paths = [Path(f if isinstance(f, str) else f["path"]) for f in files]
    csv = next(q for q in paths if q.suffix == ".csv")
    doc = next(q for q in paths if q.suffix == ".md")
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(csv, a.out / "votes.csv")
    shutil.copy(doc, a.out / "votes.columns.md")
    df = pd.read_csv(a.out / "votes.csv", keep_default_na=False)
    missing = [col for col in EXPORT_COLUMNS if col not in df.columns]
    voted = df[df.status == "voted"]
    must = ["pair_id", "shown_at", "voted_at", "decide_seconds", "prompt", "seed_slot", "steps",
            "method_left", "steps_left", "method_right", "steps_right", "choice", "voter_hash",
            "voter_kind", "viewer_hash", "base_model", "code_version", "config_hash",
            "methods_rotation", "schedule"]
    empty = [col for col in must if (voted[col].astype(str) == "").any()]
    adapters = df[(df.adapter_left != "") & (df.hash_left == "")]
    print(f"{len(df)} pairs ({len(voted)} voted, {(df.status == 'skipped').sum()} skipped) from "
          f"{voted.voter_hash.nunique()} voters; {len(df.columns)} columns; missing: {missing}; "
          f"empty where required: {empty}; adapters without hash: {len(adapters)}; "
          f"CSV {(a.out / 'votes.csv').stat().st_size} bytes -> {a.out / 'votes.csv'}")
    return 1 if missing or empty or len(adapters) else 0


if __name__ == "__main__":
    raise SystemExit(main())
