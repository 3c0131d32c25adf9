"""Captioned image sets at scale: ``datasets`` datasets and webdataset tar shards.

Both yield prepared samples (resize + center crop, SDXL size/crop conditioning) and skip
unreadable ones, counting them in ``skipped`` (the trainer logs it as ``data_skipped``).
Each process of a multi-process run reads its own split: every ``world``-th row of a
random-access dataset; an even share of the shards of a streamed one or of webdataset
shards (training/stream.py: whole shards, the leftover ones split by record).

- ``datasets``: a ``save_to_disk`` folder, ``.parquet`` / ``.arrow`` files (a path or a
  glob), or ``hf:owner/name`` for a hub dataset (downloaded, or streamed with
  ``data_streaming: true``). Image column: ``datasets.Image``, encoded bytes, or a path;
  caption column: a string (or a list of strings: the first is used).
- webdataset: ``.tar`` shards as LAION subsets ship them (``data/{00000..00099}.tar``,
  ``data/*.tar`` or a folder of them): members ``KEY.jpg|png|webp`` plus ``KEY.txt`` or
  ``KEY.json`` (caption under ``data_caption_column``, else ``caption`` / ``text``), read
  with the standard library's ``tarfile``.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from pathlib import Path

from PIL import Image

from hypersd_core.models.backbone import Backbone
from hypersd_core.training.batch import (
    MAX_CAPTION_BYTES,
    MAX_IMAGE_BYTES,
    MAX_JSON_BYTES,
    Batch,
    DataOptions,
    MemberTooLarge,
    Sample,
    check_caption,
    encode_collated,
    prepare_image,
)
from hypersd_core.training.loader import MapSource, StreamSource
from hypersd_core.training.stream import records_of, share_of

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OVERSIZED = object()  # stands for a member over its cap: skipped, never read or decoded


class DataSourceError(ValueError):
    """A data setting that names nothing readable."""


def _decode(value, res: int, root: Path | None = None):
    """An image cell (PIL image, {'bytes','path'} dict, bytes or a path) -> prepared image.

    Encoded bytes over MAX_IMAGE_BYTES are refused undecoded; a path must resolve inside
    ``root`` (the dataset's own folder; None: no path is read)."""
    if isinstance(value, Image.Image):
        return prepare_image(value, res)
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_IMAGE_BYTES:
            raise MemberTooLarge(f"image cell over {MAX_IMAGE_BYTES:,} bytes")
        with Image.open(io.BytesIO(value)) as img:
            return prepare_image(img, res)
    if isinstance(value, str):
        if root is None:
            raise ValueError("image path cells are read only for local datasets")
        path = (root / value).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"image path {value!r} points outside the dataset's folder")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise MemberTooLarge(f"image file over {MAX_IMAGE_BYTES:,} bytes")
        with Image.open(path) as img:
            return prepare_image(img, res)
    raise ValueError(f"unreadable image cell of type {type(value).__name__}")


def _caption(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"caption is {type(value).__name__}, not text")
    return check_caption(value)


def data_root(source: str) -> Path | None:
    """The folder a local dataset's path cells must stay in: the ``save_to_disk`` folder,
    or the folder of the .parquet / .arrow files (None for a hub dataset)."""
    if source.startswith("hf:"):
        return None
    path = Path(source).expanduser()
    return (path if path.is_dir() else path.parent).resolve()


def _sample(image, caption, res: int, root: Path | None = None) -> Sample | None:
    """A prepared Sample from an (image cell, caption cell) record; None when unreadable
    (undecodable, over a size cap, a path outside ``root``)."""
    try:
        img, original, crop = _decode(image, res, root)
        return Sample(img, _caption(caption), original, crop, {})
    except Exception:  # any undecodable image or caption: skip it, never crash
        return None


class HFDataset(MapSource):
    """A Hugging Face ``datasets`` dataset on disk: random rows, this process's share."""

    streaming = False

    def __init__(self, backbone: Backbone, source: str, options: DataOptions, ds=None):
        self.backbone, self.name, self.options = backbone, source, options
        self.skipped = 0
        self.root = data_root(source)
        self.rank, self.world = options.process()
        self.ds = ds if ds is not None else _checked(_load_dataset(source, options), source, options)
        self.rows = list(range(self.rank, len(self.ds), self.world))
        if not self.rows:
            raise DataSourceError(f"{source}: no rows for process {self.rank} of {self.world}")

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, i: int) -> Sample | None:
        row = self.ds[self.rows[i]]
        return _sample(row.get(self.options.image_column), row.get(self.options.caption_column),
                       self.backbone.resolution, self.root)

    def to_batch(self, raw: dict) -> Batch:
        return encode_collated(self.backbone, raw)

    def __iter__(self):
        """This process's rows once, in order (the cache pre-pass)."""
        for i in range(len(self)):
            if (s := self.item(i)) is not None:
                yield s
            else:
                self.skipped += 1


