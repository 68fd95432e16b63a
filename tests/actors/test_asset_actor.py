"""The market shards on the session's Ray and Redis: per-asset messages, fault drills, bad input.

Drills replay one day of the shared file (two assets, three venues each) paced by event time,
disturb the run mid-way, and require the stored bars to equal those of an undisturbed replay
(the ``baseline`` fixture), every column of every minute of every source.
"""

from __future__ import annotations

import gzip
import os
import signal
import threading
import time
from pathlib import Path

from typing import Any, Callable

import pytest
import ray

from actors.market_shard import AssetRef, get_or_create_shards, shard_for
from actors.feeder import stream_key
from tickcast.ingest import IngestHooks, IngestPlan, run_ingest
from tickcast.redis_server import EmbeddedRedis, connect
from tickcast.sources.replay import read_bar_file

pytestmark = [pytest.mark.ray, pytest.mark.redis]

# One day of event time in about 8 s of wall time: the drills strike while ticks still flow.
DRILL_SPEED = 86_400 / 8
STRIKE_AT_ENTRY = 40


def _handle(asset: str) -> AssetRef:
    ref = shard_for(asset)
    assert ref is not None, f"no market shard owns {asset}"
    return ref


def _same_counts(report: dict, reference: dict) -> None:
    for key in ("ticks_in", "ticks_accepted", "rejected", "duplicates", "outliers", "late", "bars"):
        assert report[key] == reference[key], key


def test_undisturbed_replay_reports_and_stores(baseline: Any, day_slice: Path) -> None:
    bars, report, assets = baseline.bars, baseline.report, baseline.assets
    file = read_bar_file(day_slice, assets)
    expected_ticks = 4 * len(file.bars)
    assert sum(c["ticks_in"] for c in report["per_asset"].values()) == expected_ticks
    assert report["ticks_in"] == expected_ticks + report["file_rows_rejected"]
    assert report["rejected"]["unknown_asset"] == file.rejected["unknown_asset"]
    for asset in assets:
        venues = file.venues(asset)
        assert set(bars.frames[asset]) == {"consensus", *venues}
        for venue in venues:
            # Each venue bar becomes that provider's bar, unless all its ticks were screened
            # out (a quote frozen while the others moved: kraken's thin BTC/USDT book).
            n = int(((file.bars["asset"] == asset) & (file.bars["venue"] == venue)).sum())
            assert 0.99 * n <= len(bars.frames[asset][venue]) <= n, (asset, venue)
    assert report["bars"] == sum(len(bars.frames[a]["consensus"]) for a in assets) - report["imputed"]
    assert report["ticks_per_s"] > 0 and report["settle_s"] >= 0


def test_actor_messages(baseline: Any, make_settings: Callable[..., Any],
                        redis_url: str, day_slice: Path) -> None:
    settings = make_settings()
    run_ingest(settings, IngestPlan("replay", ("BTC-USD",), path=day_slice))
    handle = _handle("BTC-USD")
    st = ray.get(handle.status.remote())
    assert st["asset"] == "BTC-USD" and st["stream"] == stream_key(settings, "BTC-USD")
    assert st["pid"] == ray.get(handle.pid.remote()) and st["node_id"] == ray.get(handle.node_id.remote())
    assert st["features_pending"] == 0 and st["store_writer"]["pending"] == 0
    assert st["counts"]["bars"] == baseline.report["per_asset"]["BTC-USD"]["bars"]
    recent = ray.get(handle.recent_bars.remote(-1))
    assert len(recent) > 100 and recent["ts"].is_monotonic_increasing
    assert ray.get(handle.gaps.remote()).columns.tolist() == ["start", "end", "missing_minutes", "method", "filled"]
    with pytest.raises(ray.exceptions.RayTaskError, match="keep_tick_status"):
        ray.get(handle.tick_statuses.remote())
    # The stream is trimmed up to the checkpointed entry; online features are published.
    client = connect(redis_url)
    assert client.xlen(stream_key(settings, "BTC-USD")) <= 1
    features = client.hgetall("features:BTC-USD")
    assert features and int(features[b"bar_ts"]) >= int(recent["ts"].iloc[-1])
    # The bar's close is published with its row (servers quote predictions against it).
    bar = recent.loc[recent["ts"] == int(features[b"bar_ts"])]
    assert len(bar) == 1 and float(features[b"close"]) == float(bar["close"].iloc[0])
    # Same settings: the live actor is reused, not replaced.
    same = get_or_create_shards(settings, redis_url, ("BTC-USD",)).ref("BTC-USD")
    assert ray.get(same.pid.remote()) == st["pid"]
    assert st["shard"] == same.shard_name


