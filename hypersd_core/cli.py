"""Command line: ``python -m hypersd_core <command> ...``. Anything the UI can do, a
script can do, through the same functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


class CLIError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _output_dir(path: str, flag: str) -> Path:
    """An output folder that is not a file and can be written (created if absent),
    checked before any model loads."""
    import tempfile

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        raise CLIError(f"cannot write to {flag} {out}: {err.strerror or err}") from None
    return out


MAX_SAMPLE_STEPS = 1000  # the models' training schedule has T = 1000 timesteps
SAMPLE_BATCH = {"digits": 64, "scenes": 32, "sd15": 4, "sdxl": 2}  # default images per pipeline call


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"steps must be integers >= 1, got {text!r}")
    return values


# ------------------------------------------------------------------ commands

def cmd_sample(args) -> int:
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import RECIPES, Sampler
    from hypersd_core.training.config import MAX_SEED

    if args.method not in RECIPES:
        raise CLIError(f"unknown method {args.method!r}; choose from {', '.join(RECIPES)}")
    if args.steps > MAX_SAMPLE_STEPS:
        raise CLIError(f"--steps must be <= {MAX_SAMPLE_STEPS} (the schedule has "
                       f"{MAX_SAMPLE_STEPS} timesteps), got {args.steps}")
    if not 0 <= args.seed <= MAX_SEED - (args.num_images - 1):
        raise CLIError(f"--seed must be in [0, {MAX_SEED}] for every image (seed + i), "
                       f"got {args.seed} with --num-images {args.num_images}")
    out = _output_dir(args.out, "--out")
    from hypersd_core.models.unet import is_unet_source

    if args.lora and not (args.method == "hypersd-unet" and is_unet_source(args.lora)):
        from hypersd_core.models.lora import check_lora_file

        try:
            check_lora_file(args.lora)
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from None
    backbone = load_backbone(args.model, kind=args.kind, device=args.device)
    sampler = Sampler(backbone)
    batch = args.batch_size or SAMPLE_BATCH.get(backbone.kind, 4)
    width = max(3, len(str(args.num_images - 1)))
    for p, prompt in enumerate(args.prompt):
        seconds: list[float] = []
        for start in range(0, args.num_images, batch):  # written as they come: memory is one batch
            count = min(batch, args.num_images - start)
            seeds = [args.seed + start + i for i in range(count)]
            gen = sampler.generate(args.method, args.steps, [prompt] * count, seeds,
                                   adapter=args.lora, guidance=args.guidance, eta=args.eta)
            for i, image in enumerate(gen.images):
                image.save(out / f"{p:03d}_{start + i:0{width}d}.png")
            seconds += gen.seconds_per_image
        mean = sum(seconds) / len(seconds)
        print(f"{prompt!r}: {len(seconds)} images, {mean * 1000:.1f} ms/image "
              f"({args.method}, {args.steps} steps, adapter {gen.adapter or 'none'})")
    print(f"wrote {out}")
    return 0


def cmd_train(args) -> int:
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.runs import Run
    from hypersd_core.training.trainer import NonFiniteLossError, train

    try:
        if args.resume:  # train() refuses a folder that is not a run or that another process owns
            run = Run(args.resume)
            status = train(run.dir, resume=True)
        else:
            if not args.preset or not args.run_dir:
                raise CLIError("train needs --preset PRESET and --run-dir DIR (or --resume DIR)")
            cfg = load_preset(args.preset, args.set)
            run = Run.create(args.run_dir, cfg)
            if args.prepare_only:  # several processes: launch the trainer on this folder
                print(f"{run.dir}: prepared; start it with `accelerate launch --config_file "
                      f"assets/accelerate/multi-gpu-ddp.yaml -m hypersd_core.training.trainer "
                      f"--run-dir {run.dir}` (or torchrun --nproc_per_node N -m ...)")
                return 0
            status = train(run.dir)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{run.dir}: {status.get('state')} at step {status.get('step')}/{status.get('total')}")
    return 0 if status.get("state") in ("done", "stopped") else 1


def cmd_stop(args) -> int:
    from hypersd_core.training.runs import Run

    run = Run(args.run_dir)
    run.config()
    run.request_stop()
    print(f"stop requested for {run.dir}")
    return 0


def cmd_status(args) -> int:
    from hypersd_core.training.runs import Run

    run = Run(args.run_dir)
    run.config()
    print(json.dumps(run.status(), indent=1))
    return 0


def cmd_build_digits(args) -> int:
    from hypersd_core.digits.build import BuildConfig, build

    t0 = time.perf_counter()
    cfg = BuildConfig(**({"unet_steps": args.unet_steps} if args.unet_steps else {}))
    times = build(args.out, cfg, parts=tuple(args.parts.split(",")))
    print(json.dumps(times, indent=1))
    print(f"built the digits world in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_chain(args) -> int:
    from hypersd_core.digits.chain import build_digits_chain

    build_digits_chain(args.stages.split(","), runs_root=args.runs_root,
                       export=not args.no_export, overrides=args.set)
    return 0


def cmd_build_extra(args) -> int:
    """build-controlnet / build-onestep-unet / build-style (digits world)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("max_seconds", args.max_seconds)) if v is not None}
    if args.command == "build-controlnet":
        from hypersd_core.digits.controlnet import ControlNetConfig, build_controlnet

        kw = {"out": args.out} if args.out else {}
        info = build_controlnet(cfg=ControlNetConfig(**overrides), device=args.device, **kw)
    elif args.command == "build-onestep-unet":
        from hypersd_core.digits.onestep import OneStepConfig, build_onestep_unet

        kw = {"out": args.out} if args.out else {}
        info = build_onestep_unet(cfg=OneStepConfig(**overrides), device=args.device, **kw)
    else:
        from hypersd_core.digits.style import StyleConfig, build_style

        kw = {"out": args.out} if args.out else {}
        if args.net_steps:
            overrides["style_net_steps"] = args.net_steps
        info = build_style(cfg=StyleConfig(**overrides), device=args.device, **kw)
    print(json.dumps(info, indent=1))
    return 0