class HFStream(StreamSource):
    """A streamed ``datasets`` dataset: its shards (files) split evenly over processes and
    loader workers, shuffled through a buffer of encoded rows (training/stream.py)."""

    streaming = True

    def __init__(self, backbone: Backbone, source: str, options: DataOptions, ds=None):
        self.backbone, self.name, self.options = backbone, source, options
        self.skipped = 0
        self.root = data_root(source)
        self.ds = ds if ds is not None else _checked(_load_dataset(source, options), source, options)
        self.num_shards = self.ds.num_shards

    def read_shard(self, shard: int):
        """Encoded (image cell, caption cell) rows of one shard, read in this process."""
        part = self.ds.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        img_col, cap_col = self.options.image_column, self.options.caption_column
        # .iter() rather than iter(): datasets would split the shard again over loader workers
        for rows in part.iter(batch_size=64):
            yield from zip(rows[img_col], rows[cap_col])

    def decode(self, record) -> Sample | None:
        return _sample(record[0], record[1], self.backbone.resolution, self.root)

    def to_batch(self, raw: dict) -> Batch:
        return encode_collated(self.backbone, raw)

    def __iter__(self):
        """This process's share once, in order (the cache pre-pass)."""
        rank, world = self.options.process()
        yield from _share_once(self, share_of(self.num_shards, rank, world))


def _share_once(source, entries):
    for record in records_of(entries, source.read_shard, list(range(len(entries)))):
        if (s := source.decode(record)) is not None:
            yield s
        else:
            source.skipped += 1


def _checked(ds, source: str, options: DataOptions):
    """``ds`` with its columns checked and images left encoded (decoded per sample)."""
    columns = list(ds.features) if ds.features is not None else None
    for col in (options.image_column, options.caption_column):
        if columns is not None and col not in columns:
            raise DataSourceError(f"{source}: no column {col!r} (columns: {', '.join(columns)}); "
                                  "set data_image_column / data_caption_column")
    from datasets import Image as ImageFeature

    if columns is not None and isinstance(ds.features[options.image_column], ImageFeature):
        # decode ourselves, so a broken image is one skipped sample, not an exception
        ds = ds.cast_column(options.image_column, ImageFeature(decode=False))
    return ds


def _load_dataset(source: str, options: DataOptions):
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if options.split not in ds:
                    raise DataSourceError(f"{source}: no split {options.split!r} "
                                          f"(splits: {', '.join(ds)}); set data_split")
                ds = ds[options.split]
            return ds.to_iterable_dataset() if options.streaming else ds
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".arrow"):
            files = sorted(glob.glob(str(path)))
            if not files:
                raise DataSourceError(f"no {suffix} file matches {source}")
            return datasets.load_dataset(suffix[1:], data_files=files, split="train",
                                         streaming=options.streaming)
        if source.startswith("hf:"):
            return datasets.load_dataset(source[3:], split=options.split, streaming=options.streaming)
    except DataSourceError:
        raise
    except Exception as err:  # datasets' errors are long; say which source and why in one line
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataSourceError(f"cannot read dataset {source!r}: {type(err).__name__}: {msg}") from None
    raise DataSourceError(
        f"data {source!r} is not 'digits', a folder with metadata.jsonl, a cache-data folder "
        "(cache.json), a datasets save_to_disk folder, a .parquet / .arrow file or glob, "
        "hf:owner/name, or webdataset .tar shards")


# ------------------------------------------------------------------ webdataset


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from a glob, a ``{000..099}`` range, a folder of .tar files or one file."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    names = [pattern]
    while any(re.search(r"\{(\d+)\.\.(\d+)\}", n) for n in names):
        out = []
        for n in names:
            m = re.search(r"\{(\d+)\.\.(\d+)\}", n)
            if not m:
                out.append(n)
                continue
            lo, hi, width = int(m[1]), int(m[2]), len(m[1])
            out += [n[:m.start()] + str(i).zfill(width) + n[m.end():] for i in range(lo, hi + 1)]
        names = out
    files = []
    for n in names:
        files += sorted(glob.glob(str(Path(n).expanduser()))) if any(c in n for c in "*?[") else [n]
    return [f for f in files if Path(f).is_file()]


