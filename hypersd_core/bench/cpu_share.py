"""Two CPU training runs side by side: it/s of each under each thread policy.

    python -m hypersd_core.bench.cpu_share --out /tmp/cpu-share [--steps 30] [--reps 2]

Run on an otherwise idle machine. Each case starts two ``train`` processes of the
digits-tscd-k8 preset at once (one run alone for reference) and reads each run's it/s
between its first and last logged step (model loading excluded):

  alone, auto      one run, ``cpu_threads=0`` (training/threads.py: all cores)
  pair, auto       two runs, ``cpu_threads=0``: each takes cores // 2
  pair, all cores  two runs, each with every core (what every run did before)
  pair, 1 thread   two runs, ``OMP_NUM_THREADS=1``

Prints one JSON line per case and repeat, then the medians; writes OUT/cpu_share.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from hypersd_core.training.threads import usable_cores

CASES = {  # name -> (runs at once, extra --set, extra environment)
    "alone, auto": (1, [], {}),
    "pair, auto": (2, [], {}),
    "pair, all cores": (2, [f"cpu_threads={usable_cores()}"], {}),
    "pair, 1 thread": (2, [], {"OMP_NUM_THREADS": "1"}),
}


def steady_its(run_dir: Path) -> float:
    """it/s between the first and last logged step (a record's it_s is the mean since
    training started, so its elapsed time is step / it_s)."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    timed = [r for r in records if r.get("it_s")]
    if len(timed) < 2:
        raise RuntimeError(f"{run_dir}: fewer than two logged steps")
    first, last = timed[0], timed[-1]
    elapsed = last["step"] / last["it_s"] - first["step"] / first["it_s"]
    return (last["step"] - first["step"]) / max(1e-9, elapsed)


def run_case(name: str, out: Path, steps: int, rep: int) -> list[float]:
    count, sets, env_extra = CASES[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_extra, HF_HUB_OFFLINE="1")
    procs, dirs = [], []
    for i in range(count):
        run_dir = out / f"{name.replace(', ', '-').replace(' ', '_')}-{rep}-{i}"
        args = ["steps=" + str(steps), "log_every=2", "sample_every=100000",
                "checkpoint_every=100000", *sets]
        cmd = [sys.executable, "-m", "hypersd_core", "train", "--preset", "digits-tscd-k8",
               *[a for s in args for a in ("--set", s)], "--run-dir", str(run_dir)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        dirs.append(run_dir)
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"case {name!r}: a run failed (see {dirs})")
    return [round(steady_its(d), 3) for d in dirs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--cases", default=";".join(CASES), help="case names separated by ';'")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.strip() for c in args.cases.split(";")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {list(CASES)}")
    results: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            its = run_case(name, out, args.steps, rep)
            results[name] += its
            print(json.dumps({"case": name, "rep": rep, "it_s": its,
                              "load": open("/proc/loadavg").read().split()[0]}), flush=True)
    summary = {n: {"median_it_s_per_run": statistics.median(v), "runs": v}
               for n, v in results.items()}
    summary["cores"] = usable_cores()
    (out / "cpu_share.json").write_text(json.dumps(summary, indent=1))
    for n in names:
        print(f"{n:<16} {summary[n]['median_it_s_per_run']:6.3f} it/s per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
