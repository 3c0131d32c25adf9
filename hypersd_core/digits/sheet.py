"""A digits image sheet: rows of methods side by side on the same prompts and seeds.

``python -m hypersd_core.digits.sheet --rows "teacher@25=teacher:25,LCM@1=lcm:1:FILE"
--n 8 --seed 30000 --out sheet.png``: ROW is ``LABEL=METHOD:STEPS[:ADAPTER]`` (adapter: a
LoRA file, a run's final folder, or a UNet folder for hypersd-unet; the shipped adapter
when omitted). Prompts: every ``80 / n``-th of the eval prompts, one seed each from
``--seed`` (keep it away from the tune and eval seeds).
"""

from __future__ import annotations

import argparse

from hypersd_core.evaluation.sheet import draw_sheet


def parse(spec: str) -> tuple[str, str, int, str | None]:
    """"LABEL=METHOD:STEPS[:ADAPTER]" -> (label, method, steps, adapter)."""
    label, _, rest = spec.partition("=")
    parts = rest.split(":", 2)
    if not label or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"a row is LABEL=METHOD:STEPS[:ADAPTER], got {spec!r}")
    return label, parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None


def main(argv=None) -> int:
    from hypersd_core.digits.evaluate import eval_prompts
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    p = argparse.ArgumentParser(prog="python -m hypersd_core.digits.sheet")
    p.add_argument("--rows", required=True, help="comma-separated LABEL=METHOD:STEPS[:ADAPTER]")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=30000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = [parse(s.strip()) for s in args.rows.split(",") if s.strip()]
    prompts, _ = eval_prompts(80)
    prompts = prompts[:: max(1, 80 // args.n)][: args.n]
    seeds = [args.seed + i for i in range(len(prompts))]
    sampler = Sampler(load_backbone("digits"))
    columns = {label: sampler.generate(method, steps, prompts, seeds, adapter=adapter).images
               for label, method, steps, adapter in rows}
    print(draw_sheet(columns, prompts, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