def test_sigkill_mid_replay_loses_nothing(baseline: Any, make_settings: Callable[..., Any],
                                          day_slice: Path, tmp_path: Path, read_bars: Callable[..., Any]) -> None:
    # Checkpoints every 0.2 s (default 60 s), so the kill lands after several: the new
    # incarnation resumes from a checkpoint, not from the start of the stream.
    settings = make_settings("shards.checkpoint_every_s=0.2")
    killed: dict[str, int] = {}

    def strike(entries: int) -> None:
        if entries == STRIKE_AT_ENTRY and not killed:
            handle = _handle("BTC-USD")
            deadline = time.monotonic() + 30
            while ray.get(handle.status.remote())["batches"] < 5 and time.monotonic() < deadline:
                time.sleep(0.05)  # strike once the actor has state worth losing
            killed["pid"] = ray.get(handle.pid.remote())
            os.kill(killed["pid"], signal.SIGKILL)

    report = run_ingest(settings, IngestPlan("replay", baseline.assets, path=day_slice, speed=DRILL_SPEED),
                        hooks=IngestHooks(on_entry=strike))
    assert killed, "the drill did not strike"
    st = ray.get(_handle("BTC-USD").status.remote())
    assert st["pid"] != killed["pid"] and st["restored"], "a new incarnation resumed from its checkpoint"
    read_bars(tmp_path, baseline.assets).assert_equal(baseline.bars)
    _same_counts(report, baseline.report)


def test_redis_outage_mid_replay_loses_nothing(baseline: Any, make_settings: Callable[..., Any],
                                               embedded_redis: EmbeddedRedis | None, day_slice: Path,
                                               tmp_path: Path, read_bars: Callable[..., Any]) -> None:
    if embedded_redis is None:
        pytest.skip("needs the embedded Redis (REDIS_URL points to an external server)")
    settings = make_settings()
    restart = threading.Timer(10.0, embedded_redis.restart)
    outage: dict[str, float] = {}

    def strike(entries: int) -> None:
        if entries == STRIKE_AT_ENTRY and not outage:
            outage["t"] = time.monotonic()
            embedded_redis.stop()
            restart.start()

    try:
        report = run_ingest(settings, IngestPlan("replay", baseline.assets, path=day_slice, speed=DRILL_SPEED),
                            hooks=IngestHooks(on_entry=strike))
    finally:
        if restart.is_alive():
            restart.join()
        if embedded_redis.process is None:
            embedded_redis.restart()
    assert outage and time.monotonic() - outage["t"] >= 10.0
    st = ray.get(_handle("BTC-USD").status.remote())
    assert st["read_errors"] > 0, "the actor saw the outage"
    read_bars(tmp_path, baseline.assets).assert_equal(baseline.bars)
    _same_counts(report, baseline.report)


def _bad_file(path: Path) -> Path:
    """Good kraken/coinbase BTC/USD minutes mixed with every kind of bad row, gzip cut short."""
    rows = ["timestamp_utc,venue,symbol,open,high,low,close,volume,trades"]
    for m in range(120):
        if 50 <= m < 53:
            continue  # both venues silent: a 3-minute gap (interpolated)
        ts = f"2023-03-01T{m // 60:02d}:{m % 60:02d}:00Z"
        p = 23000.0 + m
        rows.append(f"{ts},kraken,BTC/USD,{p},{p + 3},{p - 3},{p + 1},0.5,4")
        rows.append(f"{ts},coinbase,BTC/USD,{p + 0.5},{p + 3},{p - 3},{p + 1.5},0.7,")
        if m == 10:
            rows.append("this,row,has,too,few,columns")
        if m == 11:
            rows.append(f"{ts},bitstamp,BTC/USD,abc,{p},{p},{p},1,1")  # wrong type
        if m == 12:
            rows.append(f"{ts},kraken,FOO/BAR,1,1,1,1,1,1")  # unknown symbol
        if m == 13:
            rows.append(f"{ts},bitstamp,BTC/USD,,{p},{p},{p},1,1")  # null price
        if m == 14:
            rows.append(f"{ts},bitstamp,BTC/USD,-5,{p},{p},{p},1,1")  # non-positive
        if m == 15:
            rows.append(f"not-a-time,bitstamp,BTC/USD,{p},{p},{p},{p},1,1")
    data = gzip.compress(("\n".join(rows) + "\n").encode())
    path.write_bytes(data[: len(data) - 40])  # the transfer broke off near the end
    return path


