"""Trading calendars (pure): sessions against a minute-by-minute reference, DST, holidays,
early closes, overnight sessions, year boundaries, library calendars, caching and config."""

from __future__ import annotations

import pickle
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from tickcast.config import ConfigError, WeeklySession, WeeklySessions, load_settings
from tickcast.market.calendar import (ALWAYS, NS_PER_S, SessionPhase, calendar_for, iso_utc,
                                      trading_calendar)
from tickcast.sources.simulator import MarketSimulator

M = 60 * NS_PER_S
H = 60 * M


def _ns(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()) * NS_PER_S


# New York equities: 09:30-16:00 on weekdays, Good Friday 2024 closed, an early close at 13:00
# on 2024-07-03. The range below crosses the DST change of 2024-03-10.
NYSE_LIKE = WeeklySessions(
    timezone="America/New_York",
    sessions=(WeeklySession(days=("mon", "tue", "wed", "thu", "fri"), open="09:30", close="16:00"),),
    holidays=("2024-03-29",), early_closes={"2024-07-03": "13:00"})


def _reference_open(spec: WeeklySessions, ts_ns: np.ndarray) -> np.ndarray:
    """Minute by minute with zoneinfo: is the local time inside a session of its day?

    Sessions here stay within one local day, which is what this reference can express."""
    zone = ZoneInfo(spec.timezone)
    out = np.zeros(len(ts_ns), dtype=bool)
    names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    for i, t in enumerate(ts_ns.tolist()):
        local = datetime.fromtimestamp(t / 1e9, tz=timezone.utc).astimezone(zone)
        if local.date() in spec.holidays:
            continue
        hm = f"{local.hour:02d}:{local.minute:02d}"
        for s in spec.sessions:
            if names[local.weekday()] in s.days and s.open <= hm < s.close:
                early = spec.early_closes.get(local.date())
                out[i] = early is None or hm < early
    return out


@pytest.mark.parametrize("start, days", [("2024-03-04T00:00:00Z", 14),  # DST, US spring
                                         ("2024-03-25T00:00:00Z", 7),  # Good Friday
                                         ("2024-07-01T00:00:00Z", 5)])  # early close
def test_weekly_sessions_match_a_minute_by_minute_reference(start: str, days: int) -> None:
    cal = calendar_for(NYSE_LIKE)
    ts = _ns(start) + np.arange(days * 1440, dtype=np.int64) * M
    got = cal.is_open(ts)
    np.testing.assert_array_equal(got, _reference_open(NYSE_LIKE, ts))
    # Minute bars: exactly the open minutes are expected (sessions lie on the minute grid).
    np.testing.assert_array_equal(cal.expected_bars(ts, M), got)
    # Session time and expected bars agree with the per-minute flags.
    assert cal.open_ns_between(int(ts[0]), int(ts[-1]) + M) == int(got.sum()) * M
    assert cal.count_expected(int(ts[0]), int(ts[-1]) + M, M) == int(got.sum())


def test_dst_moves_the_utc_open_and_named_days_are_closed() -> None:
    cal = calendar_for(NYSE_LIKE)
    # 09:30 New York is 14:30 UTC in winter, 13:30 UTC after 2024-03-10.
    assert cal.session_state(_ns("2024-03-08T14:00:00Z")).phase is SessionPhase.CLOSED
    assert cal.next_open(_ns("2024-03-08T14:00:00Z")) == _ns("2024-03-08T14:30:00Z")
    assert cal.next_open(_ns("2024-03-11T13:00:00Z")) == _ns("2024-03-11T13:30:00Z")
    # Good Friday closed: Thursday's close to Monday's open is one closure.
    st = cal.session_state(_ns("2024-03-29T15:00:00Z"))
    assert not st.is_open and iso_utc(st.since_ns) == "2024-03-28T20:00:00Z"
    assert iso_utc(st.next_open_ns) == "2024-04-01T13:30:00Z"
    # The early close: 13:00 New York.
    st = cal.session_state(_ns("2024-07-03T15:00:00Z"))
    assert st.is_open and iso_utc(st.next_close_ns) == "2024-07-03T17:00:00Z"


