"""Training batches at GPU speed: ``DataLoader`` workers read and decode, the main process
encodes (VAE, text encoders) on the device.

Every source is one of two kinds:

- **map** (digits, image folder, a ``datasets`` dataset on disk, a ``cache-data`` cache):
  ``len(source)``, ``source.item(i) -> Sample | None``. Batch ``d`` of a process draws its
  indices from ``mix_seed(seed, d, rank)``, so a resumed run draws the same batches.
- **stream** (webdataset shards, a streamed ``datasets`` dataset): ``source.num_shards``,
  ``source.read_shard(i)`` (encoded records), ``source.decode(record) -> Sample | None``;
  sharded, shuffled and resumed as training/stream.py describes.

Both give ``source.to_batch(collated) -> Batch``. ``Loader`` wraps either in a
``torch.utils.data.DataLoader`` (``data_workers`` processes, ``data_prefetch`` batches
each, pinned memory on CUDA) and keeps the position (``state_dict``, saved in every
checkpoint). ``data_workers: -1`` (auto) uses workers where there is decoding to do and a
GPU to keep busy; in-memory sources (digits, a cache) and the CPU read inline.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from hypersd_core.training.batch import Batch, DataOptions, Sample
from hypersd_core.training.stream import batches, mix_seed, share_of

MAX_TRIES = 1000  # unreadable items in a row before a map source gives up


def collate(samples: list[Sample]) -> dict:
    """Samples -> one dict of stacked tensors and lists (what workers send back)."""
    extras = {k: torch.stack([s.extras[k] for s in samples]) for k in samples[0].extras}
    images = None if samples[0].image is None else torch.stack([s.image for s in samples])
    return {"images": images, "captions": [s.caption for s in samples],
            "originals": [tuple(s.original) for s in samples],
            "crops": [tuple(s.crop) for s in samples], "extras": extras, "skipped": 0}


class MapSource:
    """Base of random-access sources: ``item`` and ``to_batch`` come from the subclass."""

    skipped = 0

    def item(self, i: int) -> Sample | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def good_item(self, i: int) -> tuple[Sample, int]:
        """Item ``i``, or the next readable one: (sample, unreadable items passed over)."""
        n, buckets = len(self), getattr(self, "bucket_of", None)
        passed = 0
        for k in range(n):
            j = (i + k) % n
            if buckets is not None and buckets[j] != buckets[i]:
                continue  # a batch stays in its aspect-ratio bucket
            sample = self.item(j)
            if sample is not None:
                return sample, passed
            passed += 1
            if passed >= MAX_TRIES:
                break
        raise ValueError(f"{getattr(self, 'name', 'data')}: no readable item in {min(MAX_TRIES, n)} "
                         f"tries from row {i}")

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """One batch of random items, read in this process (tests, benches, the app)."""
        idx = draw(len(self), batch_size, generator, getattr(self, "bucket_of", None))
        got = [self.good_item(i) for i in idx]
        self.skipped += sum(k for _, k in got)
        return self.to_batch(collate([s for s, _ in got]))


class StreamSource:
    """Base of streamed sources: ``num_shards``, ``read_shard``, ``decode``, ``to_batch``."""

    skipped = 0
    options: DataOptions

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """The next batch of this process's stream, read inline (tests, benches)."""
        if getattr(self, "_inline", None) is None:
            self._inline = Loader(self, batch_size, seed=0, options=self.options, workers=0)
        self._inline.batch_size = batch_size
        batch = self._inline.next()
        self.skipped = self._inline.skipped
        return batch


