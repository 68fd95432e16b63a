"""Online == offline on real BTC/USD consensus-like bars (shared multi-venue file)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tickcast.config import FeatureConfig, WeeklySession, WeeklySessions
from tickcast.features.definitions import FEATURE_NAMES, compute_features, make_labels
from tickcast.features.online import OnlineFeatures
from tickcast.market.calendar import calendar_for
from tickcast.ticks import NS_PER_MIN


def test_parity_every_bar_every_feature(btc_bars: pd.DataFrame) -> None:
    offline = compute_features(btc_bars).to_numpy()
    online = OnlineFeatures().update_frame(btc_bars)
    assert online.shape == offline.shape == (len(btc_bars), len(FEATURE_NAMES))
    np.testing.assert_array_equal(np.isnan(online), np.isnan(offline))
    diff = np.abs(np.nan_to_num(online) - np.nan_to_num(offline))
    worst = dict(zip(FEATURE_NAMES, diff.max(axis=0)))
    assert max(worst.values()) <= 1e-9, worst
    # The data really exercises the gap rules and every feature is populated somewhere.
    imputed = (btc_bars["imputed"] != "").to_numpy()
    assert imputed.sum() == 5 and np.isnan(offline[imputed, 0]).all()
    assert (np.diff(btc_bars["ts"].to_numpy()) > 60_000_000_000).sum() == 4
    assert np.isfinite(offline).mean(axis=0).min() > 0.9


def test_parity_other_config_with_amendments(btc_bars: pd.DataFrame) -> None:
    cfg = FeatureConfig(return_lags=(1, 4, 20), vol_short=5, vol_long=30, momentum=12, rsi=9,
                        macd=(5, 13, 4), volume_z=20, gap_age_cap=60, amend_depth=4)
    bars = btc_bars.iloc[:2500].reset_index(drop=True)
    of = OnlineFeatures(cfg)
    rows: dict[int, np.ndarray] = {}
    recs = bars.to_dict("records")
    amend = set(range(97, len(recs) - 2, 97))
    for i, rec in enumerate(recs):
        if i in amend:
            # A provisional bar (a late tick is still to come); amended two bars later.
            rows[rec["ts"]] = of.update(dict(rec, close=rec["close"] * 1.001, vwap=rec["close"],
                                             confidence=9.0))
            continue
        rows[rec["ts"]] = of.update(rec)
        if i - 2 in amend:
            amended = recs[i - 2]
            newest = of.last_ts
            # Rows of bars between the amended one and the newest were recomputed internally
            # but only the newest is returned: drop the stale ones from the comparison.
            for ts in [t for t in rows if amended["ts"] <= t < newest]:
                del rows[ts]
            rows[newest] = of.update(amended)
    assert of.replays == len(amend) == 25
    offline = compute_features(bars, cfg).loc[sorted(rows)]
    assert len(offline) > len(bars) - 60
    online = np.array([rows[t] for t in offline.index])
    np.testing.assert_array_equal(np.isnan(online), np.isnan(offline.to_numpy()))
    assert np.nanmax(np.abs(online - offline.to_numpy())) <= 1e-9


def test_labels_on_real_bars_skip_imputed_and_gaps(btc_bars: pd.DataFrame) -> None:
    lab = make_labels(btc_bars, 1)
    imputed = (btc_bars["imputed"] != "").to_numpy()
    assert lab[imputed].isna().all()
    before_imputed = np.flatnonzero(imputed) - 1
    assert lab.iloc[before_imputed].isna().all()
    ts = btc_bars["ts"].to_numpy()
    before_gap = np.flatnonzero(np.diff(ts) > 60_000_000_000)
    assert lab.iloc[before_gap].isna().all()
    # One-minute BTC log returns: a few bp typically, never absurd.
    assert 0 < lab.abs().median() < 5e-3 and lab.notna().mean() > 0.99


# A futures-like week in Chicago time: Sunday 17:00 to Friday 16:00 with a daily break
# 16:00-17:00 (22:00-23:00 UTC in March 2023, before the DST change).
SESSIONS = WeeklySessions(timezone="America/Chicago", sessions=(
    WeeklySession(days=("sun", "mon", "tue", "wed", "thu"), open="17:00", close="16:00"),))


def _session_bars(btc_bars: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The real bars in session, plus three stray prints in each closure (kept, flagged)."""
    cal = calendar_for(SESSIONS)
    ts = btc_bars["ts"].to_numpy()
    expected = cal.expected_bars(ts, NS_PER_MIN)
    # Stray prints: the first minutes of each closure (a late settlement print, say).
    after_close = np.zeros(len(ts), dtype=bool)
    after_close[1:] = expected[:-1] & ~expected[1:]
    stray = after_close | np.roll(after_close, 1) | np.roll(after_close, 2)
    stray &= ~expected
    bars = btc_bars.loc[expected | stray].reset_index(drop=True)
    return bars, stray[expected | stray]


