"""python -m hypersd_core.protocol {train,eval,report,budget} --world NAME [...]

train: the world's run graph (as ``digits/protocol.py`` takes it); eval / report: the
world's evaluation and report commands, given the remaining arguments; budget: the
budget table of a protocol.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hypersd_core.protocol.world import WORLDS, load_world, resolve


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m hypersd_core.protocol",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("train", "eval", "report", "budget"))
    p.add_argument("--world", required=True, choices=sorted(WORLDS))
    args, rest = p.parse_known_args(argv)
    try:
        world = load_world(args.world)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.command == "budget":
        from hypersd_core.protocol.budget import budget_table

        q = argparse.ArgumentParser(prog="budget")
        q.add_argument("--protocol", required=True, help="a protocol root's protocol.json")
        b = q.parse_args(rest)
        print(budget_table(json.loads(Path(b.protocol).read_text())["runs"]))
        return 0
    if args.command == "train":
        from hypersd_core.protocol.runner import main as train_main

        return train_main(rest, world)
    return resolve(world.eval_main if args.command == "eval" else world.report_main)(rest)


if __name__ == "__main__":
    sys.exit(main())