def cmd_evaluate_extra(args) -> int:
    from hypersd_core.digits import evaluate_extra

    if args.command == "evaluate-control":
        return evaluate_extra.main_control(args)
    return evaluate_extra.main_style(args)


def cmd_evaluate(args) -> int:
    if args.model == "scenes":
        from hypersd_core.scenes.evaluate import main_from_cli

        return main_from_cli(args)
    from hypersd_core.digits.evaluate import main_evaluate

    return main_evaluate(args)


def cmd_bench(args) -> int:
    from hypersd_core.bench.run import main_bench

    return main_bench(args)


def cmd_export_kohya(args) -> int:
    from hypersd_core.models.lora import export_kohya

    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"{out} is a folder; give the output file name (e.g. {out / 'lora-kohya.safetensors'})")
    _output_dir(str(out.parent), "the output folder")
    try:
        print(export_kohya(args.lora, args.out))
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    return 0


def cmd_push(args) -> int:
    from hypersd_core.training.push import push

    print(push(args.run, args.repo, private=args.private, dry_run=args.dry_run))
    return 0


def cmd_score(args) -> int:
    from hypersd_core.rewards import score_images

    for name, value in score_images(args.reward, args.images, args.prompt, path=args.weights):
        print(f"{name}\t{value:.4f}")
    return 0


def cmd_report(args) -> int:
    from hypersd_core.evaluation.report import main as report_main

    return report_main()


