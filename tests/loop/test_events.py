"""The events stream: building events, writing and reading them on a real Redis."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from tickcast.monitoring.events import (EventLog, decode_entry, encode_event, event_from,
                                        json_safe, make_event)
from tickcast.redis_server import connect


def test_events_are_strict_json_with_stable_ids() -> None:
    ev = make_event("controller", "BTC-USD", "promoted", seq=4, ts_ns=10,
                    dm_stat=np.float64(-3.5), dm_p=float("nan"), n=np.int64(200),
                    route={"blue": "v1", "weights": np.array([0.0, 1.0])})
    assert ev["id"] == "controller:BTC-USD:4" and ev["ts"] == 10 and ev["asset"] == "BTC-USD"
    text = encode_event(ev)["event"]
    assert json.loads(text)["dm_p"] is None and json.loads(text)["route"]["weights"] == [0.0, 1.0]
    assert make_event("x", None, "y")["id"].startswith("x:-:r")
    with pytest.raises(ValueError):
        make_event("", "A", "t")
    assert json_safe({1: {2}}) == {"1": [2]}


def test_event_from_keeps_the_monitor_type_and_drops_reserved_keys() -> None:
    raw = {"type": "drift_level", "asset": "ETH-USD", "id": "x", "from": "NORMAL", "to": "CRITICAL"}
    ev = event_from("drift", "BTC-USD", raw, seq=1, champion="v1", to="ignored")
    assert (ev["asset"], ev["id"], ev["type"], ev["to"], ev["champion"]) == (
        "BTC-USD", "drift:BTC-USD:1", "drift_level", "CRITICAL", "v1")


def test_decode_skips_foreign_entries() -> None:
    assert decode_entry(b"1-0", {b"other": b"1"}) is None
    assert decode_entry(b"1-0", {b"event": b"not json"}) is None
    assert decode_entry("1-0", {"event": "[1]"}) is None


def test_log_appends_and_reads_by_asset_type_and_last(redis_url: str) -> None:
    client = connect(redis_url)
    log = EventLog(client, stream=f"events-test-{uuid.uuid4().hex[:8]}", maxlen=1000)
    evs = [make_event("drift", "A", "drift_level", seq=i, to=str(i)) for i in range(1, 6)]
    evs.append(make_event("safety", "B", "regime", seq=1))
    ids = log.append(evs)
    assert len(ids) == 6
    assert [e["to"] for e in log.read(asset="A", after=ids[2])] == ["4", "5"]
    log.append([evs[2]])  # a replayed copy (same id) after a restart
    assert [e["to"] for e in log.read(asset="A")] == ["1", "2", "3", "4", "5"]
    assert [e["to"] for e in log.read(asset="A", last=2)] == ["4", "5"]
    assert [e["type"] for e in log.read(types=["regime"])] == ["regime"]
    assert log.read(asset="nobody") == []
    client.delete(log.stream)
    with pytest.raises(ValueError):
        EventLog(client, stream="")
