"""Reliability-weighted median: reference loop, limits, continuity, monotonicity, bars."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from tickcast.config import BarConfig, ConsensusConfig
from tickcast.market.bars import BarBuilder
from tickcast.market.consensus import aggregate_votes, pyth_aggregate


def _reference(votes: list[float], weights: list[float]) -> tuple[float, float]:
    """The weighted statistics written out with plain loops (the definition in the docstring)."""
    pairs = sorted((v, w) for v, w in zip(votes, weights) if not math.isnan(v) and w > 0)
    if not pairs:
        return math.nan, math.nan
    top = max(w for _, w in pairs)
    pairs = [(v, w / top) for v, w in pairs]
    total = sum(w for _, w in pairs)
    cum = []
    acc = 0.0
    for _, w in pairs:
        acc += w
        cum.append(acc)
    # Mean of the weighted quantile function over the central band [1/2 -+ 1/(2k)] of the mass.
    k = len(pairs)
    lo, hi = total / 2 - total / (2 * k), total / 2 + total / (2 * k)
    num = den = 0.0
    for (v, w), c in zip(pairs, cum):
        part = max(0.0, min(c, hi) - max(c - w, lo))
        num += v * part
        den += part
    med = num / den
    q25 = next(v for (v, _), c in zip(pairs, cum) if c > total / 4)
    q75 = [v for (v, w), c in zip(pairs, cum) if c - w < 3 * total / 4][-1]
    return med, max(med - q25, q75 - med)


def test_weighted_statistics_match_the_reference_loop() -> None:
    rng = np.random.default_rng(1)
    votes = 100 + rng.standard_normal((300, 12))
    weights = rng.uniform(0.05, 1.0, (300, 12))
    votes[rng.random((300, 12)) < 0.2] = np.nan
    weights[rng.random((300, 12)) < 0.1] = 0.0
    med, conf = aggregate_votes(votes, weights)
    for row in range(300):
        m, c = _reference(votes[row].tolist(), weights[row].tolist())
        if math.isnan(m):
            assert math.isnan(med[row])
            continue
        assert med[row] == pytest.approx(m, rel=0, abs=1e-12)
        assert conf[row] == pytest.approx(c, rel=0, abs=1e-12)


def test_equal_weights_give_the_plain_median_bit_for_bit() -> None:
    rng = np.random.default_rng(2)
    votes = 100 + rng.standard_normal((500, 9))
    votes[rng.random((500, 9)) < 0.3] = np.nan
    for w in (1.0, 0.37, 0.999):
        med_w, conf_w = aggregate_votes(votes, np.full(votes.shape, w))
        med, conf = aggregate_votes(votes)
        assert np.array_equal(med_w, med, equal_nan=True)
        assert np.array_equal(conf_w, conf, equal_nan=True)
    # The loop reference agrees with Pyth's order statistics for equal weights too.
    for row in range(50):
        m, c = _reference(votes[row].tolist(), [1.0] * 9)
        if not math.isnan(m):
            assert med[row] == pytest.approx(m, abs=1e-12) and conf[row] == pytest.approx(c, abs=1e-12)


def test_a_zero_weight_removes_the_vote() -> None:
    med, _ = aggregate_votes(np.array([[100.0, 101.0, 500.0]]), np.array([[1.0, 1.0, 0.0]]))
    assert med[0] == 100.5


def test_the_weighted_median_is_continuous_in_the_weights() -> None:
    # Two providers: the plain median is their midpoint; a provider slightly less reliable moves
    # it slightly towards the other, never all the way (a discrete weighted median would snap).
    prices = np.array([100.0, 101.0])
    base, _ = pyth_aggregate(prices, [0.0, 0.0])
    near, _ = pyth_aggregate(prices, [0.0, 0.0], weights=[1.0, 0.99])
    half, _ = pyth_aggregate(prices, [0.0, 0.0], weights=[1.0, 0.5])
    assert base == 100.5
    assert 100.48 < near < 100.5
    assert 100.0 <= half < near
    # Continuity: the weight path from equal to half gives a path of medians without jumps.
    path = [pyth_aggregate(prices, [0.0, 0.0], weights=[1.0, w])[0] for w in np.linspace(1.0, 0.5, 501)]
    assert path[0] == 100.5 and max(abs(np.diff(path))) < 0.01


def test_the_weighted_median_is_monotone_and_continuous_in_every_vote() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        votes = 100 + rng.standard_normal((1, 9))
        weights = rng.uniform(0.1, 1.0, (1, 9))
        j = rng.integers(9)
        path = np.repeat(votes, 301, axis=0)
        path[:, j] += np.linspace(-3.0, 3.0, 301)  # one vote swept across all the others
        med, _ = aggregate_votes(path, np.repeat(weights, 301, axis=0))
        assert (np.diff(med) >= -1e-12).all()
        assert np.abs(np.diff(med)).max() <= 0.02 + 1e-12  # never more than the vote's own step


def _two_provider_minutes(synth: SimpleNamespace, weighting: str, rel_b: float) -> float:
    """Close of one consensus bar: a at 100, b at 101 (b's ticks carry reliability rel_b)."""
    batch = synth.ticks(["a", "b", "a", "b", "a"], [1, 2, 30, 31, 65], [100.0, 101.0, 100.0, 101.0, 100.0])
    rel = np.array([1.0, rel_b, 1.0, rel_b, 1.0])
    builder = BarBuilder("BTC-USD", BarConfig(), ConsensusConfig(weighting=weighting))
    bars = builder.update(batch, rel).consensus
    return float(bars["close"].iloc[0])


def test_consensus_bars_weigh_providers_by_reliability(synth: SimpleNamespace) -> None:
    assert _two_provider_minutes(synth, "equal", 0.5) == 100.5
    assert _two_provider_minutes(synth, "reliability", 1.0) == 100.5
    weighted = _two_provider_minutes(synth, "reliability", 0.8)
    assert 100.0 < weighted < 100.5
    # Below min_reliability a provider is left out whatever the weighting.
    assert _two_provider_minutes(synth, "reliability", 0.1) == 100.0


def test_a_single_provider_bar_is_its_own_bar_whatever_its_reliability(synth: SimpleNamespace) -> None:
    batch = synth.ticks(["a"] * 4, [0, 20, 40, 61], [100.0, 103.0, 99.0, 101.0], size=[1.0] * 4)
    builder = BarBuilder("BTC-USD", BarConfig(), ConsensusConfig())
    bars = builder.update(batch, np.full(4, 0.4)).consensus
    assert bars[["open", "high", "low", "close"]].values.tolist() == [[100.0, 103.0, 99.0, 99.0]]
