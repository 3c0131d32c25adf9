"""Command-line verbs of the miniature worlds: ``prompts`` (the grammar with ground truth)
and ``build-scenes`` (the resumable build). Registered by ``hypersd_core.cli``."""

from __future__ import annotations

import json
import time


def cmd_prompts(args) -> int:
    """N prompts of a world's grammar; with --json one object per line (prompt + truth)."""
    import numpy as np

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.model == "scenes":
        from hypersd_core.worlds import scenes

        for s in scenes.prompts(args.n, args.seed):
            print(json.dumps(s.to_json()) if args.json else s.prompt)
        return 0
    if args.model == "digits":
        from hypersd_core.worlds import digits

        rng = np.random.default_rng(args.seed)
        for i in rng.integers(0, len(digits.ALL_PROMPTS), args.n):
            prompt, colour, digit = digits.ALL_PROMPTS[int(i)]
            print(json.dumps({"prompt": prompt, "colour": colour, "digit": digit})
                  if args.json else prompt)
        return 0
    raise ValueError(f"--model must be 'digits' or 'scenes', got {args.model!r}")


def config_overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs for ``SceneBuildConfig``, each value read as its field's type
    (tuples as comma-separated integers)."""
    from dataclasses import fields

    from hypersd_core.scenes.build import SceneBuildConfig

    types = {f.name: f.default for f in fields(SceneBuildConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set wants KEY=VALUE with KEY one of {sorted(types)}, "
                             f"got {pair!r}")
        default = types[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, tuple):
                out[key] = tuple(int(v) for v in value.split(","))
            else:
                out[key] = type(default)(value)
        except ValueError:
            raise ValueError(f"--set {key}: cannot read {value!r} as "
                             f"{type(default).__name__}") from None
    return out


def cmd_build_scenes(args) -> int:
    import torch

    from hypersd_core.scenes.build import PHASES, TINY, SceneBuildConfig, build

    if args.threads:
        torch.set_num_threads(args.threads)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phases {unknown}; choose from {list(PHASES)}")
    cfg = SceneBuildConfig(**(TINY if args.tiny else {}), **config_overrides(args.set or []))
    t0 = time.perf_counter()
    kw = {"out_dir": args.out} if args.out else {}
    summary = build(work=args.work, cfg=cfg, phases=phases, **kw)
    print(json.dumps(summary, indent=1))
    print(f"scenes build: {time.perf_counter() - t0:.0f} s this call, "
          f"{summary['total_wall_s']:.0f} s in all phases so far")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("prompts", help="print prompts of a world's grammar (--json: with truth)")
    p.add_argument("--model", default="digits", choices=["digits", "scenes"])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(fn=cmd_prompts)

    p = sub.add_parser("build-scenes", help="build the scenes world (resumable; CPU)")
    p.add_argument("--work", help="work folder with checkpoints (default runs/build-scenes)")
    p.add_argument("--out", help="where the world goes (default assets/scenes)")
    p.add_argument("--phases", default="data,vae,text_encoder,unet,pipeline,eval")
    p.add_argument("--tiny", action="store_true", help="a tiny build in seconds (tests)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change a field of the build's configuration (repeatable), e.g. "
                        "--set unet_word_drop=0.5")
    p.set_defaults(fn=cmd_build_scenes)
