"""An image sheet of a miniature world: samples of one or more rows, each with its prompt.

``python -m hypersd_core.scenes.sheet --rows teacher:25 --n 12 --out sheet.png`` draws the
teacher's 25-step samples of 12 prompts from the scenes grammar (``prompts --seed``), the
real render of each prompt's scene beside them with ``--real``.
"""

from __future__ import annotations

import argparse

from hypersd_core.evaluation.sheet import draw_sheet


def main(argv=None) -> int:
    from PIL import Image

    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler
    from hypersd_core.scenes.evaluate import parse_row
    from hypersd_core.worlds import scenes as world

    p = argparse.ArgumentParser(prog="python -m hypersd_core.scenes.sheet")
    p.add_argument("--model", default="scenes")
    p.add_argument("--rows", default="teacher:25", help="comma-separated METHOD:STEPS[:ADAPTER]")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true", help="add the real render of each scene")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    items = world.prompts(args.n, args.seed)
    prompts = [s.prompt for s in items]
    sampler = Sampler(load_backbone(args.model))
    columns: dict[str, list] = {}
    if args.real:
        columns["real render"] = [Image.fromarray(world.render(s)) for s in items]
    for spec in args.rows.split(","):
        row = parse_row(spec.strip())
        gen = sampler.generate(row["method"], row["steps"], prompts, [s.seed for s in items],
                               adapter=row["adapter"])
        columns[row["label"]] = gen.images
    print(draw_sheet(columns, prompts, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