def cmd_cache_data(args) -> int:
    from hypersd_core.training.cache_build import cache_data
    from hypersd_core.training.data import DataOptions

    options = DataOptions(image_column=args.image_column, caption_column=args.caption_column,
                          split=args.split, streaming=args.streaming)
    m = cache_data(args.model, args.data, args.out, batch_size=args.batch_size,
                   shard_size=args.shard_size, max_samples=args.max_samples, dtype=args.dtype,
                   device=args.device, options=options, processes=args.processes)
    print(f"cached {m['num_samples']} samples ({m['skipped']} unreadable skipped) in "
          f"{len(m['shards'])} shard(s), {m['seconds']:.1f} s: {args.out} (train with data={args.out})")
    return 0


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hypersd_core",
        description="Hyper-SD Studio: distil Stable Diffusion into a few-step model "
                    "(TSCD, feedback, DMD) and compare it with LCM / TCD.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images with a method's recipe")
    p.add_argument("--model", default="digits",
                   help="'digits', 'scenes', a diffusers folder or a hub id")
    p.add_argument("--kind", choices=["digits", "scenes", "sd15", "sdxl"],
                   help="override the detected kind")
    p.add_argument("--method", default="hypersd",
                   help="teacher, lcm, tcd, hypersd, hypersd-unified, hypersd-unet")
    p.add_argument("--steps", type=_positive_int, default=4)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    p.add_argument("--num-images", type=_positive_int, default=1)
    p.add_argument("--batch-size", type=_positive_int,
                   help="images per pipeline call, saved before the next (default: digits 64, "
                        "sd15 4, sdxl 2)")
    p.add_argument("--out", required=True, help="output folder ({prompt:03d}_{image:03d}.png)")
    p.add_argument("--lora", help="LoRA file (diffusers or kohya safetensors) instead of the default")
    p.add_argument("--guidance", type=float, help="CFG scale (teacher default: the model's)")
    p.add_argument("--eta", type=float, help="TCD eta (default: the recipe's)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("train", help="train a stage in a run folder (or resume one)")
    p.add_argument("--preset", help="preset name in assets/presets or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--run-dir", help="new run folder")
    p.add_argument("--resume", metavar="DIR", help="resume the run in DIR from its newest checkpoint")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the run folder (config.yaml) without training, for a multi-process launch")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("stop", help="ask a running run to stop (it checkpoints first)")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_stop)

    p = sub.add_parser("status", help="print a run's status.json")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_status)

    from hypersd_core import cli_worlds

    cli_worlds.add_commands(sub)

    p = sub.add_parser("build-digits", help="train the digits world from scratch (CPU)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "assets" / "digits"))
    p.add_argument("--parts", default="pipeline,eval", help="comma list of pipeline,eval")
    p.add_argument("--unet-steps", type=_positive_int)
    p.set_defaults(fn=cmd_build_digits)

    p = sub.add_parser("chain", help="train the digits adapters in order and export them to assets")
    p.add_argument("--stages", default="lcm,tcd,k8,k4,k2,k1",
                   help="comma list of lcm,tcd,k8,k4,k2,k1,feedback,dmd")
    p.add_argument("--runs-root", default="runs/chain")
    p.add_argument("--no-export", action="store_true", help="keep adapters in the runs only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every stage (e.g. steps=20 for a smoke run)")
    p.set_defaults(fn=cmd_chain)

    p = sub.add_parser("evaluate", help="metric table of methods x steps")
    from hypersd_core.digits.evaluate import add_arguments

    add_arguments(p)
    p.set_defaults(fn=cmd_evaluate)

    for name, text in (
            ("build-controlnet", "train the digits ControlNet (ink-mask control) into assets"),
            ("build-onestep-unet", "train the digits one-step full UNet (hypersd-unet) into assets"),
            ("build-style", "fine-tune the glow style backbone and its style net into assets")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--steps", type=_positive_int)
        p.add_argument("--batch-size", type=_positive_int)
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
        p.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
        p.add_argument("--max-seconds", type=float, help="stop training after this long")
        p.add_argument("--out", help="output folder (default: the shipped one in assets/digits)")
        if name == "build-style":
            p.add_argument("--net-steps", type=_positive_int, help="style-net training steps")
        p.set_defaults(fn=cmd_build_extra)

    from hypersd_core.digits.evaluate_extra import add_control_arguments, add_style_arguments

    p = sub.add_parser("evaluate-control", help="control IoU / accuracy table with the ControlNet")
    add_control_arguments(p)
    p.set_defaults(fn=cmd_evaluate_extra)
    p = sub.add_parser("evaluate-style", help="base adapters on the glow style backbone: table")
    add_style_arguments(p)
    p.set_defaults(fn=cmd_evaluate_extra)

    p = sub.add_parser("bench", help="speed, memory and scaling benchmarks (--gpu: GPU check)")
    from hypersd_core.bench.run import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("export-kohya", help="convert a diffusers-format LoRA to kohya keys")
    p.add_argument("lora")
    p.add_argument("out")
    p.set_defaults(fn=cmd_export_kohya)

    p = sub.add_parser("push", help="upload a run's adapter (diffusers + kohya) with a model "
                       "card to the Hugging Face Hub (offline: says what it would upload)")
    p.add_argument("run", help="run folder")
    p.add_argument("--repo", required=True, help="Hub model repo, OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--dry-run", action="store_true", help="say what would be uploaded, upload nothing")
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser("report", help="rewrite the generated results blocks (docs/results.md, "
                       "README's headline) from assets/results")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("cache-data", help="encode a data set once: VAE latents + prompt "
                       "embeddings in safetensors shards, read by training with data=OUT")
    p.add_argument("--model", default="digits", help="the model the cache is for (its VAE and text encoders)")
    p.add_argument("--data", required=True, help="any training data setting (digits, image folder, "
                   "datasets folder / parquet / hf:ID, webdataset shards)")
    p.add_argument("--out", required=True, help="new cache folder")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--shard-size", type=_positive_int, default=4096, help="samples per shard")
    p.add_argument("--max-samples", type=_positive_int, help="stop after this many samples")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored precision")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--split", default="train")
    p.add_argument("--streaming", action="store_true", help="stream a datasets source")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--processes", type=_positive_int, default=1,
                   help="encode in this many processes, each its share (CUDA: one GPU each, round robin)")
    p.set_defaults(fn=cmd_cache_data)

    p = sub.add_parser("score", help="score images with a reward model")
    p.add_argument("--reward", required=True)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--prompt", required=True)
    p.add_argument("--weights", help="local weights path for the reward (real models)")
    p.set_defaults(fn=cmd_score)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from hypersd_core.models.backbone import ModelNotFoundError
    from hypersd_core.training.runs import RunLockedError

    try:
        return args.fn(args)
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ModelNotFoundError, FileNotFoundError, FileExistsError, ValueError, KeyError,
            RunLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an output on a read-only file system, a full disk
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