def test_parity_with_a_session_calendar(btc_bars: pd.DataFrame) -> None:
    cal = calendar_for(SESSIONS)
    bars, stray = _session_bars(btc_bars)
    offline = compute_features(bars, calendar=cal)
    online = OnlineFeatures(calendar=cal).update_frame(bars)
    # Exactly equal, bit for bit (NaN where NaN).
    np.testing.assert_array_equal(online, offline.to_numpy())
    bulk = OnlineFeatures(calendar=cal)
    np.testing.assert_array_equal(bulk.update_many(bars), offline.to_numpy()[-1])

    names = list(FEATURE_NAMES)
    ts = bars["ts"].to_numpy()
    real = ~stray & (bars["imputed"] == "").to_numpy()
    # The week holds 6 daily breaks and a weekend; each leaves its stray prints invalid.
    assert stray.sum() == 3 * 7
    assert np.isnan(offline.to_numpy()[stray][:, names.index("ret_1")]).all()
    assert (offline["minutes_since_gap"].to_numpy()[stray] == 0).all()
    # First bar of each session: no return reaches back across the closure; features warm up.
    opened = np.flatnonzero(real[1:] & ~cal.is_open(ts[:-1])) + 1
    assert len(opened) == 7
    first = offline.iloc[opened]
    assert first[[f"ret_{k}" for k in (1, 2, 3, 5, 10, 15, 30)]].isna().all().all()
    assert first[["rv_short", "rv_long", "momentum", "volume_z"]].isna().all().all()
    assert (first["minutes_since_gap"] == 1).all()
    # ret_30 needs 31 bars of the session: NaN on its 30th bar, back on its 31st.
    assert offline["ret_30"].iloc[opened + 29].isna().all()
    assert offline["ret_30"].iloc[opened + 30].notna().all()


def test_session_features_equal_online_fed_only_session_bars(btc_bars: pd.DataFrame) -> None:
    """The ingest drops off-session bars before the online features (actors/asset_state.py):
    that equals the offline features with the calendar, on every bar it keeps."""
    cal = calendar_for(SESSIONS)
    bars, stray = _session_bars(btc_bars)
    offline = compute_features(bars, calendar=cal).to_numpy()[~stray]
    online = OnlineFeatures().update_frame(bars.loc[~stray].reset_index(drop=True))
    np.testing.assert_array_equal(online, offline)


def test_labels_across_closes_are_nan(btc_bars: pd.DataFrame) -> None:
    cal = calendar_for(SESSIONS)
    bars, stray = _session_bars(btc_bars)
    ts = bars["ts"].to_numpy()
    for h in (1, 5):
        lab = make_labels(bars, h, calendar=cal).to_numpy()
        span_ok = np.array([cal.open_ns_between(t, t + (h + 1) * NS_PER_MIN) == (h + 1) * NS_PER_MIN
                            for t in ts.tolist()])
        # No label reaches across a closure (nor starts on a stray print) ...
        assert np.isnan(lab[~span_ok]).all()
        assert np.isnan(lab[stray]).all()
        # ... and the last h bars of every session are among them: 7 sessions end in the week.
        last_of_session = np.flatnonzero(~stray[:-1] & stray[1:])
        assert len(last_of_session) == 7
        for k in range(h):
            assert np.isnan(lab[last_of_session - k]).all()
        # Without the calendar a stray print would bridge the close into a "one-bar" return.
        lab_blind = make_labels(bars, 1).to_numpy()
        assert np.isfinite(lab_blind[last_of_session]).all()
    # Inside sessions labels are there as usual.
    assert np.isfinite(make_labels(bars, 1, calendar=cal).to_numpy()).mean() > 0.97
