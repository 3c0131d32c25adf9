"""Hostile training input: bad images skipped and counted, paths that leave their data
folder, oversized members never read, malformed metadata lines named, YAML bombs and run
names that are paths refused."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from hypersd_core.training.batch import DataOptions

BACKBONE = SimpleNamespace(resolution=32)  # what the readers use before encoding


def png(colour=(200, 0, 0), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root, names: dict[str, bytes], lines: list[str]):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in names.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def line(name: str, text: str = "a red handwritten digit 7") -> str:
    return json.dumps({"file_name": name, "text": text})


# ------------------------------------------------------------------ item 8
def test_bad_image_is_skipped_and_counted(tmp_path):
    from hypersd_core.training.data import FolderData

    folder = image_folder(tmp_path / "set", {"good.png": png(), "bad.png": b"no image"},
                          [line("good.png"), line("bad.png")])
    data = FolderData(BACKBONE, folder)
    got = list(data)
    assert len(got) == 1 and data.skipped == 1


# ------------------------------------------------------------------ item 10
def test_malformed_metadata_line_names_the_file_and_line(tmp_path):
    from hypersd_core.training.data import FolderData

    folder = image_folder(tmp_path / "set", {"good.png": png()},
                          [line("good.png"), '{"file_name": "x.png", "text": '])
    with pytest.raises(ValueError, match=r"set/metadata\.jsonl line 2: not valid JSON"):
        FolderData(BACKBONE, folder)


# ------------------------------------------------------------------ item 7 / 10: paths
def test_file_names_cannot_leave_the_data_folder(tmp_path):
    from hypersd_core.training.data import FolderData

    (tmp_path / "outside.png").write_bytes(png((0, 0, 255)))
    folder = image_folder(tmp_path / "set", {"good.png": png()},
                          [line("good.png"), line("../outside.png"),
                           line(str(tmp_path / "outside.png"))])
    data = FolderData(BACKBONE, folder)
    got = list(data)
    assert len(got) == 1 and data.skipped == 2  # only the image inside the folder is read


def test_parquet_path_cells_cannot_leave_the_data_folder(tmp_path):
    import pandas as pd

    from hypersd_core.training.datasets import HFDataset

    (tmp_path / "outside.png").write_bytes(png((0, 0, 255)))
    folder = tmp_path / "pq"
    folder.mkdir()
    (folder / "inside.png").write_bytes(png())
    pd.DataFrame({"image": ["inside.png", "../outside.png", str(tmp_path / "outside.png")],
                  "text": ["in", "out", "abs"]}).to_parquet(folder / "data.parquet")
    ds = HFDataset(BACKBONE, str(folder / "data.parquet"), DataOptions())
    got = list(ds)
    assert [s.caption for s in got] == ["in"] and ds.skipped == 2


# ------------------------------------------------------------------ item 9
def _shard(path, members: list[tuple[str, bytes]], gz: bool):
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_oversized_webdataset_members_are_skipped_unread(tmp_path):
    from hypersd_core.training.batch import MAX_CAPTION_BYTES, MAX_IMAGE_BYTES
    from hypersd_core.training.datasets import WebDataset

    big_caption = b"a" * (MAX_CAPTION_BYTES + 1)
    big_image = png() + b"\0" * MAX_IMAGE_BYTES  # a valid PNG with trailing bytes
    shard = _shard(tmp_path / "s.tar.gz", [
        ("0.png", png()), ("0.txt", b"a red handwritten digit 7"),
        ("1.png", png()), ("1.txt", big_caption),
        ("2.png", big_image), ("2.txt", b"a blue handwritten digit 3"),
        ("3.png", png()), ("3.json", json.dumps({"caption": "x" * (MAX_CAPTION_BYTES + 1)}).encode()),
    ], gz=True)
    ds = WebDataset(BACKBONE, str(shard), DataOptions())
    got = list(ds)
    assert [s.caption for s in got] == ["a red handwritten digit 7"]
    assert ds.skipped == 3


def test_gzip_caption_bomb_is_not_read(tmp_path, monkeypatch):
    """A 64 MiB caption compresses to ~64 KB; only its header may be looked at."""
    from hypersd_core.training import datasets

    shard = tmp_path / "bomb.tar.gz"
    with open(shard, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz, \
            tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("0.txt")
        info.size = 64 * 2**20
        tar.addfile(info, io.BytesIO(b"a" * info.size))
        tar.addfile(tarfile.TarInfo("0.png"), io.BytesIO(b""))
    reads = []
    real = tarfile.ExFileObject.read if hasattr(tarfile, "ExFileObject") else None
    if real is not None:
        def spy(self, size=-1):
            reads.append(size)
            return real(self, size)
        monkeypatch.setattr(tarfile.ExFileObject, "read", spy)
    ds = datasets.WebDataset(BACKBONE, str(shard), DataOptions())
    assert list(ds) == [] and ds.skipped == 1
    assert all(0 <= r <= datasets.MAX_IMAGE_BYTES + 1 for r in reads), reads


def test_oversized_caption_cell_is_skipped(tmp_path):
    from hypersd_core.training.batch import MAX_CAPTION_BYTES
    from hypersd_core.training.datasets import _sample

    got = [_sample(png(), caption, BACKBONE.resolution)
           for caption in ("a" * (MAX_CAPTION_BYTES + 1), "ok")]
    assert got[0] is None and got[1].caption == "ok"


# ------------------------------------------------------------------ item 4
def alias_bomb(levels: int) -> str:
    """Each level lists the one before nine times: 9**levels values from a few hundred bytes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append(f"seed: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_refused_by_the_settings_check(tmp_path):
    from hypersd_core.app.service import AppSettings
    from train_tab import controller as ctl

    settings = AppSettings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data",
                           models_dir=tmp_path / "models", lora_dir=tmp_path / "loras")
    text = alias_bomb(7)  # 4.8 million values; the old check spent minutes printing them
    assert len(text) < 440
    t0 = time.perf_counter()
    checked = ctl.check_settings(text, "digits", "", "digits", settings)
    assert checked.config is None and "expands" in checked.message, checked.message[:300]
    assert time.perf_counter() - t0 < 5  # refused from the graph, never walked as a tree


