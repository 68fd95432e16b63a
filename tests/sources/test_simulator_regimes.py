"""Volatility regimes of the simulator: spikes, calm stretches, GARCH clustering, labels."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from tickcast.config import RegimeConfig, SimulatorConfig, load_settings
from tickcast.sources.simulator import (
    REGIMES,
    SECONDS_PER_YEAR,
    MarketSimulator,
    VolRegime,
)
from tickcast.ticks import NS_PER_MIN, NS_PER_S, TickBatch

ASSET = "BTC-USD"


def quiet(regimes: RegimeConfig | None, rate: float = 1.0, **kw: object) -> SimulatorConfig:
    """One provider quoting the bare mid (no noise, spread, bias or anomalies)."""
    return SimulatorConfig(providers=("solo",), ticks_per_provider_per_s=rate, provider_noise_bp=0.0,
                           provider_bias_bp=0.0, spread_bp=0.0, anomaly_rate=0.0, annual_vol=0.6,
                           regimes={} if regimes is None else {ASSET: regimes}, **kw)


def mid_path(sim: MarketSimulator, minutes: float) -> tuple[TickBatch, pd.DataFrame]:
    ticks = TickBatch.concat([b for b in sim.run(minutes) if b.asset == ASSET])
    keys = sim.tick_keys(ASSET)
    order = np.argsort(ticks.ts_event, kind="stable")
    return ticks.take(order), keys.iloc[order].reset_index(drop=True)


def annual_vol(log_p: np.ndarray, ts: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.diff(log_p) ** 2) / (np.sum(np.diff(ts)) / NS_PER_S) * SECONDS_PER_YEAR))


SPIKES_AND_CALM = RegimeConfig(spike_rate_per_hour=1.0, spike_multiplier=4.0, spike_minutes=(10, 20),
                               calm_rate_per_hour=1.0, calm_multiplier=0.25, calm_minutes=(20, 40))


def test_realized_vol_in_spikes_and_calm_stretches_is_the_configured_multiple() -> None:
    # Arrange
    sim = MarketSimulator(quiet(SPIKES_AND_CALM), (ASSET,), seed=3)
    ticks, keys = mid_path(sim, 600)
    log_p = np.log(ticks.price)
    regime = keys["regime"].to_numpy()
    ret2 = np.diff(log_p) ** 2
    dt = np.diff(ticks.ts_event) / NS_PER_S
    # Act: realized volatility of the returns ending in each regime.
    vol = {}
    for name in REGIMES:
        sel = regime[1:] == name
        assert sel.sum() > 2000, (name, sel.sum())
        vol[name] = np.sqrt(ret2[sel].sum() / dt[sel].sum() * SECONDS_PER_YEAR)
    # Assert
    assert vol["normal"] == pytest.approx(0.6, rel=0.08)
    assert vol["spike"] / vol["normal"] == pytest.approx(4.0, rel=0.1)
    assert vol["calm"] / vol["normal"] == pytest.approx(0.25, rel=0.1)
    # The record's volatility says the same.
    recorded = keys.groupby("regime")["vol_annual"].mean()
    assert recorded["spike"] == pytest.approx(2.4) and recorded["calm"] == pytest.approx(0.15)


def test_episodes_are_labelled_per_tick_and_per_bar() -> None:
    sim = MarketSimulator(quiet(SPIKES_AND_CALM), (ASSET,), seed=4)
    ticks, keys = mid_path(sim, 480)
    events = sim.regime_events(ASSET)
    assert set(events["regime"]) == {"spike", "calm"} and len(events) >= 4
    ts = ticks.ts_event
    expected = np.full(len(ts), "normal", dtype=object)
    for kind in ("calm", "spike"):  # a spike wins over a calm stretch
        for e in events.loc[events["regime"] == kind].itertuples():
            expected[(ts >= e.start_ns) & (ts < e.end_ns)] = kind
    np.testing.assert_array_equal(keys["regime"].to_numpy(), expected)
    # Per bar: a minute wholly inside a spike is a spike bar, with 4x the volatility.
    bars = sim.regime_bars(ASSET)
    assert len(bars) == 480 and bars["ticks"].sum() == len(ts)
    spike = events.loc[events["regime"] == "spike"].iloc[0]
    inside = (bars["ts"] >= spike.start_ns + NS_PER_MIN) & (bars["ts"] + NS_PER_MIN <= spike.end_ns)
    assert inside.sum() >= 8
    assert (bars.loc[inside, "regime"] == "spike").all()
    assert np.allclose(bars.loc[inside, "vol_annual"], 2.4)


def test_garch_clusters_volatility_and_keeps_its_mean() -> None:
    # Squared one-minute returns are autocorrelated under GARCH(0.15, 0.8) and not without it.
    def minute_returns(regimes: RegimeConfig | None) -> np.ndarray:
        sim = MarketSimulator(quiet(regimes, rate=0.5), (ASSET,), seed=5)
        ticks, _ = mid_path(sim, 2400)
        minute = ticks.ts_event // NS_PER_MIN
        last = np.flatnonzero(np.diff(minute)) if len(minute) else np.empty(0, dtype=int)
        return np.diff(np.log(ticks.price[last]))

    def acf(x: np.ndarray, lag: int) -> float:
        y = x - x.mean()
        return float(np.dot(y[lag:], y[:-lag]) / np.dot(y, y))

    garch = minute_returns(RegimeConfig(garch_alpha=0.15, garch_beta=0.8))
    plain = minute_returns(None)
    acf_garch = [acf(garch ** 2, k) for k in (1, 2, 3, 5)]
    acf_plain = [acf(plain ** 2, k) for k in (1, 2, 3, 5)]
    assert min(acf_garch) > 0.08 and np.mean(acf_garch) > 0.12, acf_garch
    assert max(abs(a) for a in acf_plain) < 0.07, acf_plain
    per_minute = 0.6 / np.sqrt(SECONDS_PER_YEAR / 60)
    assert garch.std() == pytest.approx(per_minute, rel=0.2)  # E[g] = 1: the level is kept
    kurt = ((garch - garch.mean()) ** 4).mean() / garch.var() ** 2
    assert kurt > 4.0  # fat tails, as clustering makes them


def test_regimes_change_prices_only_never_the_ticks_schedule() -> None:
    # The regime process draws from a stream of its own: same seed, same ticks and labels.
    cfg = SimulatorConfig(anomaly_rate=0.03)
    with_reg = cfg.model_copy(update={"regimes": {ASSET: SPIKES_AND_CALM}})
    a = MarketSimulator(cfg, (ASSET, "ETH-USD"), seed=9)
    b = MarketSimulator(with_reg, (ASSET, "ETH-USD"), seed=9)
    ba, bb = list(a.run(30)), list(b.run(30))
    assert len(ba) == len(bb)
    for x, y in zip(ba, bb):
        np.testing.assert_array_equal(x.ts_event, y.ts_event)
        np.testing.assert_array_equal(x.provider, y.provider)
        if x.asset == "ETH-USD":
            np.testing.assert_array_equal(x.price, y.price, err_msg="an asset without regimes changed")
    np.testing.assert_array_equal(a.labels(ASSET), b.labels(ASSET))
    assert (a.regimes(ASSET) == "normal").all() and (a.tick_keys(ASSET)["vol_annual"] == 0.6).all()


def test_same_seed_same_regimes_pickles_and_continues_seamlessly() -> None:
    cfg = quiet(RegimeConfig(garch_alpha=0.1, garch_beta=0.85, spike_rate_per_hour=2.0,
                             calm_rate_per_hour=2.0), rate=2.0)
    one = MarketSimulator(cfg, (ASSET,), seed=12)
    two = MarketSimulator(cfg, (ASSET,), seed=12)
    whole = list(one.run(90))
    first = list(two.run(40, flush=False))
    clone = pickle.loads(pickle.dumps(two))
    rest, rest_clone = list(two.run(50)), list(clone.run(50))
    for x, y in zip(first + rest, whole):
        np.testing.assert_array_equal(x.price, y.price)
    for x, y in zip(rest, rest_clone):
        np.testing.assert_array_equal(x.price, y.price)
    pd.testing.assert_frame_equal(one.regime_events(ASSET), two.regime_events(ASSET))
    np.testing.assert_array_equal(one.regimes(ASSET), two.regimes(ASSET))
    other = MarketSimulator(cfg, (ASSET,), seed=13)
    list(other.run(90))
    assert not one.regime_events(ASSET).equals(other.regime_events(ASSET))


def test_regimes_are_configured_per_asset_and_validated() -> None:
    settings = load_settings(overrides=[
        "simulator.regimes={BTC-USD: {garch_alpha: 0.1, garch_beta: 0.85, spike_rate_per_hour: 1}}"])
    sim = MarketSimulator.from_settings(settings, seed=1)
    list(sim.run(5))
    assert sim._state("BTC-USD").regimes is not None and sim._state("ETH-USD").regimes is None
    assert [r.name.lower() for r in VolRegime] == list(REGIMES)
    with pytest.raises(ValueError, match="garch_alpha"):
        RegimeConfig(garch_alpha=0.3, garch_beta=0.7)
    with pytest.raises(ValueError, match="spike_minutes"):
        RegimeConfig(spike_minutes=(20.0, 10.0))
    with pytest.raises(ValueError, match="without a start price"):
        SimulatorConfig(regimes={"DOGE-USD": RegimeConfig()})