def test_bad_input_end_to_end(make_settings: Callable[..., Any], redis_url: str, tmp_path: Path,
                              ray_session: None, read_bars: Callable[..., Any]) -> None:
    settings = make_settings("assets=[BTC-USD]")
    path = _bad_file(tmp_path / "bad.csv.gz")
    report = run_ingest(settings, IngestPlan("replay", ("BTC-USD",), path=path))
    rejected = report["rejected"]
    assert rejected["truncated"] == 1 and rejected["unknown_asset"] == 1
    assert rejected["malformed"] == 3 and rejected["null"] == 1 and rejected["non_positive"] == 1
    good = read_bar_file(path, ("BTC-USD",)).bars
    assert 100 < len(good) < 2 * 117  # the cut cost the tail, nothing before it
    stored = read_bars(tmp_path, ("BTC-USD",)).frames["BTC-USD"]
    for venue in ("kraken", "coinbase"):
        assert len(stored[venue]) == int((good["venue"] == venue).sum())
    cons = stored["consensus"]
    assert (cons["imputed"] == "interpolate").sum() == 3
    audit = ray.get(_handle("BTC-USD").gaps.remote())
    assert audit["method"].tolist() == ["interpolate"] and audit["missing_minutes"].tolist() == [3.0]

    # A feed handler writes garbage into the ingress stream: counted, the actor carries on.
    client = connect(redis_url)
    key = stream_key(settings, "BTC-USD")
    before = ray.get(_handle("BTC-USD").status.remote())["counts"]["rejected"].get("malformed", 0)
    eid = client.xadd(key, {b"v": b"1", b"fmt": b"arrow", b"data": b"\x00garbage"}).decode()
    st = ray.get(_handle("BTC-USD").wait_until.remote(eid, 30.0))
    assert st["reached"] and st["counts"]["rejected"]["malformed"] == before + 1


def test_unknown_asset_actor_is_refused(make_settings: Callable[..., Any], redis_url: str,
                                        ray_session: None) -> None:
    with pytest.raises(Exception, match="DOGE-USD"):
        get_or_create_shards(make_settings(), redis_url, ("DOGE-USD",), timeout_s=20)
    assert shard_for("DOGE-USD") is None


def test_assets_move_between_shards_with_their_state(baseline: Any, make_settings: Callable[..., Any],
                                                     redis_url: str, day_slice: Path, tmp_path: Path,
                                                     read_bars: Callable[..., Any]) -> None:
    """Half the day on one shard, then the shard count changes and the assets move: each new
    owner loads the assets' checkpoints and the bars equal the undisturbed run's."""
    from actors.feeder import StreamFeeder
    from tickcast.ingest import open_replay

    settings = make_settings("shards.count=1")
    source = open_replay(day_slice, baseline.assets, settings.assets, settings.ingest.batch_max_ticks)
    batches = [b for b in source.batches if len(b)]
    first = get_or_create_shards(settings, redis_url, baseline.assets)
    assert set(first.owners.values()) == {"shard:0"}
    feeder = StreamFeeder(connect(redis_url), settings, tmp_path / "wal" / "feeder.wal", baseline.assets)

    def feed(part: list[Any], refs: dict[str, Any]) -> None:
        for batch in part:
            feeder.add(batch)
        feeder.flush()
        for asset, eid in feeder.last_ids.items():
            assert ray.get(refs[asset].wait_until.remote(eid, 300.0))["reached"], asset

    half = len(batches) // 2
    feed(batches[:half], first.refs())
    moved = get_or_create_shards(settings.with_overrides(**{"shards.count": 3}), redis_url,
                                 baseline.assets)
    assert set(moved.owners.values()) == {"shard:0", "shard:2"}  # rendezvous over three shards
    refs = moved.refs()
    assert all(ray.get(r.status.remote())["restored"] for r in refs.values())
    feed(batches[half:], refs)
    ray.get([r.flush.remote() for r in refs.values()])
    assert all(s["reached"] for s in ray.get([r.wait_settled.remote(300.0) for r in refs.values()]))
    read_bars(tmp_path, baseline.assets).assert_equal(baseline.bars)