# A futures-like overnight week: Sunday 17:00 to Friday 16:00 Chicago, daily break 16:00-17:00,
# closed on 2024-12-25 (local date: the session around it is cut at midnight on both sides).
OVERNIGHT = WeeklySessions(timezone="America/Chicago", holidays=("2024-12-25",), sessions=(
    WeeklySession(days=("sun", "mon", "tue", "wed", "thu"), open="17:00", close="16:00"),))


def test_overnight_sessions_breaks_weekends_holidays_and_the_year_boundary() -> None:
    cal = calendar_for(OVERNIGHT)
    # Friday 2024-12-20 16:00 CST (22:00 UTC) to Sunday 17:00 CST (23:00 UTC): the weekend.
    st = cal.session_state(_ns("2024-12-21T12:00:00Z"))
    assert iso_utc(st.since_ns) == "2024-12-20T22:00:00Z"
    assert iso_utc(st.next_open_ns) == "2024-12-22T23:00:00Z"
    # Daily break: Monday 16:00-17:00 CST.
    assert cal.is_open([_ns("2024-12-23T21:59:00Z"), _ns("2024-12-23T22:00:00Z"),
                        _ns("2024-12-23T22:59:00Z"), _ns("2024-12-23T23:00:00Z")]).tolist() == \
        [True, False, False, True]
    # Christmas (local date) is closed all day: Tuesday evening's session ends at midnight,
    # Wednesday evening's opens at Thursday 00:00 local.
    st = cal.session_state(_ns("2024-12-25T12:00:00Z"))
    assert iso_utc(st.since_ns) == "2024-12-25T06:00:00Z"
    assert iso_utc(st.next_open_ns) == "2024-12-26T06:00:00Z"
    # The session opened on 2024-12-31 runs into 2025 without a seam at the year boundary.
    st = cal.session_state(_ns("2025-01-01T00:00:00Z"))
    assert st.is_open and iso_utc(st.since_ns) == "2024-12-31T23:00:00Z"
    assert iso_utc(st.next_close_ns) == "2025-01-01T22:00:00Z"
    segs = cal.expected_segments(_ns("2024-12-31T12:00:00Z"), _ns("2025-01-02T12:00:00Z"), M)
    assert [(iso_utc(a), iso_utc(b)) for a, b in zip(*segs)] == [
        ("2024-12-31T12:00:00Z", "2024-12-31T22:00:00Z"),
        ("2024-12-31T23:00:00Z", "2025-01-01T22:00:00Z"),
        ("2025-01-01T23:00:00Z", "2025-01-02T12:00:00Z")]


def test_bars_longer_than_a_minute_are_expected_when_they_overlap_a_session() -> None:
    cal = calendar_for(NYSE_LIKE)
    five = 5 * M
    day = _ns("2024-07-01T13:00:00Z")  # 09:00 New York
    slots = day + np.arange(0, 8 * 12) * five  # 09:00 .. 16:55 local
    got = cal.expected_bars(slots, five)
    # 09:30 is on the 5-minute grid; 16:00 too: 78 slots expected.
    assert got.sum() == 78 and not got[:6].any() and got[6]
    # An hourly grid: the 09:00 bar overlaps the 09:30 open, so it is expected (7 hours).
    hours = day + np.arange(8) * H
    assert cal.expected_bars(hours, H).tolist() == [True] * 7 + [False]
    assert cal.count_expected(int(hours[0]), int(hours[-1]) + H, H) == 7


def test_library_calendar_cme_globex_fx() -> None:
    cal = calendar_for("CMEGlobex_FX")
    # 17:00-16:00 Chicago, Sunday to Friday: 23:00-22:00 UTC in January.
    st = cal.session_state(_ns("2024-01-06T12:00:00Z"))  # Saturday
    assert not st.is_open and iso_utc(st.since_ns) == "2024-01-05T22:00:00Z"
    assert iso_utc(st.next_open_ns) == "2024-01-07T23:00:00Z"
    assert cal.is_open([_ns("2024-01-08T22:30:00Z"), _ns("2024-01-08T23:30:00Z")]).tolist() == \
        [False, True]
    # A lunch break splits a session in two (Hong Kong: 12:00-13:00 local).
    hk = calendar_for("XHKG")
    opens, closes = hk.sessions(_ns("2024-03-04T00:00:00Z"), _ns("2024-03-04T23:00:00Z"))
    day = (opens >= _ns("2024-03-04T00:00:00Z")) & (opens < _ns("2024-03-05T00:00:00Z"))
    assert [(iso_utc(a), iso_utc(b)) for a, b in zip(opens[day], closes[day])] == [
        ("2024-03-04T01:30:00Z", "2024-03-04T04:00:00Z"),
        ("2024-03-04T05:00:00Z", "2024-03-04T08:00:00Z")]


