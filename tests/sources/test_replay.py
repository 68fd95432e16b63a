"""Replay of bar files: reading (good and bad input), tick expansion, batching."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tickcast.errors import InvalidInput
from tickcast.sources.replay import (
    ReplayFile,
    expand_bars_to_ticks,
    iter_replay_batches,
    read_bar_file,
)
from tickcast.ticks import NS_PER_MIN, NS_PER_S, TickBatch

HEADER = "timestamp_utc,venue,symbol,open,high,low,close,volume,trades\n"
GOOD_ROWS = [
    "2023-03-01T00:00:00Z,kraken,BTC/USD,100,101,99,100.5,2.5,12\n",
    "2023-03-01T00:00:00Z,coinbase,BTC/USD,100.1,101.2,99.5,100.4,7.25,\n",
    "2023-03-01T00:01:00Z,kraken,BTC/USD,100.5,100.5,100.5,100.5,0,\n",
    "2023-03-01T00:01:00Z,coinbase,ETH/USD,10,11,9,10,1,3\n",
]

README_COUNTS = {
    ("BTC-USD", "binanceus"): 12_960, ("BTC-USD", "coinbase"): 12_674,
    ("BTC-USD", "kraken"): 12_912, ("BTC-USDT", "binanceus"): 12_960,
    ("BTC-USDT", "coinbase"): 9_561, ("BTC-USDT", "kraken"): 7_428,
    ("BTC-USDC", "binanceus"): 12_960, ("BTC-USDC", "bybit"): 12_892,
    ("BTC-USDC", "kraken"): 4_930, ("USDT-USD", "coinbase"): 12_650,
    ("USDT-USD", "kraken"): 12_718, ("USDC-USD", "kraken"): 7_084,
    ("USDC-USDT", "binanceus"): 12_960,
}


def write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def rebuild_bars(ticks: TickBatch) -> pd.DataFrame:
    """1-minute OHLCV per provider from ticks, by a plain groupby."""
    df = pd.DataFrame({
        "venue": ticks.provider_names(),
        "ts": ticks.ts_event - ticks.ts_event % NS_PER_MIN,
        "price": ticks.price,
        "size": ticks.size,
    })
    g = df.groupby(["ts", "venue"], sort=True)
    out = g.agg(open=("price", "first"), high=("price", "max"), low=("price", "min"),
                close=("price", "last"), volume=("size", "sum")).reset_index()
    return out


def assert_invariant(r: ReplayFile) -> None:
    lost = sum(v for k, v in r.rejected.items() if k != "truncated")
    assert r.rows_in == len(r.bars) + lost


# ---------------------------------------------------------------- reading good input


def test_reads_plain_and_gzip_identically(tmp_path: Path) -> None:
    plain = read_bar_file(write(tmp_path / "b.csv", HEADER + "".join(GOOD_ROWS)))
    gz = read_bar_file(write(tmp_path / "b.csv.gz", HEADER + "".join(GOOD_ROWS), gz=True))
    pd.testing.assert_frame_equal(plain.bars, gz.bars)
    assert plain.rows_in == 4 and plain.rejected == {}
    bars = plain.bars
    assert list(bars.columns) == ["ts", "venue", "asset", "open", "high", "low", "close",
                                  "volume", "trades"]
    assert bars["ts"].dtype == np.int64
    assert bars["ts"].iloc[0] == pd.Timestamp("2023-03-01T00:00:00Z").value
    assert set(bars["asset"]) == {"BTC-USD", "ETH-USD"}
    # Blank trades -> NaN; the sort is (ts, venue, asset).
    assert bars["venue"].tolist()[:2] == ["coinbase", "kraken"]
    assert np.isnan(bars["trades"].iloc[0]) and bars["trades"].iloc[1] == 12


def test_other_iso_timestamp_spellings_are_accepted(tmp_path: Path) -> None:
    rows = [
        "2023-03-01 00:02:00,kraken,BTC/USD,1,1,1,1,1,\n",  # naive means UTC
        "2023-03-01T01:03:00+01:00,kraken,BTC/USD,1,1,1,1,1,\n",  # = 00:03 UTC
        "2023-03-01T00:04:00.000Z,kraken,BTC/USD,1,1,1,1,1,\n",
    ]
    r = read_bar_file(write(tmp_path / "t.csv", HEADER + "".join(rows)))
    assert r.rejected == {}
    base = pd.Timestamp("2023-03-01T00:00:00Z").value
    assert ((r.bars["ts"] - base) // NS_PER_MIN).tolist() == [2, 3, 4]


def test_shared_file_rows_and_venue_counts(shared_data_file: Path) -> None:
    r = read_bar_file(shared_data_file)
    assert r.rows_in == 144_689 and len(r.bars) == 144_689 and r.rejected == {}
    counts = r.bars.groupby(["asset", "venue"]).size().to_dict()
    assert counts == README_COUNTS
    first, last = r.bars["ts"].min(), r.bars["ts"].max()
    assert first == pd.Timestamp("2023-03-01T00:00:00Z").value
    assert last == pd.Timestamp("2023-03-09T23:59:00Z").value
    # Binance.US writes every minute of the 9 days.
    assert r.venues("BTC-USD") == ("binanceus", "coinbase", "kraken")


def test_assets_filter_counts_the_rest_as_unknown(shared_data_file: Path) -> None:
    r = read_bar_file(shared_data_file, assets=("BTC-USD",))
    assert len(r.bars) == 12_960 + 12_674 + 12_912
    assert r.rejected == {"unknown_asset": 144_689 - len(r.bars)}
    assert r.assets == ("BTC-USD",)


# ---------------------------------------------------------------- bad input


def test_every_bad_row_is_counted_and_good_rows_kept(tmp_path: Path) -> None:
    bad = [
        "2023-03-01T00:00:00Z,kraken,BTC/USD,100,101,99\n",  # too few columns
        "2023-03-01T00:00:00Z,kraken,BTC/USD,100,101,99,100,1,2,extra\n",  # too many
        "yesterday,kraken,BTC/USD,100,101,99,100,1,\n",  # unparseable timestamp
        "2023-03-01T00:00:30Z,kraken,BTC/USD,100,101,99,100,1,\n",  # not a minute open
        "2023-03-01T00:05:00Z,kraken,BTC/USD,abc,101,99,100,1,\n",  # text as price
        "2023-03-01T00:05:00Z,kraken,BTC/USD,100,101,99,100,lots,\n",  # text as volume
        "2023-03-01T00:05:00Z,kraken,BTC/USD,100,101,99,100,1,2.5\n",  # fractional trades
        "2023-03-01T00:05:00Z,,BTC/USD,100,101,99,100,1,\n",  # empty venue
        "2023-03-01T00:05:00Z,kraken,BTC/USD,100,99,98,100,1,\n",  # high < max(open, close)
        "2023-03-01T00:05:00Z,kraken,BTC/USD,100,101,100.5,100,1,\n",  # low > min(open, close)
        "2023-03-01T00:05:00Z,kraken,BTC/USD,100,101,99,100,-1,\n",  # negative volume
        "2023-03-01T00:06:00Z,kraken,BTC/USD,,101,99,100,1,\n",  # null open
        "2023-03-01T00:06:00Z,coinbase,BTC/USD,100,101,99,null,1,\n",  # null close
        "2023-03-01T00:07:00Z,kraken,BTC/USD,NaN,101,99,100,1,\n",  # NaN
        "2023-03-01T00:07:00Z,coinbase,BTC/USD,100,inf,99,100,1,\n",  # inf
        "2023-03-01T00:08:00Z,kraken,BTC/USD,0,101,0,100,1,\n",  # zero price
        "2023-03-01T00:08:00Z,coinbase,BTC/USD,-5,101,-6,100,1,\n",  # negative price
        "2023-03-01T00:09:00Z,kraken,DOGE/USD,1,1,1,1,1,\n",  # unknown asset
        "2023-03-01T00:00:00Z,kraken,BTC/USD,1,1,1,1,1,\n",  # repeats a kept (minute, venue)
    ]
    text = HEADER + GOOD_ROWS[0] + "".join(bad[:9]) + GOOD_ROWS[1] + "".join(bad[9:]) + GOOD_ROWS[2]
    for gz in (False, True):
        r = read_bar_file(write(tmp_path / f"bad{gz}.csv", text, gz=gz), assets=("BTC-USD",))
        assert r.rejected == {"malformed": 11, "null": 2, "non_finite": 2, "non_positive": 2,
                              "unknown_asset": 1, "duplicate": 1}
        assert r.rows_in == 3 + len(bad)
        assert_invariant(r)
        assert len(r.bars) == 3 and r.bars["open"].tolist() == [100.1, 100.0, 100.5]


def test_padded_numbers_are_read(tmp_path: Path) -> None:
    r = read_bar_file(write(tmp_path / "p.csv", HEADER + "2023-03-01T00:00:00Z,kraken,BTC/USD, 100 ,101,99,100, 2,\n"))
    assert r.rejected == {} and r.bars["open"].iloc[0] == 100.0 and r.bars["volume"].iloc[0] == 2.0


def test_invalid_utf8_costs_only_its_row(tmp_path: Path) -> None:
    body = (HEADER + GOOD_ROWS[0]).encode() + b"2023-03-01T00:00:00Z,kr\xffken,BTC/USD,1,1,1,1,1,\n"
    body += "".join(GOOD_ROWS[1:]).encode()
    r = read_bar_file(write(tmp_path / "u.csv", body))
    assert r.rejected == {"malformed": 1}
    assert len(r.bars) == 4
    assert_invariant(r)


@pytest.mark.parametrize("keep_fraction", [0.35, 0.6, 0.9])
def test_truncated_gzip_keeps_every_complete_row(tmp_path: Path, keep_fraction: float) -> None:
    rows = [f"2023-03-01T{m // 60:02d}:{m % 60:02d}:00Z,kraken,BTC/USD,{100 + m},{101 + m},"
            f"{99 + m},{100 + m},1.5,7\n" for m in range(600)]
    full = (HEADER + "".join(rows)).encode()
    gz = gzip.compress(full)
    path = write(tmp_path / "cut.csv.gz", gz[: int(len(gz) * keep_fraction)])
    r = read_bar_file(path)
    assert r.rejected == {"truncated": 1}
    assert 0 < len(r.bars) < 600
    assert_invariant(r)
    # The kept rows are exactly the first complete rows of the file.
    assert r.bars["open"].tolist() == [100.0 + m for m in range(len(r.bars))]
    # Every row whose line ended in the bytes that could be decompressed is kept.
    d = __import__("zlib").decompressobj(31)
    readable = d.decompress(gz[: int(len(gz) * keep_fraction)])
    assert len(r.bars) == readable.count(b"\n") - 1


def test_corrupt_gzip_block_keeps_rows_before(tmp_path: Path) -> None:
    rows = [f"2023-03-01T00:{m:02d}:00Z,kraken,BTC/USD,1,1,1,1,{m},\n" for m in range(60)]
    gz = bytearray(gzip.compress((HEADER + "".join(rows)).encode()))
    gz[-8] ^= 0xFF  # break the CRC trailer: the data decompresses but the check fails
    r = read_bar_file(write(tmp_path / "crc.csv.gz", bytes(gz)))
    assert r.rejected == {"truncated": 1}
    assert 0 < len(r.bars) <= 60
    assert r.bars["volume"].tolist() == list(range(len(r.bars)))
    assert_invariant(r)
    # Damage in the middle of the compressed data: no crash, the rows before survive.
    rows = [f"2023-03-01T{m // 60:02d}:{m % 60:02d}:00Z,kraken,BTC/USD,1,1,1,1,{m},\n"
            for m in range(1000)]
    gz = bytearray(gzip.compress((HEADER + "".join(rows)).encode()))
    gz[len(gz) // 2] ^= 0xFF
    r = read_bar_file(write(tmp_path / "mid.csv.gz", bytes(gz)))
    assert r.rejected.get("truncated") == 1
    assert len(r.bars) > 0 and r.bars["volume"].iloc[0] == 0
    assert_invariant(r)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv.gz"
    with pytest.raises(InvalidInput, match="nope.csv.gz") as info:
        read_bar_file(missing)
    assert info.value.status == 422


def test_directory_and_empty_and_headerless_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=str(tmp_path)):
        read_bar_file(tmp_path)
    with pytest.raises(InvalidInput, match="header"):
        read_bar_file(write(tmp_path / "empty.csv", ""))
    with pytest.raises(InvalidInput, match="volume") as info:
        read_bar_file(write(tmp_path / "h.csv", "timestamp_utc,venue,symbol,open,high,low,close\n"))
    assert info.value.field == "volume"


def test_trades_column_is_optional(tmp_path: Path) -> None:
    text = "timestamp_utc,venue,symbol,open,high,low,close,volume\n2023-03-01T00:00:00Z,kraken,BTC/USD,1,2,1,2,3\n"
    r = read_bar_file(write(tmp_path / "nt.csv", text))
    assert len(r.bars) == 1 and np.isnan(r.bars["trades"].iloc[0])


# ---------------------------------------------------------------- expansion


def test_expansion_rebuilds_every_venue_bar_exactly(shared_data_file: Path) -> None:
    r = read_bar_file(shared_data_file, assets=("BTC-USD",))
    ticks = expand_bars_to_ticks(r.bars, "BTC-USD")
    assert len(ticks) == 4 * len(r.bars)
    assert np.all(np.diff(ticks.ts_event) >= 0)
    rebuilt = rebuild_bars(ticks)
    want = r.bars.sort_values(["ts", "venue"]).reset_index(drop=True)
    for col in ("ts", "open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(rebuilt[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    # Volume is exact also when summed in tick order by plain float addition.
    first = ticks.take(ticks.provider == 0)
    sums = first.size.reshape(-1, 4)
    in_order = ((sums[:, 0] + sums[:, 1]) + sums[:, 2]) + sums[:, 3]
    np.testing.assert_array_equal(in_order, want.loc[want["venue"] == ticks.providers[0], "volume"])


def test_expansion_layout_seq_and_determinism() -> None:
    bars = pd.DataFrame({
        "ts": [0, 0, NS_PER_MIN, 5 * NS_PER_MIN],
        "venue": ["b", "a", "b", "b"],
        "asset": ["X-USD"] * 3 + ["Y-USD"],
        "open": [10.0, 10.0, 10.0, 1.0], "high": [10.5, 13.0, 10.0, 1.0],
        "low": [8.0, 9.9, 10.0, 1.0], "close": [10.2, 12.0, 10.0, 1.0],
        "volume": [0.3, 1.0, 0.0, 1.0],
    })
    t = expand_bars_to_ticks(bars, "X-USD")
    again = expand_bars_to_ticks(bars, "X-USD")
    for name, col in t.columns().items():
        np.testing.assert_array_equal(col, getattr(again, name))
    assert t.providers == ("a", "b")
    a, b = t.take(t.provider == 0), t.take(t.provider == 1)
    assert a.price.tolist() == [10.0, 9.9, 13.0, 12.0]  # low nearer the open -> low first
    assert b.price[:4].tolist() == [10.0, 10.5, 8.0, 10.2]  # high nearer -> high first
    assert (b.ts_event[:4] // NS_PER_S).tolist() == [0, 20, 40, 59]
    assert b.seq.tolist() == list(range(8)) and a.seq.tolist() == list(range(4))
    assert b.size[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # zero-volume bar
    assert np.isnan(t.bid).all() and np.isnan(t.ask).all()
    np.testing.assert_array_equal(t.ts_init, t.ts_event)
    assert len(expand_bars_to_ticks(bars, "Z-USD")) == 0
    with pytest.raises(ValueError, match="volume"):
        expand_bars_to_ticks(bars.drop(columns=["volume"]), "X-USD")


def test_volume_split_is_exact_for_awkward_values() -> None:
    rng = np.random.default_rng(7)
    vols = np.concatenate([rng.lognormal(0, 3, 5000), [1e-300, 5e-324, 1e300, 0.1, 1 / 3]])
    bars = pd.DataFrame({"ts": np.arange(len(vols)) * NS_PER_MIN, "venue": "v", "asset": "A",
                         "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": vols})
    s = expand_bars_to_ticks(bars, "A").size.reshape(-1, 4)
    np.testing.assert_array_equal(((s[:, 0] + s[:, 1]) + s[:, 2]) + s[:, 3], vols)
    assert (s >= 0).all()


def test_replay_batches_are_bounded_and_in_event_order(tmp_path: Path) -> None:
    r = read_bar_file(write(tmp_path / "b.csv", HEADER + "".join(GOOD_ROWS)))
    batches = list(iter_replay_batches(r, "BTC-USD", batch_max_ticks=5))
    assert [len(b) for b in batches] == [5, 5, 2]
    merged = TickBatch.concat(batches)
    full = expand_bars_to_ticks(r.bars, "BTC-USD")
    np.testing.assert_array_equal(merged.ts_event, full.ts_event)
    np.testing.assert_array_equal(merged.price, full.price)
    assert np.all(np.diff(merged.ts_event) >= 0)
    assert list(iter_replay_batches(r, "SOL-USD", 5)) == []
    with pytest.raises(ValueError, match="batch_max_ticks"):
        next(iter_replay_batches(r, "BTC-USD", 0))