def test_bounded_yaml_limits(tmp_path):
    from hypersd_core import safe_yaml
    from hypersd_core.study.config import StudyConfig

    assert safe_yaml.load("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(safe_yaml.YAMLBoundsError, match="aliases"):
        safe_yaml.load("a: &x 1\nb: [" + ", ".join(["*x"] * 101) + "]\n")
    with pytest.raises(safe_yaml.YAMLBoundsError, match="bytes"):
        safe_yaml.load("a: " + "x" * (safe_yaml.MAX_YAML_BYTES + 1))
    study = tmp_path / "study.yaml"
    study.write_text(alias_bomb(7).replace("seed:", "prompts:"))
    with pytest.raises(ValueError, match="expands"):
        StudyConfig.from_yaml(study)


# ------------------------------------------------------------------ item 7: run names
def test_run_name_cannot_leave_the_runs_folder(tmp_path):
    from hypersd_core.app.service import AppSettings
    from hypersd_core.training import chain
    from train_tab import controller as ctl

    settings = AppSettings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data",
                           models_dir=tmp_path / "models", lora_dir=tmp_path / "loras")
    escape = "x/../../../../" + str(tmp_path / "somewhere").lstrip("/")
    text = ctl.preset_text(ctl.list_presets()[0]) + f"name: {escape}\nsteps: 1\n"
    checked = ctl.check_settings(text, "digits", "", "digits", settings)
    assert checked.config is None and "name must be" in checked.message
    with pytest.raises(ValueError, match="outside the runs folder"):
        chain.inside(tmp_path / "runs", tmp_path / "runs" / "a" / ".." / ".." / "b")
    assert not (tmp_path / "somewhere").exists()