class _MapView(Dataset):
    def __init__(self, source: MapSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.source.good_item(i)


def _collate_items(items) -> dict:
    out = collate([s for s, _ in items])
    out["skipped"] = sum(k for _, k in items)
    return out


def draw(n: int, batch_size: int, generator: torch.Generator, buckets: list | None = None) -> list[int]:
    """``batch_size`` random indices of ``n`` (with replacement); with ``buckets`` (one per
    index) all from the bucket of one random index, so a batch shares its image size."""
    if buckets is None:
        return torch.randint(0, n, (batch_size,), generator=generator).tolist()
    bucket = buckets[int(torch.randint(0, n, (1,), generator=generator))]
    pool = [i for i, b in enumerate(buckets) if b == bucket]
    return [pool[i] for i in torch.randint(0, len(pool), (batch_size,), generator=generator).tolist()]


class _Draws(Sampler):
    """Endless index lists: batch ``d`` from its own generator (with replacement)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, start: int,
                 buckets: list | None = None):
        self.n, self.batch_size, self.seed, self.rank, self.start = n, batch_size, seed, rank, start
        self.buckets = buckets

    def __iter__(self):
        for d in itertools.count(self.start):
            gen = torch.Generator().manual_seed(mix_seed(self.seed, d, self.rank))
            yield draw(self.n, self.batch_size, gen, self.buckets)


class _StreamView(IterableDataset):
    """One reader per loader worker; reader ``k`` makes this process's batches k, k+W, ..."""

    def __init__(self, source: StreamSource, batch_size: int, seed: int, workers: int,
                 draws: int, positions: dict):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.workers, self.draws, self.positions = workers, draws, positions

    def __iter__(self):
        info = get_worker_info()
        w = self.workers
        reader = ((info.id if info else 0) + self.draws) % w  # batch k always comes from k % W
        rank, world = self.source.options.process()
        entries = share_of(self.source.num_shards, rank, world, reader, w)
        opts = self.source.options
        start = {"skip": 0, "start_epoch": 0, "start_pos": 0}
        if reader in self.positions:  # this process's own position: jump to it
            start["start_epoch"], start["start_pos"] = self.positions[reader]
        else:  # replay the batches this reader made, without decoding them
            start["skip"] = max(0, (self.draws - reader + w - 1) // w) * self.batch_size
        for good, (epoch, pos, bad) in batches(
                entries, self.source.read_shard, self.source.decode, self.batch_size,
                mix_seed(self.seed, rank, reader), max(1, opts.shuffle_buffer // w),
                int(opts.shuffle_buffer_mb * 2**20) // w, **start):
            out = collate(good)
            out.update(skipped=bad, reader=reader, epoch=epoch, pos=pos)
            yield out


def resolve_workers(options: DataOptions, source, device_type: str) -> int:
    """``data_workers``, with -1 (auto): workers for decoding sources on a GPU, else none."""
    if options.workers >= 0:
        return options.workers
    if device_type != "cuda" or getattr(source, "in_memory", False):
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (os.cpu_count() or 2) // local - 1))


class Loader:
    """Batches of a source through a DataLoader, with a position that checkpoints.

    Args:
        source: a map or stream source (``make_data``).
        batch_size: samples per batch.
        seed: the run's seed (batch ``d`` of process ``rank`` is a function of the three).
        options: data options (workers, prefetch, buffer, rank / world size).
        workers: overrides ``options.workers`` (0 reads inline).
    """

    def __init__(self, source, batch_size: int, seed: int, options: DataOptions | None = None,
                 workers: int | None = None, device_type: str = "cpu"):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.options = options or getattr(source, "options", None) or DataOptions()
        self.rank, self.world = self.options.process()
        self.workers = resolve_workers(self.options, source, device_type) if workers is None else workers
        self.pin = device_type == "cuda"
        self.streaming = hasattr(source, "read_shard")
        self.draws, self.positions, self.skipped = 0, {}, 0
        self._it = None

    def _iterator(self):
        kwargs = {"num_workers": self.workers, "pin_memory": self.pin}
        if self.workers:
            kwargs.update(prefetch_factor=max(1, self.options.prefetch), persistent_workers=False)
        if self.streaming:
            view = _StreamView(self.source, self.batch_size, self.seed, max(1, self.workers),
                               self.draws, dict(self.positions))
            return iter(DataLoader(view, batch_size=None, **kwargs))
        sampler = _Draws(len(self.source), self.batch_size, self.seed, self.rank, self.draws,
                         getattr(self.source, "bucket_of", None))
        return iter(DataLoader(_MapView(self.source), batch_sampler=sampler,
                               collate_fn=_collate_items, **kwargs))

    def next(self) -> Batch:
        """The next batch (this process's share), encoded on the model's device."""
        if self._it is None:
            self._it = self._iterator()
        raw = next(self._it)
        self.draws += 1
        self.skipped += int(raw["skipped"])
        if self.streaming:
            self.positions[int(raw["reader"])] = (int(raw["epoch"]), int(raw["pos"]))
        return self.source.to_batch(raw)

    def state_dict(self) -> dict:
        """The position: batches drawn (the same in every process) and this process's readers."""
        return {"draws": self.draws, "skipped": self.skipped, "rank": self.rank,
                "workers": self.workers, "batch_size": self.batch_size,
                "positions": [[k, e, p] for k, (e, p) in sorted(self.positions.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; reader positions only apply to the process that saved them."""
        self.close()
        self.draws, self.skipped = int(state["draws"]), int(state.get("skipped", 0))
        same = (state.get("rank") == self.rank and state.get("workers") == self.workers
                and state.get("batch_size") == self.batch_size)
        self.positions = {int(k): (int(e), int(p)) for k, e, p in state.get("positions", [])} if same else {}

    def close(self) -> None:
        """Stop the workers (a new iterator starts at the current position)."""
        self._it = None
