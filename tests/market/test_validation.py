"""Reason-coded validation of ticks."""

from __future__ import annotations

import numpy as np
import pytest

from tickcast.config import ValidationConfig
from tickcast.errors import TickStatus
from tickcast.market.validation import reason_codes, validate
from tickcast.ticks import NS_PER_S, TickBatch

T0 = 1_700_000_000 * NS_PER_S
NAN, INF = float("nan"), float("inf")


def _batch(**over: object) -> TickBatch:
    """Valid ticks (as many as ``price`` has) with the given columns overridden."""
    n = len(over.get("price", [100.0]))  # type: ignore[arg-type]
    cols: dict[str, object] = dict(ts_event=[T0] * n, price=[100.0] * n, size=[1.0] * n,
                                   bid=[99.0] * n, ask=[101.0] * n)
    cols.update(over)
    return TickBatch.from_columns(str(cols.pop("asset", "BTC-USD")), ["kraken"] * n, **cols)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({}, TickStatus.OK),
        ({"price": [NAN]}, TickStatus.NON_FINITE),
        ({"price": [INF]}, TickStatus.NON_FINITE),
        ({"price": [-INF]}, TickStatus.NON_FINITE),
        ({"price": [0.0]}, TickStatus.NON_POSITIVE),
        ({"price": [-3.0]}, TickStatus.NON_POSITIVE),
        ({"bid": [102.0]}, TickStatus.CROSSED),
        ({"bid": [INF]}, TickStatus.NON_FINITE),
        ({"ask": [0.0]}, TickStatus.NON_POSITIVE),
        ({"bid": [NAN], "ask": [NAN]}, TickStatus.OK),  # no quote is fine
        ({"bid": [NAN]}, TickStatus.OK),  # one-sided quote cannot be crossed
        ({"size": [-1.0]}, TickStatus.MALFORMED),
        ({"size": [NAN]}, TickStatus.MALFORMED),
        ({"size": [0.0]}, TickStatus.OK),  # zero-size ticks carry a price (venue repeats)
        ({"size": [1e13]}, TickStatus.MALFORMED),
        ({"price": [2e9]}, TickStatus.MALFORMED),
        ({"ts_event": [0]}, TickStatus.MALFORMED),
        ({"ts_event": [-5]}, TickStatus.MALFORMED),
        ({"ts_event": [7_258_118_400 * NS_PER_S]}, TickStatus.MALFORMED),  # year 2200
        ({"ts_event": [T0 + 400 * NS_PER_S], "ts_init": [T0]}, TickStatus.MALFORMED),  # 400 s ahead
        ({"ts_event": [T0 + 200 * NS_PER_S], "ts_init": [T0]}, TickStatus.OK),  # within max_future_s
        ({"asset": "DOGE-USD"}, TickStatus.UNKNOWN_ASSET),
    ],
)
def test_each_reason_code(over: dict[str, object], expected: TickStatus) -> None:
    # Arrange
    batch = _batch(**over)
    # Act
    validate(batch, ValidationConfig(), ("BTC-USD", "ETH-USD"))
    # Assert
    assert TickStatus(int(batch.status[0])) is expected


def test_provider_index_outside_vocabulary_is_malformed() -> None:
    batch = _batch(price=[100.0, 100.0])
    batch.provider[1] = 7

    validate(batch, ValidationConfig(), ("BTC-USD",))

    assert batch.status.tolist() == [TickStatus.OK, TickStatus.MALFORMED]


def test_existing_reasons_are_kept_and_only_ok_rows_change() -> None:
    # Arrange: a parser already marked row 0 NULL (with a NaN price); row 1 is non-finite.
    batch = _batch(price=[NAN, INF, 100.0], status=[TickStatus.NULL, 0, 0])
    # Act
    validate(batch, ValidationConfig(), ("BTC-USD",))
    # Assert
    assert [TickStatus(s) for s in batch.status] == [TickStatus.NULL, TickStatus.NON_FINITE, TickStatus.OK]


def test_precedence_price_before_size() -> None:
    codes = reason_codes(_batch(price=[NAN], size=[-1.0]), ValidationConfig(), ("BTC-USD",))
    assert codes.tolist() == [TickStatus.NON_FINITE]


def test_vectorized_mix_counts() -> None:
    # Arrange: 1000 ticks with known bad rows.
    rng = np.random.default_rng(3)
    n = 1000
    price = 100 + rng.random(n)
    bid, ask = price - 0.01, price + 0.01
    price[:10] = NAN
    price[10:15] = -1.0
    bid[20:27] = ask[20:27] + 0.5
    size = np.ones(n)
    size[30:33] = -2.0
    batch = TickBatch.from_columns("BTC-USD", ["x"] * n, ts_event=np.full(n, T0), price=price,
                                   size=size, bid=bid, ask=ask)
    # Act
    validate(batch, ValidationConfig(), ("BTC-USD",))
    # Assert
    assert batch.status_counts() == {"ok": 975, "non_finite": 10, "non_positive": 5, "crossed": 7, "malformed": 3}


def test_empty_batch_is_fine() -> None:
    batch = TickBatch.empty("BTC-USD")
    validate(batch, ValidationConfig(), ("BTC-USD",))
    assert len(batch) == 0