def test_tables_are_built_once_per_year_and_shared_between_assets() -> None:
    assets = [f"FX-{i:04d}" for i in range(1000)]
    settings = load_settings(overrides=[f"assets=[{', '.join(assets)}]"]).with_overrides(
        calendars={a: "CMEGlobex_FX" for a in assets})
    cals = {id(trading_calendar(settings, a)) for a in assets}
    assert len(cals) == 1  # one object, so one table, for all 1,000 assets
    cal = trading_calendar(settings, assets[0])
    t0 = _ns("2024-05-06T00:00:00Z")
    for k in range(5000):  # a few days of minute bars: queries never rebuild a year
        t = t0 + k * M
        cal.expected_bars(np.array([t]), M)
        cal.open_ns_between(t - 5 * M, t)
    assert set(cal._years) <= {2023, 2024, 2025}
    # A pickle (a checkpoint) holds the name and comes back as the same shared object.
    assert pickle.loads(pickle.dumps(cal)) is cal
    assert pickle.loads(pickle.dumps(ALWAYS)) is ALWAYS
    assert calendar_for(OVERNIGHT.model_dump()) is calendar_for(OVERNIGHT)


def test_always_open_is_trivial() -> None:
    ts = np.array([0, 123 * M, _ns("2024-12-25T00:00:00Z")], dtype=np.int64)
    assert ALWAYS.always_open and ALWAYS.is_open(ts).all() and ALWAYS.expected_bars(ts, M).all()
    assert ALWAYS.session_state(int(ts[1])).to_dict() == {"state": "open", "next_open": None,
                                                         "next_close": None}
    assert ALWAYS.open_ns_between(0, 10 * M) == 10 * M and not ALWAYS.closed_between(0, 10 * M)
    assert ALWAYS.count_expected(0, 10 * M, M) == 10


def test_config_names_the_field_at_fault() -> None:
    good = load_settings(overrides=["assets=[BTC-USD, EUR-USD]", "calendars.EUR-USD=CMEGlobex_FX"])
    assert trading_calendar(good, "EUR-USD") is calendar_for("CMEGlobex_FX")
    assert trading_calendar(good, "BTC-USD") is ALWAYS
    cases = {
        "calendars.EUR-USD=CMEGlobex_FX": "calendars",  # not an asset
        "calendars.BTC-USD=NOT_A_CALENDAR": "calendars",
        "calendars.BTC-USD={timezone: Mars/Base, sessions: [{days: [mon], open: '09:00', "
        "close: '10:00'}]}": "calendars.BTC-USD.weekly",
        "calendars.BTC-USD={timezone: UTC, sessions: [{days: [mon], open: 9:00, "
        "close: '10:00'}]}": "calendars.BTC-USD.weekly.sessions.0",
        "calendars.BTC-USD={timezone: UTC, sessions: [{days: [mo], open: '09:00', "
        "close: '10:00'}]}": "calendars.BTC-USD.weekly.sessions.0.days.0",
        "calendars.BTC-USD={timezone: UTC, sessions: []}": "calendars.BTC-USD.weekly.sessions",
    }
    for override, field in cases.items():
        with pytest.raises(ConfigError) as err:
            load_settings(overrides=[override])
        assert err.value.field == field, (override, err.value)
    with pytest.raises(ConfigError, match="quoted"):
        load_settings(overrides=["calendars.BTC-USD={timezone: UTC, sessions: [{days: [mon], "
                                 "open: 9:00, close: '10:00'}]}"])


def test_a_24_7_calendar_leaves_the_simulator_unchanged() -> None:
    settings = load_settings(overrides=["simulator.anomaly_rate=0.02"])
    plain = list(MarketSimulator(settings.simulator, ("BTC-USD",), 5).run(3))
    same = list(MarketSimulator(settings.simulator, ("BTC-USD",), 5,
                                calendars={"BTC-USD": ALWAYS}).run(3))
    assert len(plain) == len(same)
    for a, b in zip(plain, same):
        for name, col in a.columns().items():
            np.testing.assert_array_equal(col, getattr(b, name), err_msg=name)
