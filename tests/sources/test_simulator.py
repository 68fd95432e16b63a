"""The market simulator: determinism, injections as labelled, realistic statistics, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from tickcast.config import BarConfig, ConsensusConfig, SimulatorConfig, load_settings
from tickcast.errors import TickStatus
from tickcast.sources.simulator import (
    EXPECTED_STATUS,
    KINDS,
    SECONDS_PER_YEAR,
    MarketSimulator,
    score_detection,
)
from tickcast.ticks import NS_PER_S, TickBatch

ASSETS = ("BTC-USD", "ETH-USD")


def run_all(sim: MarketSimulator, minutes: float, **kw: bool) -> list[TickBatch]:
    return list(sim.run(minutes, **kw))


def per_asset(batches: list[TickBatch], asset: str) -> TickBatch:
    return TickBatch.concat([b for b in batches if b.asset == asset])


def assert_batches_equal(a: list[TickBatch], b: list[TickBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.asset == y.asset and x.providers == y.providers
        for name, col in x.columns().items():
            np.testing.assert_array_equal(col, getattr(y, name), err_msg=name)


@pytest.fixture(scope="module")
def busy() -> tuple[MarketSimulator, list[TickBatch]]:
    """30 minutes with a high anomaly rate, so that every kind occurs many times."""
    cfg = SimulatorConfig(anomaly_rate=0.04, anomaly_mix={k: (0.3 if k == "frozen" else 1.0) for k in KINDS})
    sim = MarketSimulator(cfg, ASSETS, seed=11)
    return sim, run_all(sim, 30)


def test_same_seed_same_market_other_seed_differs() -> None:
    a_sim = MarketSimulator(SimulatorConfig(), ASSETS, seed=3)
    b_sim = MarketSimulator(SimulatorConfig(), ASSETS, seed=3)
    a, b = run_all(a_sim, 10), run_all(b_sim, 10)
    assert_batches_equal(a, b)
    for asset in ASSETS:
        np.testing.assert_array_equal(a_sim.labels(asset), b_sim.labels(asset))
    assert a_sim.injected == b_sim.injected
    c = run_all(MarketSimulator(SimulatorConfig(), ASSETS, seed=4), 10)
    assert not np.array_equal(per_asset(a, "BTC-USD").price[:50], per_asset(c, "BTC-USD").price[:50])


def test_labels_align_with_emitted_ticks_and_count_injections(busy) -> None:
    sim, batches = busy
    total = {k: 0 for k in KINDS}
    for asset in ASSETS:
        ticks = per_asset(batches, asset)
        labels = sim.labels(asset)
        assert len(labels) == len(ticks)
        keys = sim.tick_keys(asset)
        np.testing.assert_array_equal(keys["seq"].to_numpy(), ticks.seq)
        np.testing.assert_array_equal(keys["provider"].to_numpy(), ticks.provider_names())
        assert not keys.duplicated(["provider", "seq", "occurrence"]).any()
        for k in KINDS:
            total[k] += int((labels == k).sum())
    assert sim.injected == total
    assert all(total[k] >= 10 for k in KINDS), total


def test_delivery_order_and_batching(busy) -> None:
    sim, batches = busy
    assert {b.asset for b in batches} == set(ASSETS)
    for asset in ASSETS:
        ticks = per_asset(batches, asset)
        assert np.all(np.diff(ticks.ts_init) >= 0)  # receive-time order
        assert np.all(ticks.ts_init >= ticks.ts_event)
        # Each provider delivers its clean ticks in event order, seq counting up.
        lab = sim.labels(asset)
        for p in range(len(ticks.providers)):
            own = (ticks.provider == p) & (lab == "")
            assert np.all(np.diff(ticks.ts_event[own]) > 0)
            assert np.all(np.diff(ticks.seq[own]) > 0)
    # Batches per asset alternate over receive-time slices of batch_s (plus the final flush).
    btc = [b for b in batches if b.asset == "BTC-USD"]
    spans = [b.ts_init[-1] - b.ts_init[0] for b in btc[:-1]]
    assert max(spans) < sim.cfg.batch_s * NS_PER_S
    assert len(btc) >= 30 * 60 / sim.cfg.batch_s


def test_each_injection_is_what_its_label_says(busy) -> None:
    sim, batches = busy
    lateness = sim.bar_cfg.allowed_lateness_s * NS_PER_S
    frozen_after = sim.consensus.frozen_after_s * NS_PER_S
    for asset in ASSETS:
        t = per_asset(batches, asset)
        lab = sim.labels(asset)
        keys = sim.tick_keys(asset)
        clean = lab == ""
        assert np.all(t.status[lab != "null"] == TickStatus.OK)
        assert np.all(t.status[lab == "null"] == TickStatus.NULL)
        assert np.isnan(t.price[lab == "null"]).all() and np.isnan(t.price[lab == "nan"]).all()
        assert np.isinf(t.price[lab == "inf"]).all()
        assert (t.price[lab == "nonpositive"] <= 0).all()
        # Clean ticks trade at the touch of an uncrossed quote.
        assert np.all((t.price[clean] == t.bid[clean]) | (t.price[clean] == t.ask[clean]))
        assert np.all(t.bid[clean] < t.ask[clean]) and np.all(t.size[clean] > 0)
        ref = np.median(t.price[clean])
        ratio = t.price[lab == "jump"] / ref
        assert np.all((ratio > 4.5) | (ratio < 1 / 4.5))

        # Duplicates: an exact earlier-delivered original with the same key and fields.
        frame = pd.DataFrame({"provider": t.provider, "seq": t.seq, "occ": keys["occurrence"],
                              "ts_event": t.ts_event, "ts_init": t.ts_init, "price": t.price,
                              "size": t.size, "pos": np.arange(len(t))})
        dups = frame[lab == "duplicate"]
        orig = frame[frame["occ"] == 0].set_index(["provider", "seq"])
        matched = orig.loc[list(zip(dups["provider"], dups["seq"]))]
        assert (dups["occ"] == 1).all()
        for col in ("ts_event", "price", "size"):
            np.testing.assert_array_equal(matched[col].to_numpy(), dups[col].to_numpy())
        assert np.all(matched["pos"].to_numpy() < dups["pos"].to_numpy())

        # Out of order: a later tick of the same provider was delivered before; within lateness.
        for i in np.flatnonzero(lab == "out_of_order"):
            before = (t.provider[:i] == t.provider[i]) & (t.ts_event[:i] > t.ts_event[i])
            assert before.any()
            assert t.ts_init[i] - t.ts_event[i] <= sim.cfg.out_of_order_max_s * NS_PER_S
        # Late: older than the lateness plus one batch when it arrives.
        delay = t.ts_init[lab == "late"] - t.ts_event[lab == "late"]
        assert np.all(delay > lateness + sim.cfg.batch_s * NS_PER_S)

        # Frozen: the provider repeats the quote it had at least frozen_after_s earlier.
        order = np.lexsort((t.ts_event, t.provider))
        prev = {}
        for i in order:
            p = t.provider[i]
            if lab[i] in ("frozen", "stale"):
                anchor = prev[p]
                assert (t.price[i], t.bid[i], t.ask[i]) == (t.price[anchor], t.bid[anchor], t.ask[anchor])
                age = t.ts_event[i] - t.ts_event[anchor]
                assert (age >= frozen_after) == (lab[i] == "frozen")
            elif lab[i] == "":
                prev[p] = i
            elif lab[i] in ("out_of_order", "late") and p not in prev:
                prev[p] = i


def test_frozen_stretches_happen_while_the_market_moves(busy) -> None:
    sim, batches = busy
    t = per_asset(batches, "BTC-USD")
    lab = sim.labels("BTC-USD")
    frozen = np.flatnonzero(lab == "frozen")
    assert len(frozen) > 0
    p = t.provider[frozen[-1]]
    others = (t.provider != p) & (lab == "") & (t.ts_event <= t.ts_event[frozen[-1]]) & (
        t.ts_event >= t.ts_event[frozen[-1]] - int(sim.consensus.frozen_after_s * NS_PER_S))
    mids = (t.bid[others] + t.ask[others]) / 2
    assert mids.max() / mids.min() - 1 > 1e-4  # others moved by more than 1 bp meanwhile


def test_quote_statistics_match_the_provider_profiles() -> None:
    # A (nearly) constant mid isolates each provider's bias and noise around it.
    cfg = SimulatorConfig(annual_vol=1e-9, anomaly_rate=0.0, ticks_per_provider_per_s=5.0)
    sim = MarketSimulator(cfg, ("BTC-USD",), seed=5)
    t = per_asset(run_all(sim, 30), "BTC-USD")
    prof = sim.provider_profile("BTC-USD")
    dev_bp = (np.log((t.bid + t.ask) / 2) - np.log(cfg.start_prices["BTC-USD"])) * 1e4
    spread_bp = (t.ask - t.bid) / ((t.bid + t.ask) / 2) * 1e4
    latency_ms = (t.ts_init - t.ts_event) / 1e6
    for p, name in enumerate(t.providers):
        own = t.provider == p
        assert own.sum() > 8000
        assert dev_bp[own].mean() == pytest.approx(prof.loc[name, "bias_bp"], abs=0.05)
        assert dev_bp[own].std() == pytest.approx(prof.loc[name, "noise_bp"], rel=0.03)
        assert np.median(spread_bp[own]) == pytest.approx(prof.loc[name, "spread_bp"], rel=0.03)
        assert latency_ms[own].mean() == pytest.approx(prof.loc[name, "latency_ms"], rel=0.05)
    d = cfg.provider_dispersion
    assert prof["noise_bp"].between(cfg.provider_noise_bp * (1 - d), cfg.provider_noise_bp * (1 + d)).all()
    assert prof["spread_bp"].between(cfg.spread_bp * (1 - d), cfg.spread_bp * (1 + d)).all()
    notional = t.price * t.size
    assert np.median(notional) == pytest.approx(cfg.size_notional_median, rel=0.05)
    assert np.log(t.size).std() == pytest.approx(cfg.size_log_sigma, rel=0.03)
    # Tick rate per provider.
    assert len(t) / (30 * 60 * len(t.providers)) == pytest.approx(5.0, rel=0.03)


def test_mid_follows_gbm_with_the_configured_vol() -> None:
    cfg = SimulatorConfig(provider_noise_bp=0.0, provider_bias_bp=0.0, spread_bp=0.0,
                          anomaly_rate=0.0, annual_vol=0.8)
    sim = MarketSimulator(cfg, ("ETH-USD",), seed=9)
    t = per_asset(run_all(sim, 60), "ETH-USD")
    order = np.argsort(t.ts_event, kind="stable")
    log_p = np.log(t.price[order])
    var_per_s = np.sum(np.diff(log_p) ** 2) / ((t.ts_event[order][-1] - t.ts_event[order][0]) / NS_PER_S)
    assert np.sqrt(var_per_s * SECONDS_PER_YEAR) == pytest.approx(0.8, rel=0.03)


def test_default_market_is_consistent_across_providers() -> None:
    sim = MarketSimulator(SimulatorConfig(), ("BTC-USD",), seed=2)
    t = per_asset(run_all(sim, 10), "BTC-USD")
    clean = sim.labels("BTC-USD") == ""
    frame = pd.DataFrame({"sec": t.ts_event[clean] // NS_PER_S, "p": t.provider[clean],
                          "mid": (t.bid[clean] + t.ask[clean]) / 2})
    med = frame.groupby("sec")["mid"].transform("median")
    dev = np.abs(frame["mid"] / med - 1) * 1e4
    assert 0.3 < dev.median() < 3.0  # like real venues: about a basis point apart
    assert dev.quantile(0.99) < 15.0


def test_pickle_round_trip_continues_identically() -> None:
    sim = MarketSimulator(SimulatorConfig(anomaly_rate=0.05), ASSETS, seed=21)
    run_all(sim, 4, flush=False)
    clone = pickle.loads(pickle.dumps(sim))
    assert clone.clock_ns == sim.clock_ns
    assert_batches_equal(run_all(sim, 3), run_all(clone, 3))
    for asset in ASSETS:
        np.testing.assert_array_equal(sim.labels(asset), clone.labels(asset))
    assert sim.injected == clone.injected


def test_runs_continue_seamlessly_without_flush() -> None:
    one = MarketSimulator(SimulatorConfig(anomaly_rate=0.05), ASSETS, seed=8)
    two = MarketSimulator(SimulatorConfig(anomaly_rate=0.05), ASSETS, seed=8)
    whole = run_all(one, 6)
    parts = run_all(two, 2, flush=False) + run_all(two, 4)
    for asset in ASSETS:
        a, b = per_asset(whole, asset), per_asset(parts, asset)
        for name, col in a.columns().items():
            np.testing.assert_array_equal(col, getattr(b, name), err_msg=name)
        np.testing.assert_array_equal(one.labels(asset), two.labels(asset))


def test_score_detection() -> None:
    labels = np.array(["", "", "null", "nan", "inf", "nonpositive", "jump", "frozen", "duplicate",
                       "out_of_order", "late", "stale", "jump", ""], dtype=object)
    perfect = [0, 0] + [int(EXPECTED_STATUS[k]) for k in labels[2:11]] + [10, 0, 0]
    injected, detected, frac = score_detection(labels, perfect)
    assert injected == {**{k: 1 for k in KINDS}, "jump": 2}
    assert detected == {**{k: 1 for k in KINDS}, "jump": 1}
    assert frac == 0.0
    worse = list(perfect)
    worse[0] = int(TickStatus.OUTLIER)  # a clean tick rejected
    worse[9] = int(TickStatus.LATE)  # an out-of-order tick not accepted
    injected, detected, frac = score_detection(labels, worse)
    assert detected["out_of_order"] == 0 and frac == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="length"):
        score_detection(labels, perfect[:-1])


def test_bad_arguments_fail_fast() -> None:
    with pytest.raises(ValueError, match="start_prices"):
        MarketSimulator(SimulatorConfig(), ("DOGE-USD",), seed=1)
    with pytest.raises(ValueError, match="allowed_lateness_s"):
        MarketSimulator(SimulatorConfig(), ASSETS, seed=1, bars=BarConfig(allowed_lateness_s=10))
    with pytest.raises(ValueError, match="minutes"):
        next(MarketSimulator(SimulatorConfig(), ASSETS, seed=1).run(0))
    with pytest.raises(ValueError, match="anomaly_mix"):
        SimulatorConfig(anomaly_mix={"teleport": 1.0})
    with pytest.raises(KeyError, match="SOL-USD"):
        MarketSimulator(SimulatorConfig(), ASSETS, seed=1).labels("SOL-USD")


def test_from_settings_uses_consensus_and_bar_thresholds() -> None:
    s = load_settings(overrides=["consensus.frozen_after_s=30", "bars.allowed_lateness_s=60"])
    sim = MarketSimulator.from_settings(s, seed=1)
    assert sim.assets == s.assets
    assert sim.consensus == ConsensusConfig(frozen_after_s=30) and sim.bar_cfg.allowed_lateness_s == 60


def test_first_seq_moves_the_numbering_and_nothing_else() -> None:
    a = run_all(MarketSimulator(SimulatorConfig(), ASSETS, seed=5), 3)
    b = run_all(MarketSimulator(SimulatorConfig(), ASSETS, seed=5, first_seq=10**15), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.price, y.price)
        np.testing.assert_array_equal(y.seq - x.seq, np.full(len(x), 10**15))
    with pytest.raises(ValueError, match="first_seq"):
        MarketSimulator(SimulatorConfig(), ASSETS, seed=5, first_seq=-1)


def test_restarted_live_feed_never_reuses_tick_numbers(tmp_path) -> None:
    # `tickcast down` then `tickcast serve` on the same data dir: the actors remember the
    # last ticks' (provider, seq) and would drop reused numbers as duplicates.
    import time

    from serve_app.feed import LiveSimulatorFeed
    from tickcast.market.dedup import TickDeduplicator

    settings = load_settings(overrides=[f"data_dir={tmp_path}", "serve.feed_backfill_minutes=3"])
    first = per_asset(run_all(LiveSimulatorFeed(settings, "redis://unused", ASSETS)._build(), 3,
                              flush=True), "BTC-USD")
    time.sleep(0.002)
    second = per_asset(run_all(LiveSimulatorFeed(settings, "redis://unused", ASSETS)._build(), 1,
                               flush=True), "BTC-USD")
    assert second.seq.min() > first.seq.max()
    everything = np.arange(len(second))
    alone, after = second.take(everything), second.take(everything)
    TickDeduplicator(window=1_000_000).update(alone)  # its own injected re-sends only
    dedup = TickDeduplicator(window=1_000_000)
    dedup.update(first)
    dedup.update(after)
    dup = int(TickStatus.DUPLICATE)
    assert np.sum(after.status == dup) == np.sum(alone.status == dup) < len(second) // 10
