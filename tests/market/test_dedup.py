"""Duplicate detection within and across batches, in bounded memory."""

from __future__ import annotations

import pickle

import numpy as np

from tickcast.errors import TickStatus
from tickcast.market.dedup import TickDeduplicator
from tickcast.ticks import NS_PER_S, TickBatch

T0 = 1_700_000_000 * NS_PER_S
OK, DUP = TickStatus.OK, TickStatus.DUPLICATE


def _seq_batch(names: list[str], seqs: list[int] | np.ndarray, price: float = 100.0) -> TickBatch:
    n = len(names)
    return TickBatch.from_columns("BTC-USD", names, ts_event=T0 + np.arange(n), price=np.full(n, price), seq=seqs)


def test_duplicate_within_batch_keeps_first_arrival() -> None:
    batch = _seq_batch(["a", "a", "a", "b"], [5, 6, 5, 5])

    TickDeduplicator(100).update(batch)

    assert batch.status.tolist() == [OK, OK, DUP, OK]


def test_duplicates_across_batches_with_different_vocabularies() -> None:
    # Arrange: the second batch lists providers in another order; identity is by name.
    dedup = TickDeduplicator(100)
    first = _seq_batch(["a", "b"], [1, 1])
    second = TickBatch.from_columns("BTC-USD", ["b", "c", "a", "a"], ts_event=[T0] * 4,
                                    price=[1.0] * 4, seq=[1, 1, 2, 1])
    # Act
    dedup.update(first)
    dedup.update(second)
    # Assert: b#1 and a#1 seen before; c#1 and a#2 new.
    assert second.provider_names().tolist() == ["b", "c", "a", "a"]
    assert second.status.tolist() == [DUP, OK, OK, DUP]


def test_without_sequence_numbers_identity_is_event_time_and_price() -> None:
    dedup = TickDeduplicator(100)
    first = TickBatch.from_columns("BTC-USD", ["a", "a"], ts_event=[T0, T0 + 1], price=[10.0, 10.0])
    again = TickBatch.from_columns("BTC-USD", ["a", "a", "a"], ts_event=[T0, T0, T0 + 1],
                                   price=[10.0, 10.5, 10.0])

    dedup.update(first)
    dedup.update(again)

    assert again.status.tolist() == [DUP, OK, DUP]


def test_rejected_ticks_are_neither_marked_nor_remembered() -> None:
    dedup = TickDeduplicator(100)
    bad = _seq_batch(["a"], [9])
    bad.status[:] = TickStatus.NON_FINITE
    good = _seq_batch(["a"], [9])

    dedup.update(bad)
    dedup.update(good)

    assert bad.status.tolist() == [TickStatus.NON_FINITE]
    assert good.status.tolist() == [OK]


def test_memory_is_bounded_and_recent_keys_are_remembered() -> None:
    # Arrange
    window, per_batch, batches = 1000, 500, 40
    dedup = TickDeduplicator(window)
    # Act: 20,000 distinct ticks
    for i in range(batches):
        dedup.update(_seq_batch(["a"] * per_batch, np.arange(i * per_batch, (i + 1) * per_batch)))
        # Assert (bounded at every step)
        assert dedup.remembered <= 2 * window + per_batch
    recent = _seq_batch(["a"] * window, np.arange(batches * per_batch - window, batches * per_batch))
    ancient = _seq_batch(["a"] * 10, np.arange(10))
    dedup.update(recent)
    dedup.update(ancient)
    assert (recent.status == DUP).all()  # the last `window` ticks are always remembered
    assert (ancient.status == OK).all()  # long-forgotten keys: memory is bounded by design


def test_vectorized_large_batch_with_known_duplicates() -> None:
    rng = np.random.default_rng(11)
    seqs = rng.permutation(20_000)
    dup_rows = rng.choice(20_000, 300, replace=False)
    all_seqs = np.concatenate([seqs, seqs[dup_rows]])
    batch = _seq_batch(["p"] * len(all_seqs), all_seqs)

    TickDeduplicator(50_000).update(batch)

    assert int((batch.status == DUP).sum()) == 300
    assert (batch.status[20_000:] == DUP).all()


def test_pickle_round_trip_continues_identically() -> None:
    dedup = TickDeduplicator(64)
    for i in range(5):
        dedup.update(_seq_batch(["a"] * 30, np.arange(i * 30, i * 30 + 30)))
    restored = pickle.loads(pickle.dumps(dedup))
    probe = np.arange(100, 200)
    a, b = _seq_batch(["a"] * 100, probe), _seq_batch(["a"] * 100, probe)

    dedup.update(a)
    restored.update(b)

    assert np.array_equal(a.status, b.status)
    assert int((a.status == DUP).sum()) == 50  # seqs 100..149 were seen
    assert restored.remembered == dedup.remembered


def test_provider_index_outside_vocabulary_is_ignored() -> None:
    batch = _seq_batch(["a", "a"], [1, 1])
    batch.provider[1] = 5
    TickDeduplicator(10).update(batch)
    assert batch.status.tolist() == [OK, OK]  # left for validation to reject