def is_webdataset(source: str) -> bool:
    path = Path(source).expanduser()
    if path.is_dir():
        return any(path.glob("*.tar"))
    return source.endswith(".tar") or re.search(r"\.tar\b", source) is not None


class WebDataset(StreamSource):
    """Tar shards, split evenly over processes and loader workers, shuffled through a
    buffer of encoded samples (training/stream.py)."""

    def __init__(self, backbone: Backbone, source: str, options: DataOptions):
        self.backbone, self.name, self.options = backbone, source, options
        self.skipped = 0
        self.all_shards = expand_shards(source)
        if not self.all_shards:
            raise DataSourceError(f"no .tar shards match {source}")
        self.num_shards = len(self.all_shards)
        rank, world = options.process()
        self.shards = sorted({self.all_shards[s] for s, _, _ in share_of(self.num_shards, rank, world)})

    def _members(self, shard: str):
        """(key, {ext: bytes}) per sample of one shard; a damaged shard ends early (counted)."""
        current, parts = None, {}
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)
                    base = name[-1]
                    if "." not in base:
                        continue
                    key = (name[0] + "/" if len(name) > 1 else "") + base.split(".", 1)[0]
                    ext = base.split(".", 1)[1].lower()
                    if key != current and current is not None:
                        yield current, parts
                        parts = {}
                    current = key
                    cap = MAX_JSON_BYTES if ext == "json" else (
                        MAX_CAPTION_BYTES if ext == "txt" else MAX_IMAGE_BYTES)
                    if member.size > cap:  # the header's size: skipped without reading it
                        parts[ext] = OVERSIZED
                        continue
                    parts[ext] = tar.extractfile(member).read(cap + 1)
        except (tarfile.TarError, OSError, EOFError):
            self.skipped += 1  # the damaged rest of this shard
        if current is not None:
            yield current, parts

    def _caption_of(self, parts: dict):
        if any(parts.get(ext) is OVERSIZED for ext in ("txt", "json")):
            return None  # an oversized caption member: a bad sample
        if "txt" in parts:
            return parts["txt"].decode("utf-8").strip()
        if "json" in parts:
            meta = json.loads(parts["json"])
            for key in (self.options.caption_column, "caption", "text"):
                if isinstance(meta.get(key), str):
                    return meta[key]
        return None  # no caption: a bad sample

    def read_shard(self, shard: int):
        """Encoded (image bytes, caption) records of one shard (None for a missing part)."""
        col = self.options.image_column
        for _, parts in self._members(self.all_shards[shard]):
            exts = [col] if col in parts else [e for e in IMAGE_EXTS if e in parts]
            image = parts[exts[0]] if exts else None
            if image is OVERSIZED:
                image = None  # never read: a bad sample, counted
            try:
                caption = self._caption_of(parts)
            except (ValueError, UnicodeDecodeError):
                caption = None
            yield image, caption

    def decode(self, record) -> Sample | None:
        return _sample(record[0], record[1], self.backbone.resolution)

    def to_batch(self, raw: dict) -> Batch:
        return encode_collated(self.backbone, raw)

    def __iter__(self):
        """This process's share once, in order (the cache pre-pass)."""
        rank, world = self.options.process()
        yield from _share_once(self, share_of(self.num_shards, rank, world))


def open_source(backbone: Backbone, source: str, options: DataOptions):
    """A webdataset or ``datasets`` source for ``source``; one clear error otherwise."""
    path = Path(source).expanduser()
    if not source.startswith("hf:") and is_webdataset(source):
        return WebDataset(backbone, source, options)
    if path.is_dir() and not any((path / f).is_file() for f in
                                 ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataSourceError(
            f"{source} is a folder without metadata.jsonl, cache.json, a saved dataset "
            "(dataset_info.json / dataset_dict.json) or .tar shards")
    ds = _checked(_load_dataset(source, options), source, options)
    if hasattr(ds, "__len__"):
        return HFDataset(backbone, source, options, ds)
    return HFStream(backbone, source, options, ds)
