"""A market that trades in sessions, replayed through the real per-asset pipeline (AssetState).

The simulator trades one asset on a futures-like calendar (Sunday 23:00 to Friday 22:00 UTC,
daily break 22:00-23:00) from a Thursday evening to a Monday night: two daily breaks and a
weekend. Real outages are cut into the sessions, some of them right against a closure. The gap
audit must hold exactly those outages, judged as a desk would: nothing is interpolated or
forward-filled across a closure, and the gap gauge never counts a closure.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actors.asset_state import AssetState, StepOutput
from tickcast.config import Settings, load_settings
from tickcast.features.definitions import compute_features, make_labels
from tickcast.market.calendar import trading_calendar
from tickcast.sources.simulator import MarketSimulator
from tickcast.storage.bar_store import BarStore
from tickcast.ticks import NS_PER_MIN, TickBatch

ASSET = "ES-FUT"
THU = 1_704_326_400 * 10**9  # 2024-01-04T00:00:00Z, a Thursday
CALENDAR = ("{timezone: UTC, sessions: [{days: [sun, mon, tue, wed, thu], "
            "open: '23:00', close: '22:00'}]}")
START = THU + 20 * 60 * NS_PER_MIN  # Thursday 20:00
END = THU + (4 * 24 + 2) * 60 * NS_PER_MIN  # Monday 02:00


def _minute(day: int, hh: int, mm: int) -> int:
    """Minute index (from Thursday 00:00) of day ``day`` (0 = Thursday) at hh:mm."""
    return (day * 24 + hh) * 60 + mm


# Outages cut into the sessions: (first missing minute, minutes, how the policy must judge it).
OUTAGES = [
    (_minute(0, 21, 58), 2, "ffill"),  # the last two minutes before Thursday's break
    (_minute(0, 23, 0), 3, "excluded"),  # the first three after it: never filled from before
    (_minute(1, 10, 0), 5, "interpolate"),  # inside Friday's session
    (_minute(1, 14, 0), 45, "excluded"),  # too long, and no other provider has it
    (_minute(1, 21, 50), 10, "excluded"),  # Friday's last ten: nothing to interpolate towards
    (_minute(3, 23, 0), 4, "excluded"),  # Sunday's reopen: no forward fill over the weekend
]


def _settings(tmp_path: Path, calendar: bool = True) -> Settings:
    return load_settings(overrides=[
        f"data_dir={tmp_path}", f"assets=[{ASSET}]",
        "simulator.providers=[alpha, bravo]", "simulator.ticks_per_provider_per_s=0.2",
        "simulator.anomaly_rate=0", f"simulator.start_prices={{{ASSET}: 4800.0}}",
        *([f"calendars.{ASSET}={CALENDAR}"] if calendar else [])])


def _ticks(settings: Settings) -> list[TickBatch]:
    """The simulated session ticks with the outages cut out (both providers), delivered in
    one batch per minute of receive time (a live feed sends 5-second ones; the steps of the
    state are the same, only fewer)."""
    sim = MarketSimulator.from_settings(_settings(Path(settings.data_dir)), seed=11,
                                        start_ns=START)
    cut = [(THU + m * NS_PER_MIN, THU + (m + k) * NS_PER_MIN) for m, k, _ in OUTAGES]
    ticks = TickBatch.concat(list(sim.run((END - START) / NS_PER_MIN)))
    keep = np.ones(len(ticks), dtype=bool)
    for lo, hi in cut:
        keep &= ~((ticks.ts_event >= lo) & (ticks.ts_event < hi))
    ticks = ticks.take(np.flatnonzero(keep))
    minute = ticks.ts_init // NS_PER_MIN
    edges = np.flatnonzero(np.diff(minute)) + 1
    return [ticks.take(idx) for idx in np.split(np.arange(len(ticks)), edges)]


class _Store:
    def __init__(self, root: Path) -> None:
        self.bars = BarStore(root, fsync=False)
        self.audit: list[pd.DataFrame] = []

    def apply(self, out: StepOutput) -> None:
        if len(out.consensus):
            self.bars.upsert(ASSET, "consensus", out.consensus)
        if len(out.provider):
            self.bars.upsert_providers(ASSET, out.provider)
        if len(out.audit):
            self.audit.append(out.audit)

    def alternates(self, start: int, end: int) -> dict[str, pd.DataFrame]:
        return {p: self.bars.read(ASSET, p, start, end + 1) for p in self.bars.providers(ASSET)}

    def audit_frame(self) -> pd.DataFrame:
        return pd.concat(self.audit, ignore_index=True).sort_values("start").reset_index(drop=True)


def _replay(state: AssetState, batches: list[TickBatch], store: _Store,
            restart_after: int | None = None) -> tuple[AssetState, dict[int, float]]:
    """Step every batch (restarting from a pickled checkpoint once, if asked), then flush.
    Returns the gap gauge after each step, by the minute (receive time) of its batch."""
    gauge = {}
    for i, b in enumerate(batches):
        if i == restart_after:
            state = pickle.loads(pickle.dumps(state))
        store.apply(state.step(b, store.alternates))
        if state.gap_minutes is not None:
            gauge[int(b.ts_init[0] // NS_PER_MIN - THU // NS_PER_MIN)] = state.gap_minutes
    store.apply(state.flush(store.alternates))
    return state, gauge


@pytest.fixture(scope="module")
def ticks(tmp_path_factory: pytest.TempPathFactory) -> list[TickBatch]:
    return _ticks(_settings(tmp_path_factory.mktemp("sim")))


def test_the_simulator_trades_only_in_session(ticks: list[TickBatch], tmp_path: Path) -> None:
    cal = trading_calendar(_settings(tmp_path), ASSET)
    ts = np.concatenate([b.ts_event for b in ticks])
    assert cal.is_open(ts).all()
    # Ticks on both sides of every closure: Thursday evening, Friday, Sunday night.
    for day, hh in ((0, 21), (1, 21), (3, 23)):
        lo = THU + _minute(day, hh, 0) * NS_PER_MIN
        assert ((ts >= lo) & (ts < lo + 60 * NS_PER_MIN)).sum() > 1000
    # The mid moved on through the weekend: the reopen prints a gap away from Friday's close.
    # Its sd is sqrt(2,955) ~ 54 one-minute sds, so it dwarfs every minute-to-minute move
    # inside the sessions (seed 11: -7.2% against at most 0.23%).
    price = pd.Series(np.concatenate([b.price for b in ticks]))
    per_minute = np.log(price.groupby(ts // NS_PER_MIN).median())
    step = np.diff(per_minute.index.to_numpy())
    moves = np.diff(per_minute.to_numpy())
    weekend = moves[step == 2955]
    assert len(weekend) == 1 and abs(weekend[0]) > np.abs(moves[step == 1]).max()
    # A 24/7 asset of the same simulator is untouched by the feature.
    plain = MarketSimulator.from_settings(_settings(tmp_path, calendar=False), seed=11, start_ns=START)
    ts_plain = np.concatenate([b.ts_event for b in plain.run(180)])  # over the break
    assert not cal.is_open(ts_plain).all()


def test_the_gap_audit_holds_only_the_real_gaps(ticks: list[TickBatch], tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    state = AssetState(ASSET, settings)
    calendar = state.calendar
    store = _Store(tmp_path / "bars")
    # Midway (Friday) the state goes through a checkpoint round trip, as after a restart.
    state, gauge = _replay(state, ticks, store, restart_after=len(ticks) // 2)
    assert state.calendar is calendar  # the process's shared instance, rebuilt from its spec
    assert len(pickle.dumps(calendar)) < 1000  # a checkpoint holds the spec, not the tables

    audit = store.audit_frame()
    got = [(int((s - THU) // NS_PER_MIN), float(m), meth)
           for s, m, meth in zip(audit["start"], audit["missing_minutes"], audit["method"])]
    assert got == [(m, float(k), meth) for m, k, meth in OUTAGES]
    assert state.gaps == len(OUTAGES) and state.imputed == 2 + 5
    # Stored consensus bars: every session minute but the excluded ones, none in a closure.
    cons = store.bars.read(ASSET)
    cal = state.calendar
    assert cal.expected_bars(cons["ts"].to_numpy(), NS_PER_MIN).all()
    session_minutes = cal.count_expected(START, END, NS_PER_MIN)
    excluded = sum(k for _, k, meth in OUTAGES if meth == "excluded")
    assert len(cons) == session_minutes - excluded == 120 + 1380 + 180 - excluded
    assert state.off_session_bars == 0
    # The gap gauge counts session time only: the longest it saw is the 45-minute outage,
    # never a break (60 min) nor the weekend (2,940 min) ...
    assert max(gauge, key=gauge.get) == _minute(1, 14, 45) and 45.0 <= max(gauge.values()) < 46.0
    # ... and at Sunday's reopen it shows the outage minutes on both sides of the weekend:
    # Friday's last 10 and Sunday's first 4 (plus the seconds into the minute).
    assert 14.0 <= gauge[_minute(3, 23, 4)] < 15.0
    assert state.status()["calendar"] == "weekly:UTC"

    # Labels and features of the stored series never span a closure.
    lab = make_labels(cons, 1, calendar=cal)
    last_before_close = [THU + _minute(day, hh, mm) * NS_PER_MIN
                         for day, hh, mm in ((0, 21, 59), (1, 21, 49))]
    assert lab.loc[last_before_close].isna().all()
    feats = compute_features(cons, calendar=cal)
    reopen = THU + _minute(3, 23, 4) * NS_PER_MIN  # first bar after the weekend's cut
    assert np.isnan(feats.loc[reopen, "ret_1"]) and feats.loc[reopen, "minutes_since_gap"] == 1.0
    # The online features the state computed agree with the offline ones on the stored bars
    # (imputed fills included, as the actor feeds them).
    state.feed_features()
    np.testing.assert_array_equal(state.features.last_row, feats.to_numpy()[-1])


def test_without_the_calendar_every_closure_is_audited_as_a_gap(ticks: list[TickBatch],
                                                                 tmp_path: Path) -> None:
    """What issue 15 reported: the same ticks on a 24/7 calendar."""
    state = AssetState(ASSET, _settings(tmp_path, calendar=False))
    store = _Store(tmp_path / "bars")
    _, gauge = _replay(state, ticks, store)
    audit = store.audit_frame()
    minutes = audit["missing_minutes"].tolist()
    # Thursday's break swallows the outages on both sides of it; the weekend likewise.
    assert 2 + 60 + 3 in minutes and 10 + 2940 + 4 in minutes
    assert gauge[_minute(3, 23, 4)] >= 2954
