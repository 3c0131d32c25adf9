"""GPU check for bringing your own model and data (not collected by pytest: run it).

1. Full-size SD1.5 and SDXL with random weights (assets/configs), saved as diffusers
   folders, written as single files in the original key layout (the tests' mapping), loaded
   with ``--model FILE`` (the shipped configs, the rebuilt CLIP tokenizer): weights and
   images must equal the folder's.
2. The training-step ratio, cached latents vs an image folder encoded every step, at full
   SD1.5 size (bench/cached_data.py).

    python tests/models/gpu_byo_check.py --out DIR            # on a GPU
    python tests/models/gpu_byo_check.py --out DIR --tiny     # CPU dry run (tiny models)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def roundtrip(kind: str, root: Path, device: str, tiny: bool) -> dict:
    from test_single_file import write_single_file

    from hypersd_core.models import single_file
    from hypersd_core.models.backbone import load_backbone

    t0 = time.perf_counter()
    dtype = torch.float16 if device == "cuda" else torch.float32
    src = load_backbone(f"random:{kind}{'-tiny' if tiny else ''}", device=device, dtype=dtype)
    folder = root / f"{kind}-folder"
    src.pipe.save_pretrained(folder)
    del src
    file = write_single_file(folder, root / f"{kind}.safetensors")
    if tiny:  # the tiny architecture and its tokenizer stand in for assets/configs
        single_file.CONFIGS[kind] = folder
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    a = load_backbone(str(file), device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    b = load_backbone(str(folder), device=device, dtype=dtype)
    if not tiny:  # the folder holds the random model's stand-in tokenizer: use the real one
        b.pipe.tokenizer = single_file.clip_tokenizer()
        if kind == "sdxl":
            b.pipe.tokenizer_2 = single_file.clip_tokenizer(pad_token="!")
    same = {}
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind == "sdxl" else ()):
        x, y = getattr(a.pipe, name).state_dict(), getattr(b.pipe, name).state_dict()
        same[name] = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    images = []
    for bb in (a, b):
        images.append(bb.pipe(prompt=["a photo of a cat"], num_inference_steps=2,
                              guidance_scale=5.0, output_type="np",
                              generator=torch.Generator().manual_seed(0)).images)
    return {"kind": kind, "file_gb": round(file.stat().st_size / 2**30, 2),
            "build_and_write_s": round(built, 1), "single_file_load_s": round(load_s, 1),
            "weights_equal": same, "max_pixel_diff": float(np.abs(images[0] - images[1]).max()),
            "image_std": float(images[0].std())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (dry run)")
    p.add_argument("--kinds", default="sd15,sdxl")
    p.add_argument("--skip-ratio", action="store_true")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="byo-"))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "roundtrip": []}
    for kind in args.kinds.split(","):
        try:
            r = roundtrip(kind, root, device, args.tiny)
        except Exception as err:  # record and go on: one JSON with everything
            r = {"kind": kind, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(r), flush=True)
        result["roundtrip"].append(r)
        (out / "byo_check.json").write_text(json.dumps(result, indent=1))
        if kind == "sd15" and not args.skip_ratio:  # the step ratio on the SD1.5 folder
            from hypersd_core.bench.cached_data import bench_cached_data

            try:
                result["cached_ratio"] = bench_cached_data(
                    str(root / "sd15-folder"), "tscd", batch_size=2 if args.tiny else 4,
                    samples=32 if args.tiny else 64, repeats=2 if args.tiny else 5,
                    steps=1 if args.tiny else 3, device=device, scratch=root / "bench")
            except Exception as err:
                result["cached_ratio"] = {"error": f"{type(err).__name__}: {err}"}
                print(result["cached_ratio"], flush=True)
            (out / "byo_check.json").write_text(json.dumps(result, indent=1))
    (out / "byo_check.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'byo_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
