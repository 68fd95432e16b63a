"""The tick schema: a batch of ticks of one asset as a struct of numpy arrays.

Ticks travel in batches, never one by one: a Ray call or a Redis entry costs about a
millisecond, a numpy pass over 10,000 ticks costs microseconds.

Every tick carries ``ts_event`` (when the provider says it happened) and ``ts_init`` (when we
received it), both UNIX nanoseconds UTC, as in NautilusTrader. ``status`` holds a
:class:`~tickcast.errors.TickStatus` per tick: parsers set ``NULL`` / ``MALFORMED`` /
``UNKNOWN_ASSET`` for records they could not read, later stages set the rest. A rejected record
keeps its row (with NaN fields) so that it is counted, never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tickcast.errors import TickStatus

NS_PER_S = 1_000_000_000
NS_PER_MIN = 60 * NS_PER_S

# Column name -> dtype. Order is the wire order of the Arrow/NumPy codecs.
TICK_COLUMNS: dict[str, np.dtype] = {
    "provider": np.dtype(np.int16),  # index into TickBatch.providers
    "ts_event": np.dtype(np.int64),
    "ts_init": np.dtype(np.int64),
    "price": np.dtype(np.float64),
    "size": np.dtype(np.float64),
    "bid": np.dtype(np.float64),  # NaN when the provider sends no quote
    "ask": np.dtype(np.float64),
    "seq": np.dtype(np.int64),  # provider sequence number, -1 when absent
    "status": np.dtype(np.uint8),
}


@dataclass(eq=False)
class TickBatch:
    """Ticks of one asset, column-wise.

    Parameters
    ----------
    asset
        Asset id such as ``"BTC-USD"``.
    providers
        Vocabulary of provider names; ``provider`` holds indices into it.

    Raises
    ------
    ValueError
        Columns of different lengths or wrong dtypes.

    Examples
    --------
    >>> b = TickBatch.from_columns("BTC-USD", ["kraken", "kraken"], ts_event=[1, 2],
    ...                            price=[100.0, 101.0], size=[1.0, 2.0])
    >>> len(b), b.providers, b.provider_names().tolist()
    (2, ('kraken',), ['kraken', 'kraken'])
    """

    asset: str
    providers: tuple[str, ...]
    provider: np.ndarray
    ts_event: np.ndarray
    ts_init: np.ndarray
    price: np.ndarray
    size: np.ndarray
    bid: np.ndarray
    ask: np.ndarray
    seq: np.ndarray
    status: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.providers = tuple(self.providers)
        n = len(self.ts_event)
        for name, dtype in TICK_COLUMNS.items():
            col = getattr(self, name)
            if not isinstance(col, np.ndarray) or col.dtype != dtype:
                setattr(self, name, np.asarray(col, dtype=dtype))
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.ts_event)

    @classmethod
    def empty(cls, asset: str, providers: tuple[str, ...] = ()) -> "TickBatch":
        cols = {name: np.empty(0, dtype=dt) for name, dt in TICK_COLUMNS.items()}
        return cls(asset=asset, providers=providers, **cols)

    @classmethod
    def from_columns(
        cls,
        asset: str,
        provider_names: "list[str] | np.ndarray",
        *,
        ts_event: "list[int] | np.ndarray",
        price: "list[float] | np.ndarray",
        size: "list[float] | np.ndarray | None" = None,
        ts_init: "list[int] | np.ndarray | None" = None,
        bid: "list[float] | np.ndarray | None" = None,
        ask: "list[float] | np.ndarray | None" = None,
        seq: "list[int] | np.ndarray | None" = None,
        status: "list[int] | np.ndarray | None" = None,
    ) -> "TickBatch":
        """Build a batch from per-tick provider names and columns (defaults filled in)."""
        names = np.asarray(provider_names, dtype=object)
        vocab, codes = np.unique(names.astype(str), return_inverse=True) if len(names) else (np.array([], dtype=str), np.array([], dtype=np.int16))
        n = len(names)
        ts_event_arr = np.asarray(ts_event, dtype=np.int64)
        nan = np.full(n, np.nan)
        return cls(
            asset=asset,
            providers=tuple(str(v) for v in vocab),
            provider=codes.astype(np.int16),
            ts_event=ts_event_arr,
            ts_init=ts_event_arr.copy() if ts_init is None else np.asarray(ts_init, dtype=np.int64),
            price=np.asarray(price, dtype=np.float64),
            size=np.ones(n) if size is None else np.asarray(size, dtype=np.float64),
            bid=nan.copy() if bid is None else np.asarray(bid, dtype=np.float64),
            ask=nan.copy() if ask is None else np.asarray(ask, dtype=np.float64),
            seq=np.full(n, -1, dtype=np.int64) if seq is None else np.asarray(seq, dtype=np.int64),
            status=np.zeros(n, dtype=np.uint8) if status is None else np.asarray(status, dtype=np.uint8),
        )

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in TICK_COLUMNS}

    def take(self, index: np.ndarray) -> "TickBatch":
        """Rows selected by a boolean mask or an integer index (copies)."""
        return TickBatch(
            asset=self.asset,
            providers=self.providers,
            meta=dict(self.meta),
            **{name: col[index] for name, col in self.columns().items()},
        )

    def provider_names(self) -> np.ndarray:
        """Provider name per tick (object array); for reports and tests, not hot paths."""
        return np.asarray(self.providers, dtype=object)[self.provider] if len(self.providers) else np.empty(len(self), dtype=object)

    def status_counts(self) -> dict[str, int]:
        """Ticks per :class:`TickStatus` name (lower case), zero counts omitted."""
        counts = np.bincount(self.status, minlength=len(TickStatus))
        return {TickStatus(i).name.lower(): int(c) for i, c in enumerate(counts) if c}

    @staticmethod
    def concat(batches: "list[TickBatch]") -> "TickBatch":
        """Concatenate batches of one asset, unifying their provider vocabularies."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        asset = batches[0].asset
        vocab: list[str] = []
        index: dict[str, int] = {}
        remapped: list[np.ndarray] = []
        for b in batches:
            if b.asset != asset:
                raise ValueError(f"cannot concat assets {asset} and {b.asset}")
            lut = np.empty(max(len(b.providers), 1), dtype=np.int16)
            for i, name in enumerate(b.providers):
                if name not in index:
                    index[name] = len(vocab)
                    vocab.append(name)
                lut[i] = index[name]
            remapped.append(lut[b.provider] if len(b) else b.provider)
        cols = {name: np.concatenate([getattr(b, name) for b in batches]) for name in TICK_COLUMNS}
        cols["provider"] = np.concatenate(remapped).astype(np.int16)
        return TickBatch(asset=asset, providers=tuple(vocab), **cols)
