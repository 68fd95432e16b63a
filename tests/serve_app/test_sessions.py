"""Serving and trading sessions, without servers: a closed market answers 503 `market closed`
with the next open, health shows each asset's session, and closures never make a replica
unready. The views are the real ServingView over real routing tables and feature entries."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.feature_cache import FeatureEntry, FeatureSnapshot
from serve_app.predictor import ServingView
from serve_app.routing import AssetRoute, RoutingTable
from serve_app.sessions import MarketClosed, SessionBook, check_open
from serve_app.slots import ServingState
from tickcast.config import WeeklySession, WeeklySessions
from tickcast.errors import ServiceUnavailable
from tickcast.market.calendar import ALWAYS, calendar_for
from tickcast.ticks import NS_PER_MIN

MON = 1_704_067_200 * 10**9  # 2024-01-01T00:00:00Z, a Monday
H = 60 * NS_PER_MIN
# Weekdays 09:00-17:00 UTC, lunch 12:00-13:00; New Year's Day 2024 a holiday.
EQUITY = WeeklySessions(timezone="UTC", holidays=("2024-01-01",), sessions=(
    WeeklySession(days=("mon", "tue", "wed", "thu", "fri"), open="09:00", close="12:00"),
    WeeklySession(days=("mon", "tue", "wed", "thu", "fri"), open="13:00", close="17:00")))


def _view(now_ns: int, sessions: SessionBook | None) -> ServingView:
    """EQ-1 (sessions) and BTC-USD (24/7), both routed and with features of the last minute."""
    routes = {a: AssetRoute(blue="v1") for a in ("EQ-1", "BTC-USD")}
    state = ServingState(table=RoutingTable(rev=1, routes=routes), models={}, errors={},
                         loaded_ns=now_ns)
    values = np.zeros(3)
    values.setflags(write=False)
    bar_ts = now_ns - now_ns % NS_PER_MIN - NS_PER_MIN
    features = {a: FeatureEntry(bar_ts=bar_ts, schema="s", names=("a", "b", "c"), values=values,
                                updated=now_ns, price=100.0) for a in routes}
    return ServingView(state, FeatureSnapshot(features=features, version=1), ("EQ-1", "BTC-USD"),
                       NS_PER_MIN, 180.0, sessions)


def _book() -> SessionBook:
    return SessionBook({"EQ-1": calendar_for(EQUITY), "BTC-USD": ALWAYS})


def test_a_request_during_a_close_gets_market_closed_with_the_next_open() -> None:
    book = _book()
    for now, next_open in ((MON + 10 * H, "2024-01-02T09:00:00Z"),  # holiday
                           (MON + 24 * H + 12 * H + 30 * NS_PER_MIN, "2024-01-02T13:00:00Z"),  # lunch
                           (MON + 4 * 24 * H + 18 * H, "2024-01-08T09:00:00Z")):  # Friday night
        view = _view(now, book)
        with pytest.raises(MarketClosed) as err:
            view.check_fresh(view.asset_view("EQ-1"), now)
        exc = err.value
        assert exc.status == 503 and exc.code == "market_closed"
        assert exc.message.startswith("market closed: EQ-1 reopens at " + next_open)
        assert exc.to_dict()["next_open"] == next_open and exc.to_dict()["error"] == "market_closed"
        # A 24/7 asset beside it is served as usual.
        assert view.check_fresh(view.asset_view("BTC-USD"), now) <= 60.0


def test_in_session_the_freshness_rules_apply_unchanged() -> None:
    now = MON + 24 * H + 10 * H  # Tuesday 10:00, open
    view = _view(now, _book())
    assert view.check_fresh(view.asset_view("EQ-1"), now) <= 60.0
    # Features from before the lunch break are stale after it reopens: that is no closure.
    later = MON + 24 * H + 13 * H + 5 * NS_PER_MIN
    with pytest.raises(ServiceUnavailable) as err:
        view.check_fresh(view.asset_view("EQ-1"), later)
    assert not isinstance(err.value, MarketClosed) and "stale" in err.value.message
    # Without a session book every asset is 24/7 (the old behaviour).
    check_open(None, "EQ-1", MON)
    plain = _view(MON + 10 * H, None)
    assert plain.check_fresh(plain.asset_view("EQ-1"), MON + 10 * H) <= 60.0


def test_health_shows_sessions_and_a_closed_market_is_not_unready() -> None:
    closed_at = MON + 4 * 24 * H + 18 * H  # Friday 18:00
    view = _view(closed_at, _book())
    ready, reasons, status = view.readiness(closed_at, ("EQ-1", "BTC-USD"))
    assert status["EQ-1"]["session"] == {"state": "closed", "next_open": "2024-01-08T09:00:00Z",
                                         "next_close": None, "calendar": "weekly:UTC"}
    assert status["BTC-USD"]["session"] == {"state": "open", "next_open": None, "next_close": None,
                                            "calendar": "24/7"}
    assert status["EQ-1"]["reason"].startswith("market closed")
    # BTC-USD has no model here, so it fails and is the only reason; EQ-1 is only resting.
    assert not ready and len(reasons) == 1 and reasons[0].startswith("BTC-USD")
    # With only the closed asset required, the replica is ready.
    ready, reasons, _ = view.readiness(closed_at, ("EQ-1",))
    assert ready and reasons == []
    # In session: open, with the time it closes.
    open_at = MON + 24 * H + 10 * H
    _, _, status = _view(open_at, _book()).readiness(open_at, ("EQ-1",))
    assert status["EQ-1"]["session"]["state"] == "open"
    assert status["EQ-1"]["session"]["next_close"] == "2024-01-02T12:00:00Z"


def test_batch_rows_of_a_closed_market_say_so_once() -> None:
    closed_at = MON + 24 * H + 12 * H + 10 * NS_PER_MIN  # Tuesday lunch
    view = _view(closed_at, _book())
    res = view.score_batch(["EQ-1", "BTC-USD", "EQ-1"], 0.3, closed_at)
    by_asset: dict[str, list[tuple[str, str]]] = {}
    for asset, code, detail in res.errors:
        by_asset.setdefault(asset, []).append((code, detail))
    assert [c for c, _ in by_asset["EQ-1"]] == ["market_closed", "market_closed"]
    assert all("reopens at 2024-01-02T13:00:00Z" in d for _, d in by_asset["EQ-1"])
    # BTC-USD is open; it fails only for its empty model slot, not for the session.
    assert [c for c, _ in by_asset["BTC-USD"]] == ["unavailable"]
    # After the reopen the cached state moves on by itself.
    reopened = MON + 24 * H + 13 * H + 30 * 10**9
    res = _view(reopened, view.sessions).score_batch(["EQ-1"], 0.3, reopened)
    assert all(code != "market_closed" for _, code, _ in res.errors)


def test_session_book_caches_until_the_next_transition() -> None:
    book = _book()
    friday = MON + 4 * 24 * H + 16 * H
    assert book.state("EQ-1", friday).is_open
    assert not book.state("EQ-1", friday + H).is_open  # 17:00: closed, cache moved on
    assert book.state("EQ-1", MON + 7 * 24 * H + 9 * H).is_open  # next Monday 09:00
    assert book.state("EQ-1", friday).is_open  # going back in time is answered too
    names = np.asarray(["BTC-USD", "EQ-1"], dtype=object)
    assert book.closed_mask(names, friday + H).tolist() == [False, True]
    assert book.closed_mask(names, MON + 7 * 24 * H + 9 * H).tolist() == [False, False]
    assert "BTC-USD" not in book.calendars  # 24/7 assets cost nothing
