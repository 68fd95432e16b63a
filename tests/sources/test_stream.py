"""The ingress codec: exact round trips, every malformed case, the JSON form, real Redis."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pytest
import redis

from tickcast.config import SimulatorConfig
from tickcast.errors import TickStatus
from tickcast.sources.simulator import MarketSimulator
from tickcast.sources.stream import (
    ARROW_SCHEMA,
    UNKNOWN_PROVIDER,
    decode_entry,
    encode_batch,
    stream_key,
)
from tickcast.ticks import TickBatch

DOC = Path(__file__).resolve().parents[2] / "docs" / "ingress.md"
T0 = 1_704_067_200_000_000_000
MAL, NUL, OK = int(TickStatus.MALFORMED), int(TickStatus.NULL), int(TickStatus.OK)


@pytest.fixture(scope="module")
def sim_batch() -> TickBatch:
    """Simulated ticks with nulls, NaN, inf, non-positive prices, quotes and sequence numbers."""
    sim = MarketSimulator(SimulatorConfig(anomaly_rate=0.2, batch_s=60), ("BTC-USD",), seed=5)
    batch = TickBatch.concat(list(sim.run(3)))
    assert {"null", "ok"} <= set(batch.status_counts())
    assert np.isinf(batch.price).any() and (batch.price <= 0).any()
    return batch


def assert_same_ticks(a: TickBatch, b: TickBatch) -> None:
    assert a.asset == b.asset and len(a) == len(b)
    assert a.provider_names().tolist() == b.provider_names().tolist()
    for name in ("ts_event", "ts_init", "price", "size", "bid", "ask", "seq", "status"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)  # NaN == NaN here


def arrow_entry(columns: dict[str, pa.Array], asset: str = "BTC-USD") -> dict[bytes, bytes]:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return {b"v": b"1", b"fmt": b"arrow", b"asset": asset.encode(), b"n": str(table.num_rows).encode(),
            b"data": sink.getvalue().to_pybytes()}


def json_entry(rows: object, asset: str = "BTC-USD") -> dict[str, str]:
    return {"v": "1", "fmt": "json", "asset": asset, "data": json.dumps(rows)}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["arrow", "json"])
def test_round_trip_is_exact(sim_batch: TickBatch, fmt: str) -> None:
    fields = encode_batch(sim_batch, fmt)
    assert fields["v"] == b"1" and fields["fmt"] == fmt.encode() and fields["asset"] == b"BTC-USD"
    assert fields["n"] == str(len(sim_batch)).encode()
    assert all(isinstance(v, bytes) for v in fields.values())
    out = decode_entry(fields)
    assert_same_ticks(sim_batch, out)
    assert out.meta == {}


def test_arrow_payload_has_the_documented_schema(sim_batch: TickBatch) -> None:
    data = encode_batch(sim_batch)["data"]
    table = pa.ipc.open_stream(data).read_all()
    assert table.schema.equals(ARROW_SCHEMA)
    assert table.column("price").null_count == int((sim_batch.status == NUL).sum())


def test_empty_batch_round_trips() -> None:
    empty = TickBatch.empty("ETH-USD")
    for fmt in ("arrow", "json"):
        out = decode_entry(encode_batch(empty, fmt))
        assert len(out) == 0 and out.asset == "ETH-USD" and out.meta == {}


def test_json_entry_written_by_hand() -> None:
    rows = [
        {"provider": "kraken", "ts_event": "2024-01-01T00:00:00.250Z", "price": "42000.5",
         "size": 0.01, "bid": 42000.4, "ask": 42000.6, "seq": 981},
        {"provider": "coinbase", "ts_event": T0 + 400_000_000, "price": 42001, "size": "0.5",
         "ts_init": "2024-01-01T00:00:00.450000001"},
        {"provider": "bybit", "ts_event": float(T0 + 500_000_000), "price": None, "size": 0.2},
        {"provider": "bybit", "ts_event": str(T0 + 600_000_000), "size": 0.2},  # price absent
    ]
    out = decode_entry(json_entry(rows), received_ns=T0 + 10**9)
    assert out.provider_names().tolist() == ["kraken", "coinbase", "bybit", "bybit"]
    assert out.ts_event.tolist() == [T0 + 250_000_000, T0 + 400_000_000, T0 + 500_000_000, T0 + 600_000_000]
    assert out.ts_init.tolist() == [T0 + 10**9, T0 + 450_000_001, T0 + 10**9, T0 + 10**9]
    assert out.price[:2].tolist() == [42000.5, 42001.0] and np.isnan(out.price[2:]).all()
    assert out.status.tolist() == [OK, OK, NUL, NUL]
    assert out.seq.tolist() == [981, -1, -1, -1] and out.bid[0] == 42000.4 and np.isnan(out.ask[1])


# ---------------------------------------------------------------- whole-entry failures


@pytest.mark.parametrize(("fields", "needle"), [
    ({b"v": b"2", b"fmt": b"arrow", b"asset": b"BTC-USD", b"data": b""}, "v: unsupported"),
    ({b"fmt": b"arrow", b"asset": b"BTC-USD", b"data": b""}, "v: unsupported"),
    ({b"v": b"1", b"fmt": b"parquet", b"asset": b"BTC-USD", b"data": b"x"}, "fmt: unsupported"),
    ({b"v": b"1", b"fmt": b"arrow", b"asset": b"BTC-USD"}, "data: missing"),
    ({b"v": b"1", b"fmt": b"arrow", b"asset": b"BTC-USD", b"data": b"\x00garbage\xff" * 20}, "data: undecodable"),
    ({b"v": b"\xff\xfe", b"fmt": b"arrow", b"data": b""}, "v: unsupported"),
    ({"v": "1", "fmt": "json", "asset": "BTC-USD", "data": "{not json"}, "data: invalid JSON"),
    ({"v": "1", "fmt": "json", "asset": "BTC-USD", "data": '{"provider": "x"}'}, "expected a JSON array"),
    ({"v": "1", "fmt": "json", "asset": "BTC-USD", "data": b"\xff\xfe[]"}, "data: invalid JSON"),
])
def test_unreadable_entries_become_one_malformed_row(fields: dict, needle: str) -> None:
    out = decode_entry(fields, received_ns=T0)
    assert len(out) == 1 and out.status.tolist() == [MAL]
    assert needle in out.meta["error"]
    assert out.ts_init.tolist() == [T0] and out.provider_names().tolist() == [UNKNOWN_PROVIDER]


def test_non_mapping_fields_do_not_raise() -> None:
    out = decode_entry([("v", "1")], asset="BTC-USD")  # type: ignore[arg-type]
    assert out.status.tolist() == [MAL] and out.asset == "BTC-USD"


def test_truncated_arrow_bytes_are_malformed(sim_batch: TickBatch) -> None:
    fields = encode_batch(sim_batch)
    fields["data"] = fields["data"][: len(fields["data"]) // 2]
    out = decode_entry(fields)
    assert out.status.tolist() == [MAL] and "undecodable" in out.meta["error"]


# ---------------------------------------------------------------- per-row judgement (Arrow)


def good_columns(n: int = 4) -> dict[str, pa.Array]:
    return {
        "provider": pa.array(["kraken", "coinbase", "kraken", "bybit"][:n]),
        "ts_event": pa.array([T0 + i for i in range(n)], pa.int64()),
        "price": pa.array([100.0, 100.5, 101.0, 99.5][:n]),
        "size": pa.array([1.0, 2.0, 3.0, 4.0][:n]),
    }


def test_arrow_rows_are_judged_one_by_one() -> None:
    cols = good_columns()
    cols["provider"] = pa.array(["kraken", None, " ", "bybit"])
    cols["price"] = pa.array([100.0, 100.5, None, None])
    cols["size"] = pa.array([1.0, 2.0, 3.0, None])
    cols["ts_event"] = pa.array([T0, T0 + 1, T0 + 2, None], pa.int64())
    out = decode_entry(arrow_entry(cols), received_ns=T0 + 99)
    assert out.status.tolist() == [OK, MAL, MAL, MAL]
    assert out.provider_names().tolist() == ["kraken", UNKNOWN_PROVIDER, UNKNOWN_PROVIDER, "bybit"]
    errors = json.loads(out.meta["errors"])
    assert any(e.startswith("provider:") for e in errors)
    assert any(e.startswith("size:") for e in errors) and any(e.startswith("ts_event:") for e in errors)
    # Optional columns absent: defaults; ts_init is the receive time.
    assert out.seq.tolist() == [-1] * 4 and np.isnan(out.bid).all()
    assert out.ts_init.tolist() == [T0 + 99] * 4
    # A null price alone is NULL, not MALFORMED.
    cols = good_columns()
    cols["price"] = pa.array([None, 1.0, float("nan"), -1.0])
    out = decode_entry(arrow_entry(cols))
    assert out.status.tolist() == [NUL, OK, OK, OK]  # NaN / negative: later stages judge them
    assert "errors" not in out.meta


@pytest.mark.parametrize("missing", ["provider", "ts_event", "price", "size"])
def test_missing_required_column_makes_every_row_malformed(missing: str) -> None:
    cols = good_columns()
    del cols[missing]
    out = decode_entry(arrow_entry(cols))
    assert len(out) == 4 and (out.status == MAL).all()
    assert f"{missing}: column missing" in json.loads(out.meta["errors"])[0]


@pytest.mark.parametrize(("column", "array"), [
    ("price", pa.array(["100", "101", "102", "103"])),
    ("size", pa.array([True, False, True, True])),
    ("provider", pa.array([1, 2, 3, 4])),
    ("ts_event", pa.array(["a", "b", "c", "d"])),
])
def test_wrong_column_type_makes_every_row_malformed(column: str, array: pa.Array) -> None:
    cols = good_columns()
    cols[column] = array
    out = decode_entry(arrow_entry(cols))
    assert (out.status == MAL).all()
    assert any(e.startswith(f"{column}: column has type") for e in json.loads(out.meta["errors"]))


def test_other_numeric_widths_and_timestamps_are_cast() -> None:
    cols = good_columns()
    cols["price"] = pa.array([100.0, 100.5, 101.0, 99.5], pa.float32())
    cols["size"] = pa.array([1, 2, 3, 4], pa.int32())
    cols["seq"] = pa.array([5, None, 7, 8], pa.uint32())
    cols["ts_event"] = pa.array([T0 // 1000 + i for i in range(4)], pa.timestamp("us", tz="UTC"))
    cols["provider"] = pa.array(["kraken", "coinbase", "kraken", "bybit"]).dictionary_encode()
    cols["ts_init"] = pa.array([float(T0), None, 2.0 * T0, 3.5], pa.float64())
    out = decode_entry(arrow_entry(cols))
    assert out.ts_event.tolist() == [T0 + 1000 * i for i in range(4)]
    assert out.size.tolist() == [1.0, 2.0, 3.0, 4.0] and out.seq.tolist() == [5, -1, 7, 8]
    assert out.provider_names().tolist() == ["kraken", "coinbase", "kraken", "bybit"]
    # A fractional ns time cannot be right: that row only is malformed.
    assert out.status.tolist() == [OK, OK, OK, MAL]
    assert out.ts_init[:3].tolist() == [T0, out.ts_event[1], 2 * T0]


# ---------------------------------------------------------------- per-row judgement (JSON)


def test_json_bad_rows_get_reason_codes_and_good_rows_stay() -> None:
    rows = [
        {"provider": "kraken", "ts_event": T0, "price": 100.0, "size": 1.0},  # good
        {"provider": "kraken", "ts_event": T0 + 1, "price": True, "size": 1.0},
        {"provider": "kraken", "ts_event": T0 + 2, "price": "abc", "size": 1.0},
        {"ts_event": T0 + 3, "price": 100.0, "size": 1.0},
        {"provider": "", "ts_event": T0 + 4, "price": 100.0, "size": 1.0},
        {"provider": "kraken", "ts_event": "not a time", "price": 100.0, "size": 1.0},
        {"provider": "kraken", "price": 100.0, "size": 1.0},
        {"provider": "kraken", "ts_event": T0 + 7, "price": 100.0},
        {"provider": "kraken", "ts_event": T0 + 8, "price": 100.0, "size": [1]},
        {"provider": "kraken", "ts_event": T0 + 9, "price": 100.0, "size": 1.0, "seq": -4},
        {"provider": "kraken", "ts_event": T0 + 10, "price": 100.0, "size": 1.0, "bid": "x"},
        {"provider": "kraken", "ts_event": 1.5, "price": 100.0, "size": 1.0},
        {"provider": "kraken", "ts_event": 2**70, "price": 100.0, "size": 1.0},
        "not an object",
        {"provider": "bybit", "ts_event": T0 + 14, "price": None, "size": 2.0},  # NULL
        {"provider": "bybit", "ts_event": T0 + 15, "price": 101.0, "size": 2.0, "seq": 3},  # good
    ]
    out = decode_entry(json_entry(rows))
    assert out.status.tolist() == [OK] + [MAL] * 13 + [NUL, OK]
    assert out.price[0] == 100.0 and out.price[-1] == 101.0 and out.seq[-1] == 3
    errors = json.loads(out.meta["errors"])
    assert len(errors) == 13
    for row, field in [(1, "price"), (2, "price"), (3, "provider"), (4, "provider"),
                       (5, "ts_event"), (6, "ts_event"), (7, "size"), (8, "size"), (9, "seq"),
                       (10, "bid"), (11, "ts_event"), (12, "ts_event"), (13, "row")]:
        assert errors[row - 1].startswith(f"row {row}: {field}:"), errors[row - 1]


def test_many_bad_rows_are_summarised() -> None:
    rows = [{"provider": "k", "ts_event": "x", "size": 1}] * 50
    out = decode_entry(json_entry(rows))
    errors = json.loads(out.meta["errors"])
    assert (out.status == MAL).all() and len(errors) == 21 and errors[-1] == "... 30 more"


# ---------------------------------------------------------------- asset and count checks


def test_asset_of_the_stream_wins(sim_batch: TickBatch) -> None:
    fields = encode_batch(sim_batch.take(np.arange(10)))
    wrong = decode_entry(fields, asset="ETH-USD")
    assert wrong.asset == "ETH-USD" and (wrong.status == MAL).all()
    assert "asset" in wrong.meta["error"]
    fields.pop("asset")
    assert decode_entry(fields, asset="BTC-USD").asset == "BTC-USD"
    assert (decode_entry(fields, asset="BTC-USD").status != MAL).all()


def test_count_mismatch_is_noted_rows_kept(sim_batch: TickBatch) -> None:
    fields = encode_batch(sim_batch.take(np.arange(10)))
    fields["n"] = b"11"
    out = decode_entry(fields)
    assert len(out) == 10 and "n:" in out.meta["warning"]


# ---------------------------------------------------------------- real Redis and the docs


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    # A database of our own on the session server, so no other test's streams are touched.
    url = re.sub(r"/\d+$", "", redis_url) + "/9"
    c = redis.Redis.from_url(url)
    yield c
    c.flushdb()
    c.close()


def test_entries_through_real_redis_streams(client: redis.Redis, sim_batch: TickBatch) -> None:
    key = stream_key("BTC-USD", prefix="test-ticks:")
    assert key == "test-ticks:BTC-USD"
    for fmt in ("arrow", "json"):
        client.xadd(key, encode_batch(sim_batch, fmt))
    entries = client.xrange(key)
    assert len(entries) == 2
    for _id, fields in entries:
        assert_same_ticks(sim_batch, decode_entry(fields, asset="BTC-USD"))


def test_documented_examples_work(client: redis.Redis) -> None:
    doc = DOC.read_text()
    cli = re.search(r"```sh\n(redis-cli .*?)\n```", doc, re.S).group(1)
    args = shlex.split(cli)[1:]
    assert args[:2] == ["XADD", "ticks:BTC-USD"]
    client.execute_command(*args)
    (_id, fields), = client.xrange("ticks:BTC-USD")
    out = decode_entry(fields, asset="BTC-USD")
    assert out.provider_names().tolist() == ["kraken", "coinbase", "bybit"]
    assert out.status.tolist() == [OK, OK, NUL] and out.price[0] == 42000.5 and out.seq[0] == 981
    assert "warning" not in out.meta and "errors" not in out.meta

    code = re.search(r"```python\n(.*?)\n```", doc, re.S).group(1)
    url = client.connection_pool.connection_kwargs
    code = code.replace("redis://127.0.0.1:6379/0", f"redis://{url['host']}:{url['port']}/{url['db']}")
    namespace: dict[str, object] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    (_id1, _), (_id2, fields) = client.xrange("ticks:BTC-USD")
    out = decode_entry(fields, asset="BTC-USD")
    assert_same_ticks(namespace["batch"], out)  # type: ignore[arg-type]
    namespace["client"].close()  # type: ignore[union-attr]
