"""The user's book: decoding of book:<ASSET> entries (reason-coded rejections) and its arithmetic."""

from __future__ import annotations

import pickle

import pytest

from tickcast.monitoring.book import (
    BookKind,
    BookRejected,
    BookRejection,
    BookUpdate,
    BookUpdateMessage,
    UserBook,
    book_stream_key,
    decode_book_entry,
    parse_book_message,
)

TS = 1_704_067_200_000_000_000  # 2024-01-01T00:00:00Z


def _entry(**fields: object) -> dict[bytes, bytes]:
    base: dict[str, object] = {"asset": "BTC-USD", "ts": TS}
    base.update(fields)
    return {k.encode(): str(v).encode() for k, v in base.items() if v is not None}


def test_valid_entries_decode_to_updates() -> None:
    pos = decode_book_entry("BTC-USD", _entry(position="-0.75", v="1"))
    assert pos == BookUpdate("BTC-USD", TS, BookKind.POSITION, -0.75, None)
    pnl = decode_book_entry("BTC-USD", _entry(pnl="-1250.5", capital="50000"))
    assert pnl == BookUpdate("BTC-USD", TS, BookKind.PNL, -1250.5, 50_000.0)
    iso = decode_book_entry("BTC-USD", _entry(ts="2024-01-01T00:00:00Z", position="1"))
    naive = decode_book_entry("BTC-USD", _entry(ts="2024-01-01 00:00:00", position="1"))
    assert iso.ts == naive.ts == TS  # no offset means UTC
    assert decode_book_entry("BTC-USD", _entry(position="0", pnl="")).kind is BookKind.POSITION
    assert book_stream_key("BTC-USD") == "book:BTC-USD"


@pytest.mark.parametrize(("fields", "reason", "field"), [
    ({"ts": None, "position": "1"}, BookRejection.MISSING_FIELD, "ts"),
    ({"asset": None, "position": "1"}, BookRejection.MISSING_FIELD, "asset"),
    ({"asset": "", "position": "1"}, BookRejection.MISSING_FIELD, "asset"),
    ({"asset": "ETH-USD", "position": "1"}, BookRejection.ASSET_MISMATCH, "asset"),
    ({"v": "2", "position": "1"}, BookRejection.BAD_VERSION, "v"),
    ({"ts": "yesterday", "position": "1"}, BookRejection.BAD_TS, "ts"),
    ({"ts": "-5", "position": "1"}, BookRejection.BAD_TS, "ts"),
    ({"position": "long"}, BookRejection.BAD_NUMBER, "position"),
    ({"pnl": "1,000"}, BookRejection.BAD_NUMBER, "pnl"),
    ({"position": "nan"}, BookRejection.NON_FINITE, "position"),
    ({"pnl": "inf", "capital": "10"}, BookRejection.NON_FINITE, "pnl"),
    ({"position": "1", "pnl": "5"}, BookRejection.POSITION_AND_PNL, "pnl"),
    ({}, BookRejection.NO_POSITION_OR_PNL, "position"),
    ({"position": "10.5"}, BookRejection.POSITION_OUT_OF_RANGE, "position"),
    ({"pnl": "5", "capital": "0"}, BookRejection.BAD_CAPITAL, "capital"),
    ({"pnl": "5", "capital": "abc"}, BookRejection.BAD_NUMBER, "capital"),
    ({"position": "1", "venue": "x"}, BookRejection.UNKNOWN_FIELD, "venue"),
])
def test_bad_entries_are_rejected_with_a_reason_naming_the_field(
        fields: dict[str, object], reason: BookRejection, field: str) -> None:
    got = decode_book_entry("BTC-USD", _entry(**fields))
    assert isinstance(got, BookRejected)
    assert got.reason is reason and got.field == field
    assert got.detail and got.to_dict()["reason"] == reason.value


def test_admin_body_uses_the_same_model() -> None:
    # An admin endpoint validates JSON bodies with the same pydantic model (typed values).
    msg = BookUpdateMessage.model_validate({"asset": "BTC-USD", "ts": TS, "position": 0.5})
    assert msg.to_update() == BookUpdate("BTC-USD", TS, BookKind.POSITION, 0.5)
    got = parse_book_message({"asset": "BTC-USD", "ts": TS, "position": True})
    assert isinstance(got, BookRejected) and got.reason is BookRejection.BAD_NUMBER
    tight = parse_book_message({"asset": "BTC-USD", "ts": TS, "position": 2.0}, max_abs_position=1.5)
    assert isinstance(tight, BookRejected) and tight.reason is BookRejection.POSITION_OUT_OF_RANGE


def test_position_book_marks_bars_and_tracks_its_high_water_mark() -> None:
    book = UserBook()
    assert not book.active and book.drawdown == 0.0
    book.apply(BookUpdate("X", 1, BookKind.POSITION, 2.0))
    returns = [0.01, -0.02, -0.015, 0.005]
    for r in returns:
        book.mark(r)
    equity = 1.0
    peak = 1.0
    for r in returns:
        equity *= 1 + 2.0 * r
        peak = max(peak, equity)
    assert book.equity == pytest.approx(equity, rel=1e-15) and book.peak == pytest.approx(peak)
    assert book.drawdown == pytest.approx(1 - equity / peak)
    book.apply(BookUpdate("X", 2, BookKind.POSITION, 0.0))  # flat: bars move nothing
    before = book.equity
    book.mark(0.2)
    assert book.equity == before
    book.apply(BookUpdate("X", 3, BookKind.POSITION, -20.0 / 2))  # a leveraged short ...
    book.mark(0.2)  # ... wiped out by a 20 % rally: equity floors at 0
    assert book.equity == 0.0 and book.drawdown == 1.0


def test_pnl_book_rebases_on_new_capital_and_on_a_change_of_kind() -> None:
    book = UserBook()
    assert book.apply(BookUpdate("X", 1, BookKind.PNL, 100.0)) is BookRejection.MISSING_CAPITAL
    assert not book.active
    assert book.apply(BookUpdate("X", 2, BookKind.PNL, 500.0, capital=10_000.0)) is None
    assert book.apply(BookUpdate("X", 3, BookKind.PNL, -300.0)) is None  # capital remembered
    assert book.drawdown == pytest.approx(1 - 9_700 / 10_500)
    book.mark(-0.5)  # bars do not move a P&L book
    assert book.equity == 9_700
    assert book.apply(BookUpdate("X", 3, BookKind.PNL, 0.0)) is BookRejection.STALE
    assert book.apply(BookUpdate("X", 4, BookKind.PNL, -300.0, capital=10_000.0)) is None
    assert book.rebases == 1  # same capital: no rebase
    assert book.apply(BookUpdate("X", 5, BookKind.PNL, -300.0, capital=9_700.0)) is None
    assert book.drawdown == 0.0 and book.peak == 9_400 and book.rebases == 2
    assert book.apply(BookUpdate("X", 6, BookKind.POSITION, 1.0)) is None
    assert book.equity == 1.0 and book.peak == 1.0 and book.rebases == 3
    assert book.worst_drawdown == pytest.approx(1 - 9_700 / 10_500)
    clone = pickle.loads(pickle.dumps(book))
    assert clone.to_dict() == book.to_dict()
