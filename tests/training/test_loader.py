"""The training loader: DataLoader workers, even sharding over processes, a shuffle buffer
of encoded bytes, and streamed sources that resume at their position."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from test_data_sources import save_hf_folder, write_shards

from hypersd_core.models.backbone import load_backbone
from hypersd_core.training.data import DataOptions, make_data


@pytest.fixture(scope="module")
def digits_backbone():
    return load_backbone("digits")


def _batches(loader, n):
    return [loader.next() for _ in range(n)]


def _same(a, b):
    assert a.prompts == b.prompts
    torch.testing.assert_close(a.latents, b.latents)


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_resumes_at_its_position(digits_backbone, tmp_path, workers):
    from hypersd_core.training.loader import Loader

    pattern = write_shards(tmp_path / "wds", 3, 6)
    opts = DataOptions(shuffle_buffer=5)
    source = make_data(digits_backbone, pattern, opts)
    straight = Loader(source, 4, seed=3, options=opts, workers=workers)
    first = _batches(straight, 9)  # 36 samples: the stream wraps into a second epoch
    # a run interrupted after 6 batches resumes from its checkpointed state
    stopped = Loader(source, 4, seed=3, options=opts, workers=workers)
    _batches(stopped, 6)
    state = stopped.state_dict()
    resumed = Loader(make_data(digits_backbone, pattern, opts), 4, seed=3, options=opts,
                     workers=workers)
    resumed.load_state_dict(state)
    for a, b in zip(first[6:], _batches(resumed, 3)):
        _same(a, b)
    # another process's state (no reader positions for this one): replayed from the count
    other = Loader(make_data(digits_backbone, pattern, opts), 4, seed=3, options=opts,
                   workers=workers)
    other.load_state_dict({**state, "rank": 7})
    assert not other.positions
    for a, b in zip(first[6:], _batches(other, 3)):
        _same(a, b)
    # a restart from scratch does not see the same batches: the position matters
    assert [b.prompts for b in first[6:]] != [b.prompts for b in first[:3]]


def test_map_source_resumes_and_workers_agree(digits_backbone):
    from hypersd_core.training.loader import Loader

    source = make_data(digits_backbone, "digits")
    inline = _batches(Loader(source, 8, seed=1, workers=0), 4)
    pooled = _batches(Loader(source, 8, seed=1, workers=2), 4)
    resumed = Loader(source, 8, seed=1, workers=0)
    resumed.load_state_dict({"draws": 2})
    for a, b in zip(inline, pooled):
        _same(a, b)
    for a, b in zip(inline[2:], _batches(resumed, 2)):
        _same(a, b)


def test_webdataset_shards_split_evenly_over_processes(digits_backbone, tmp_path):
    """3 shards over 2 processes: 1.5 shards each, disjoint (was 2 and 1)."""
    pattern = write_shards(tmp_path / "wds", 3, 4, bad=False)
    seen = [[s.caption + str(s.image.sum().item()) for s in
             make_data(digits_backbone, pattern, DataOptions(rank=r, world_size=2))]
            for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6
    assert set(seen[0]).isdisjoint(seen[1])
    # one shard over 2 processes works too (each keeps every other record)
    one = write_shards(tmp_path / "one", 1, 4, bad=False)
    counts = [len(list(make_data(digits_backbone, one, DataOptions(rank=r, world_size=2))))
              for r in (0, 1)]
    assert counts == [2, 2]


def test_streamed_parquet_splits_evenly_and_reads_only_its_files(digits_backbone, tmp_path):
    import datasets

    save_hf_folder(tmp_path / "ds", 12)
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    for i in range(3):
        ds.shard(3, i, contiguous=True).to_parquet(str(tmp_path / f"d-{i}.parquet"))
    opts = [DataOptions("img", "caption", streaming=True, rank=r, world_size=2) for r in (0, 1)]
    sources = [make_data(digits_backbone, str(tmp_path / "d-*.parquet"), o) for o in opts]
    seen = [[s.caption + str(s.image.sum().item()) for s in src] for src in sources]
    assert len(seen[0]) == len(seen[1]) == 6 and set(seen[0]).isdisjoint(seen[1])
    from hypersd_core.training.stream import share_of

    # rank 0 reads shard 0 whole and half of shard 2; it never opens shard 1
    assert share_of(3, 0, 2) == [(0, 1, 0), (2, 2, 0)] and share_of(3, 1, 2) == [(1, 1, 0), (2, 2, 1)]
    batch = sources[0].sample(4)
    assert batch.latents.shape[0] == 4


def test_shuffle_buffer_holds_encoded_bytes(digits_backbone, tmp_path, monkeypatch):
    """A 64-sample buffer at 512^2 once held ~200 MB of decoded fp32 pixels; now it holds
    the encoded PNGs, capped in bytes."""
    pattern = write_shards(tmp_path / "wds", 2, 40, bad=False)
    monkeypatch.setattr(type(digits_backbone), "resolution", property(lambda self: 512))
    proc = psutil.Process()
    warm = make_data(digits_backbone, pattern, DataOptions(shuffle_buffer=1))
    warm.sample(2, torch.Generator().manual_seed(0))  # the encoder's own memory at 512^2
    gc.collect()
    before = proc.memory_info().rss
    source = make_data(digits_backbone, pattern, DataOptions(shuffle_buffer=64))
    batch = source.sample(2, torch.Generator().manual_seed(0))
    gc.collect()
    grown_mb = (proc.memory_info().rss - before) / 2**20
    assert batch.images.shape[-1] == 512
    assert grown_mb < 48, f"the data source holds {grown_mb:.0f} MB after one batch"
    # the byte cap binds before the count does (it is passed by at most one record)
    from hypersd_core.training.stream import batches

    buffers = []
    stream = batches([(0, 1, 0), (1, 1, 0)], source.read_shard, source.decode, 2, seed=0,
                     buffer_size=64, buffer_bytes=4096, buffers=buffers)
    for _ in range(10):
        next(stream)
    assert buffers[0].peak_bytes <= 4096 + 4096 and len(buffers[0].items) < 64


@pytest.mark.slow
def test_cache_data_in_two_processes_equals_one(tmp_path):
    """Two encoder processes write the same rows as one (each its share, in parts)."""
    from hypersd_core.training.cache import CachedData
    from hypersd_core.training.cache_build import cache_data

    pattern = write_shards(tmp_path / "wds", 3, 4)
    one = cache_data("digits", pattern, tmp_path / "one", batch_size=4, dtype="fp32", progress=False)
    two = cache_data("digits", pattern, tmp_path / "two", batch_size=4, dtype="fp32", progress=False,
                     processes=2)
    assert one["num_samples"] == two["num_samples"] == 12 and two["processes"] == 2
    assert one["skipped"] == two["skipped"] > 0
    bb = load_backbone("digits")

    def rows(folder):
        data = CachedData(bb, folder)
        t, captions = data.rows_at(list(range(12)))
        return sorted(zip(captions, t["latents"].flatten(1).sum(1).tolist()))

    got, want = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [c for c, _ in got] == [c for c, _ in want]
    assert all(abs(a[1] - b[1]) < 1e-3 for a, b in zip(got, want))
