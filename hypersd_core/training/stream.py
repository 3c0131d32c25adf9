"""Streamed sources (webdataset shards, a streamed ``datasets`` dataset) read at GPU speed.

Three rules, each one tested:

- **Even sharding.** ``split_shards`` gives each of ``parts`` readers ``n // parts`` whole
  shards, and splits the ``n % parts`` leftover shards by record (reader ``p`` keeps records
  ``i % parts == p`` of those). No reader reads the whole stream unless there are fewer
  shards than readers, and every reader gets the same share. It composes: a process's share
  is split again over its loader workers.
- **Bounded shuffle memory.** ``ShuffleBuffer`` holds *encoded* records (image bytes and
  caption), capped by count and by bytes; a record is decoded only when it leaves the
  buffer, so decoded pixels in flight are one batch per worker (times the prefetch depth).
- **Resume at the position.** A reader's output is a pure function of (seed, rank, reader,
  epoch). Every batch takes exactly ``batch_size`` records out of the buffer (an unreadable
  one is counted in ``skipped`` and replaced by a good sample of the same batch), so after
  ``n`` batches the position is known without any state from other processes; replaying it
  reads the encoded records without decoding them. The position this process actually
  reached (epoch, records into the epoch) is also kept, for a direct jump.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch

Entry = tuple[int, int, int]  # (shard, keep_mod, keep_rem): records i with i % mod == rem


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (distinct for every tuple, unlike linear mixes)."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def split_shards(entries: list[Entry], parts: int, part: int) -> list[Entry]:
    """Reader ``part`` of ``parts``'s share of ``entries`` (see the module docstring)."""
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, {parts}), got {part}")
    whole = len(entries) - len(entries) % parts
    mine = list(entries[part:whole:parts])
    for shard, mod, rem in entries[whole:]:
        mine.append((shard, mod * parts, rem + mod * part))
    return mine


def share_of(n_shards: int, rank: int, world: int, worker: int = 0, workers: int = 1) -> list[Entry]:
    """The entries one loader worker of one process reads: split over processes, then workers."""
    return split_shards(split_shards([(s, 1, 0) for s in range(n_shards)], world, rank),
                        workers, worker)


class ShuffleBuffer:
    """Random order through a buffer of encoded records, capped by count and by bytes."""

    def __init__(self, size: int, max_bytes: int, generator: torch.Generator):
        self.size, self.max_bytes, self.generator = max(1, size), max(1, max_bytes), generator
        self.items: list = []
        self.nbytes = 0
        self.peak_bytes = 0

    def full(self) -> bool:
        return len(self.items) >= self.size or self.nbytes >= self.max_bytes

    def add(self, item, nbytes: int) -> None:
        self.items.append((item, nbytes))
        self.nbytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def pop(self):
        i = int(torch.randint(0, len(self.items), (1,), generator=self.generator))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        item, nbytes = self.items.pop()
        self.nbytes -= nbytes
        return item


def record_bytes(record) -> int:
    """Encoded size of a (image cell, caption cell) record, for the buffer's byte cap."""
    image = record[0]
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path") or b""
    size = len(image) if isinstance(image, (bytes, bytearray, str)) else 1 << 20
    return size + len(str(record[1] or ""))


def records_of(entries: list[Entry], read_shard: Callable[[int], Iterator], order: list[int]):
    """Encoded records of ``entries`` in shard ``order``, each entry's kept records only."""
    for j in order:
        shard, mod, rem = entries[j]
        for i, record in enumerate(read_shard(shard)):
            if i % mod == rem:
                yield record


def reader_stream(entries: list[Entry], read_shard: Callable[[int], Iterator], seed: int,
                  buffer_size: int, buffer_bytes: int, start_epoch: int = 0,
                  buffers: list | None = None) -> Iterator[tuple[int, int, object]]:
    """(epoch, records out of the buffer so far in this epoch, record): endless, by epoch.

    The shard order and the buffer's draws of epoch ``e`` come from ``mix_seed(seed, e)``,
    so the stream replays exactly from any epoch.
    """
    epoch = start_epoch
    while True:
        gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(len(entries), generator=gen).tolist()
        buffer = ShuffleBuffer(buffer_size, buffer_bytes, gen)
        if buffers is not None:
            buffers.append(buffer)
        out = 0
        for record in records_of(entries, read_shard, order):
            buffer.add(record, record_bytes(record))
            if buffer.full():
                out += 1
                yield epoch, out, buffer.pop()
        while buffer.items:
            out += 1
            yield epoch, out, buffer.pop()
        if out == 0:
            raise ValueError("no records in this reader's shards")
        epoch += 1


def batches(entries: list[Entry], read_shard: Callable[[int], Iterator],
            decode: Callable[[object], object | None], batch_size: int, seed: int,
            buffer_size: int, buffer_bytes: int, skip: int = 0, start_epoch: int = 0,
            start_pos: int = 0, max_bad: int = 1000, buffers: list | None = None):
    """Endless lists of ``batch_size`` decoded samples, plus (epoch, position, skipped).

    ``skip`` records are replayed without decoding from the start of ``start_epoch``
    (``start_pos`` of them from that epoch's start when jumping to a known position).
    Each batch takes exactly ``batch_size`` records; an unreadable one is replaced by a
    good sample of the same batch (so the position after n batches is n * batch_size).
    """
    stream = reader_stream(entries, read_shard, seed, buffer_size, buffer_bytes, start_epoch,
                           buffers)
    to_skip = skip + start_pos
    for _ in range(to_skip):
        next(stream)
    bad_run = 0
    while True:
        good, bad = [], 0
        epoch = pos = 0
        while len(good) + bad < batch_size or not good:
            epoch, pos, record = next(stream)
            sample = decode(record)
            if sample is None:
                bad += 1
                bad_run += 1
                if bad_run >= max_bad:
                    raise ValueError(f"{bad_run} unreadable samples in a row; check the image / "
                                     "caption column names (data_image_column, data_caption_column)")
                continue
            bad_run = 0
            good.append(sample)
        n_good = len(good)
        for i in range(batch_size - n_good):  # unreadable records: repeat good ones of this batch
            good.append(good[i % n_good])
        yield good, (epoch, pos, bad)
