"""ShardSampler: coverage, disjointness, equal step counts, determinism, resume; TV statistic."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from scalex_scale.data.samplers import ShardSampler, assemble_batches, batch_composition_tv

# (n_rows, shard_size, world_size, batch_size, buffer_shards): divisible and awkward sizes.
CASES = [
    (1000, 100, 1, 50, 2),
    (1000, 64, 3, 16, 2),
    (10_007, 333, 4, 50, 5),
    (129, 64, 2, 64, 1),
    (4096, 4096, 1, 64, 8),
    (5000, 7, 8, 32, 3),
    (777, 1000, 3, 10, 4),
]


def _epoch_rows(sampler: ShardSampler, epoch: int) -> list[list[np.ndarray]]:
    return [list(sampler.for_rank(r).batch_rows(epoch)) for r in range(sampler.world_size)]


@pytest.mark.parametrize(("n_rows", "shard", "world", "batch", "k"), CASES)
def test_every_row_once_per_epoch_without_drop_last(n_rows, shard, world, batch, k):
    sampler = ShardSampler(n_rows, batch_size=batch, shard_size=shard, buffer_shards=k, world_size=world,
                           drop_last=False, seed=7)
    for epoch in (0, 3):
        per_rank = _epoch_rows(sampler, epoch)
        rows = np.concatenate([np.concatenate(b) for b in per_rank])
        np.testing.assert_array_equal(np.sort(rows), np.arange(n_rows))
        assert {len(b) for b in per_rank} == {sampler.batches_per_epoch}
        for batches in per_rank:
            sizes = [len(b) for b in batches]
            assert min(sizes) >= 1 and max(sizes) <= batch
            assert all(s == batch for s in sizes[:-2])  # only the last one or two may be short


@pytest.mark.parametrize(("n_rows", "shard", "world", "batch", "k"), CASES)
def test_drop_last_full_batches_disjoint_equal_counts(n_rows, shard, world, batch, k):
    sampler = ShardSampler(n_rows, batch_size=batch, shard_size=shard, buffer_shards=k, world_size=world, seed=1)
    per_rank = _epoch_rows(sampler, 2)
    n = sampler.batches_per_epoch
    assert n == min(int(s) for s in sampler.rank_sizes()) // batch
    for batches in per_rank:
        assert len(batches) == n
        assert all(len(b) == batch for b in batches)
    rows = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(np.unique(rows)) == len(rows)  # disjoint within and across ranks
    assert n_rows - len(rows) < world * (batch + 1)  # documented bound on dropped rows
    # Every rank's rows come from its own stretch of the permuted shards.
    for r, batches in enumerate(per_rank):
        starts, stops = sampler.rank_pieces(2, r)
        own = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
        assert np.isin(np.concatenate(batches), own).all()


def test_rank_sizes_balanced_and_requests_are_few_contiguous_reads():
    sampler = ShardSampler(10_007, batch_size=50, shard_size=333, buffer_shards=5, world_size=4)
    sizes = sampler.rank_sizes()
    assert sizes.sum() == 10_007 and sizes.max() - sizes.min() <= 1
    carry = 0
    for request in sampler.epoch_plan(0):
        assert len(request.slices) <= 5
        assert all(0 <= a < b <= 10_007 for a, b in request.slices)
        assert request.n_read <= 5 * 333
        assert request.carry_in == carry
        carry = request.carry_out
    assert carry == 0


def test_deterministic_and_varies_with_epoch_and_seed():
    def rows(seed: int, epoch: int) -> np.ndarray:
        s = ShardSampler(5000, batch_size=32, shard_size=100, buffer_shards=4, seed=seed)
        return np.concatenate(list(s.batch_rows(epoch)))

    np.testing.assert_array_equal(rows(3, 1), rows(3, 1))
    assert not np.array_equal(rows(3, 1), rows(3, 2))
    assert not np.array_equal(rows(3, 1), rows(4, 1))
    s = ShardSampler(5000, shard_size=100, seed=3)
    assert not np.array_equal(s.shard_order(0), s.shard_order(1))


@pytest.mark.parametrize("world", [1, 3])
def test_resume_gives_exact_tail(world):
    sampler = ShardSampler(3000, batch_size=48, shard_size=70, buffer_shards=3, world_size=world,
                           rank=world - 1, seed=11)
    full = list(sampler.batch_rows(4))
    n = sampler.batches_per_epoch
    assert len(full) == n
    # Include starts in the middle of a buffer, at straddling batches, the last batch and the end.
    for k in sorted({0, 1, 2, 5, 13, n // 2, n - 1, n}):
        tail = list(sampler.batch_rows(4, start_batch=k))
        assert len(tail) == n - k
        for a, b in zip(tail, full[k:]):
            np.testing.assert_array_equal(a, b)
        first = next(iter(sampler.epoch_plan(4, start_batch=k)), None)
        assert (first is None) == (k == n)
        if first is not None:
            assert first.first_batch == k and first.carry_in == 0
    with pytest.raises(ValueError):
        sampler.epoch_plan(4, start_batch=n + 1)


def test_batches_straddle_buffers_without_losing_rows():
    # Buffers of 7 rows, batches of 5: almost every batch straddles two buffers.
    sampler = ShardSampler(70, batch_size=5, shard_size=7, buffer_shards=1, drop_last=False, seed=0)
    rows = np.concatenate(list(sampler.batch_rows(0)))
    np.testing.assert_array_equal(np.sort(rows), np.arange(70))
    # Batches larger than a buffer: carries accumulate over several requests.
    sampler = ShardSampler(100, batch_size=30, shard_size=4, buffer_shards=2, drop_last=False, seed=0)
    batches = list(sampler.batch_rows(0))
    assert [len(b) for b in batches] == [30, 30, 30, 10]
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(100))


def test_invalid_configurations():
    with pytest.raises(ValueError, match="no full batch"):
        ShardSampler(100, batch_size=64, world_size=2)
    with pytest.raises(ValueError, match="drop_last=False"):
        ShardSampler(5, batch_size=1, world_size=2, drop_last=False)
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(100, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        ShardSampler(100, batch_size=4, seed=-1)
    with pytest.raises(ValueError, match="shard_size"):
        ShardSampler(100, batch_size=4, shard_size=0)


def test_assemble_batches_rejects_open_tail():
    with pytest.raises(RuntimeError, match="inside a mini-batch"):
        list(assemble_batches([(np.arange(3), True), (np.arange(2), False)], np.concatenate))


def test_samplers_do_not_import_torch():
    code = "import sys, scalex_scale.data.samplers, scalex_scale.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- batch composition (TV)
def _domains(n_rows: int, weights: list[float], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(len(weights), size=n_rows, p=np.asarray(weights) / sum(weights)).astype(np.int32)


def test_tv_prepermuted_matches_iid():
    """A pre-permuted store gives i.i.d.-like batches.

    With rows in uniformly random order, any data-independent arrangement of disjoint batches makes
    each batch a uniform sample without replacement, so E[TV] equals the i.i.d. value up to the
    finite-population factor sqrt(1 - (B-1)/(N-1)) > 0.9997 here. Over n = 1,500 batches the mean TVs
    have standard errors ~0.7% of the mean each (sample SD / sqrt(n); the loader's are conservative
    since batches of one epoch are negatively correlated). We require the difference within 4
    combined SEs (a false-alarm rate < 1e-4 for a correct sampler; seeds are fixed anyway) and the
    ratio below 1.1, while the sorted-store case below is off by far more than that.
    """
    n_rows, batch = 100_000, 64
    domains = _domains(n_rows, [5, 3, 1, 1, 0.5, 0.2], seed=0)  # unbalanced, like real atlases
    sampler = ShardSampler(n_rows, batch_size=batch, seed=0)
    stats = batch_composition_tv(sampler, domains, n_batches=1500, seed=1)
    se = np.hypot(stats["loader_tv_se"], stats["iid_tv_se"])
    assert abs(stats["difference"]) < 4 * se
    assert stats["ratio"] < 1.1
    assert stats["n_batches"] == 1500 and stats["mean_batch_size"] == batch


def test_tv_detects_domain_sorted_store():
    """Rows sorted by domain: the buffer shuffle alone mixes only the shards in a buffer.

    Small shards and many per buffer help; one shard per buffer gives nearly pure batches.
    """
    n_rows, batch = 100_000, 64
    domains = np.sort(_domains(n_rows, [1] * 8, seed=0))
    tv = {}
    for shard, k in [(8192, 1), (8192, 8), (1024, 64)]:
        sampler = ShardSampler(n_rows, batch_size=batch, shard_size=shard, buffer_shards=k, seed=0)
        tv[(shard, k)] = batch_composition_tv(sampler, domains, n_batches=1500, seed=1)
    assert tv[(8192, 1)]["ratio"] > 4  # nearly pure single-domain batches
    assert tv[(8192, 1)]["ratio"] > tv[(8192, 8)]["ratio"] > tv[(1024, 64)]["ratio"] > 1.05


def test_tv_accepts_iterables_and_loader_like():
    domains = np.array([0, 0, 1, 1])
    stats = batch_composition_tv([np.array([0, 1]), np.array([2, 3])], domains, seed=0)
    assert stats["loader_tv"] == pytest.approx(0.5)

    class LoaderLike:
        sampler = ShardSampler(4, batch_size=2, shard_size=1, buffer_shards=4, seed=0)

    assert batch_composition_tv(LoaderLike(), domains)["n_batches"] == 2
