"""Training data at scale: a ``datasets`` folder saved to disk, parquet, webdataset tar
shards and cached latents; bad samples skipped and counted; per-process splits; SDXL
size/crop conditioning; short digits runs that read each source to final weights."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hypersd_core.models.backbone import load_backbone
from hypersd_core.training.data import DataOptions, make_data
from hypersd_core.worlds import digits

BROKEN = b"\x89PNG\r\n\x1a\n this is no image"


def digits_examples(n: int) -> list[tuple[bytes, str]]:
    """n real digits-world training images as PNG bytes with their captions."""
    data = digits.DigitsDataset("train").tensors()
    prompts = [p for p, _, _ in digits.ALL_PROMPTS]
    out = []
    for i in range(n):
        arr = ((data["images"][i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(arr.astype("uint8")).save(buf, format="PNG")
        p = int(data["digits"][i]) * len(digits.COLOUR_NAMES) + int(data["colours"][i])
        out.append((buf.getvalue(), prompts[p]))
    return out


def save_hf_folder(path, n: int, broken: int = 0):
    import datasets

    rows = digits_examples(n)
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": b, "path": None} for b, _ in rows] + [{"bytes": BROKEN, "path": None}] * broken,
         "caption": [c for _, c in rows] + ["broken"] * broken},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(path))
    return path


def write_shards(folder, n_shards: int, per_shard: int, bad: bool = True) -> str:
    """Tar shards: KEY.png + KEY.txt, or KEY.png + KEY.json; plus a broken image and an
    image without caption per shard when ``bad``."""
    rows = digits_examples(n_shards * per_shard)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for i in range(per_shard):
                img, cap = rows[s * per_shard + i]
                key = f"s{s}-{i:04d}"
                add(f"{key}.png", img)
                if i % 2:
                    add(f"{key}.json", json.dumps({"caption": cap, "w": 32}).encode())
                else:
                    add(f"{key}.txt", cap.encode())
            if bad:
                add(f"s{s}-bad.png", BROKEN)
                add(f"s{s}-bad.txt", b"a broken image")
                add(f"s{s}-nocap.png", rows[0][0])
    return str(folder / ("shard-{000.." + f"{n_shards - 1:03d}" + "}.tar"))


@pytest.fixture(scope="module")
def digits_backbone():
    return load_backbone("digits")


@pytest.mark.slow  # whole runs on each source (the readers alone stay in the default run)
def test_datasets_folder_columns_and_bad_rows(digits_backbone, tmp_path):
    folder = save_hf_folder(tmp_path / "ds", 12, broken=12)
    with pytest.raises(ValueError, match="no column 'image'"):
        make_data(digits_backbone, str(folder))
    opts = DataOptions(image_column="img", caption_column="caption")
    data = make_data(digits_backbone, str(folder), opts)
    batch = data.sample(16, torch.Generator().manual_seed(0))
    assert batch.latents.shape == (16, 4, 8, 8) and len(batch.prompts) == 16
    assert "broken" not in batch.prompts and data.skipped > 0  # drawn, skipped, counted
    # per-process split: two processes see disjoint rows covering everything
    a = make_data(digits_backbone, str(folder), DataOptions("img", "caption", rank=0, world_size=2))
    b = make_data(digits_backbone, str(folder), DataOptions("img", "caption", rank=1, world_size=2))
    assert set(a.rows).isdisjoint(b.rows) and len(a.rows) + len(b.rows) == 24


def test_parquet_and_streaming(digits_backbone, tmp_path):
    import datasets

    save_hf_folder(tmp_path / "ds", 8)
    datasets.load_from_disk(str(tmp_path / "ds")).to_parquet(str(tmp_path / "d.parquet"))
    opts = DataOptions(image_column="img", caption_column="caption", streaming=True, shuffle_buffer=4)
    data = make_data(digits_backbone, str(tmp_path / "d.parquet"), opts)
    assert data.streaming
    for _ in range(3):  # 3 x 5 > 8 rows: the stream restarts (next epoch)
        assert data.sample(5, torch.Generator()).latents.shape[0] == 5


def test_webdataset_shards_skip_and_split(digits_backbone, tmp_path):
    pattern = write_shards(tmp_path / "wds", 2, 6)
    data = make_data(digits_backbone, pattern, DataOptions(shuffle_buffer=4))
    batch = data.sample(10, torch.Generator().manual_seed(0))
    assert batch.latents.shape[0] == 10 and all("digit" in p for p in batch.prompts)
    assert list(iter(data)) and data.skipped >= 4  # broken image + missing caption, per shard
    assert len(list(iter(data))) == 12
    ranks = [make_data(digits_backbone, pattern, DataOptions(rank=r, world_size=2)) for r in (0, 1)]
    assert ranks[0].shards != ranks[1].shards and len(ranks[0].shards) == 1
    with pytest.raises(ValueError, match="no .tar shards"):
        make_data(digits_backbone, str(tmp_path / "none-*.tar"))


def test_sdxl_gets_original_size_and_crop(tiny_sdxl, tmp_path):
    bb = load_backbone(str(tiny_sdxl))
    res = bb.resolution
    img = Image.fromarray((np.random.default_rng(0).random((res, res + 16, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "a.tar", "w") as tar:
        for name, data in (("k.png", buf.getvalue()), ("k.txt", b"a red handwritten digit 1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    batch = make_data(bb, str(folder / "*.tar")).sample(2, torch.Generator())
    assert batch.embeds.time_ids.tolist() == [[res, res + 16, 0, 8, res, res]] * 2
    assert batch.uncond.time_ids.tolist() == batch.embeds.time_ids.tolist()


def test_cache_rows_equal_encoding(digits_backbone, tmp_path):
    from hypersd_core.training.cache import CachedData
    from hypersd_core.training.cache_build import cache_data

    m = cache_data("digits", "digits", tmp_path / "c", batch_size=16, shard_size=24,
                   max_samples=40, dtype="fp32", progress=False)
    assert m["num_samples"] == 40 and [s["count"] for s in m["shards"]] == [32, 8]
    data = make_data(digits_backbone, str(tmp_path / "c"))
    assert isinstance(data, CachedData)
    t, captions = data.rows_at([0, 33])
    direct = make_data(digits_backbone, "digits")
    ref = direct.batch(torch.tensor([0, 33]))
    torch.testing.assert_close(t["latents"], ref.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["hidden"], ref.embeds.hidden, rtol=1e-5, atol=1e-5)
    assert captions == ref.prompts and torch.equal(t["labels"], ref.labels)
    batch = data.sample(8, torch.Generator())
    assert batch.images is None and batch.masks.shape == (8, 32, 32)
    with pytest.raises(FileExistsError):
        cache_data("digits", "digits", tmp_path / "c", max_samples=4, progress=False)


def test_cache_for_another_model_is_refused(tiny_sd15, tmp_path):
    from hypersd_core.training.cache_build import cache_data

    cache_data("digits", "digits", tmp_path / "c", max_samples=4, progress=False)
    with pytest.raises(ValueError, match="cached for a digits model"):
        make_data(load_backbone(str(tiny_sd15)), str(tmp_path / "c"))


def _short_run(tmp_path, name: str, data: str, *extra: str):
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.runs import Run
    from hypersd_core.training.trainer import train

    cfg = load_preset("digits-tscd-k8", [f"data={data}", "steps=2", "batch_size=4", "log_every=1",
                                         "sample_every=2", "checkpoint_every=2", "lora_rank=4",
                                         "lora_alpha=4", "sample_prompts=[a red handwritten digit 7]",
                                         *extra])
    run = Run.create(tmp_path / name, cfg)
    status = train(run.dir)
    assert status["state"] == "done", status
    assert (run.final_dir / "pytorch_lora_weights.safetensors").is_file()
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]  # the step records


@pytest.mark.slow  # whole runs on each source (the readers alone stay in the default run)
def test_digits_runs_read_datasets_webdataset_and_cache(tmp_path):
    from hypersd_core.cli import main

    folder = save_hf_folder(tmp_path / "ds", 16, broken=16)
    metrics = _short_run(tmp_path, "run-ds", str(folder), "data_image_column=img",
                         "data_caption_column=caption")
    assert metrics[-1]["data_skipped"] > 0  # half the rows are broken: counted in the metrics
    pattern = write_shards(tmp_path / "wds", 2, 8)
    metrics = _short_run(tmp_path, "run-wds", pattern, "data_shuffle_buffer=8")
    assert metrics[-1]["data_skipped"] > 0
    assert main(["cache-data", "--model", "digits", "--data", pattern, "--out",
                 str(tmp_path / "cache"), "--batch-size", "8"]) == 0
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["num_samples"] == 16
    metrics = _short_run(tmp_path, "run-cache", str(tmp_path / "cache"))
    assert metrics[-1]["data_skipped"] == 0
