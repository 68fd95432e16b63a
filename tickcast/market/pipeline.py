"""The per-asset data plane: validate -> dedup -> outliers/consensus -> bars.

:class:`AssetPipeline` is pure (numpy/pandas/scipy) and picklable: the asset actor holds one,
feeds it batches and checkpoints it by pickling. Every tick that enters is accounted for in
:class:`IngestCounts`: accepted, rejected by reason, duplicate, outlier (per provider), frozen
or late (handed back to be kept aside).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tickcast.config import Settings
from tickcast.errors import InvalidInput, TickStatus, UnknownAsset
from tickcast.market.bars import BarBuilder, BarUpdate, empty_bar_frame
from tickcast.market.consensus import ConsensusBook
from tickcast.market.dedup import TickDeduplicator
from tickcast.market.validation import validate
from tickcast.ticks import TickBatch

__all__ = ["AssetPipeline", "PipelineResult", "IngestCounts"]

_REJECTIONS = tuple(s for s in TickStatus if s.is_rejection)


@dataclass
class IngestCounts:
    """Tick and bar accounting of one batch (or, merged, of many).

    ``ticks_in == ticks_accepted + sum(rejected) + duplicates + sum(outliers) + late + frozen``
    for every batch. ``bars`` counts consensus bars emitted for the first time, ``amended``
    consensus bars re-emitted because a late tick changed them.

    Examples
    --------
    >>> a = IngestCounts(ticks_in=3, ticks_accepted=2, rejected={"non_finite": 1})
    >>> b = IngestCounts(ticks_in=2, ticks_accepted=1, outliers={"kraken": 1})
    >>> a.merge(b).to_dict()["rejected"], a.ticks_in, a.outliers
    ({'non_finite': 1}, 5, {'kraken': 1})
    """

    ticks_in: int = 0
    ticks_accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    outliers: dict[str, int] = field(default_factory=dict)
    late: int = 0
    frozen: int = 0
    bars: int = 0
    amended: int = 0

    def merge(self, other: "IngestCounts") -> "IngestCounts":
        """Add ``other`` into this one (in place) and return it."""
        for name in ("ticks_in", "ticks_accepted", "duplicates", "late", "frozen", "bars", "amended"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.rejected, other.rejected), (self.outliers, other.outliers)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        return self

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict."""
        return {
            "ticks_in": self.ticks_in, "ticks_accepted": self.ticks_accepted,
            "rejected": dict(self.rejected), "duplicates": self.duplicates,
            "outliers": dict(self.outliers), "late": self.late, "frozen": self.frozen,
            "bars": self.bars, "amended": self.amended,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "IngestCounts":
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        InvalidInput
            A key that is not a count of this class (named).
        """
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidInput(f"unknown ingest count {unknown[0]!r}", field=unknown[0])
        fields = {k: (dict(v) if isinstance(v, dict) else int(v)) for k, v in data.items()}  # type: ignore[call-overload]
        return cls(**fields)  # type: ignore[arg-type]

    @classmethod
    def of_batch(cls, batch: TickBatch, bars: int = 0, amended: int = 0) -> "IngestCounts":
        """Counts read from the final statuses of a processed batch."""
        counts = np.bincount(batch.status, minlength=len(TickStatus))
        outlier_rows = batch.status == TickStatus.OUTLIER
        outliers: dict[str, int] = {}
        if outlier_rows.any():
            per = np.bincount(batch.provider[outlier_rows].astype(np.int64), minlength=len(batch.providers))
            outliers = {batch.providers[i]: int(c) for i, c in enumerate(per) if c}
        return cls(
            ticks_in=len(batch),
            ticks_accepted=int(counts[TickStatus.OK]),
            rejected={s.name.lower(): int(counts[s]) for s in _REJECTIONS if counts[s]},
            duplicates=int(counts[TickStatus.DUPLICATE]),
            outliers=outliers,
            late=int(counts[TickStatus.LATE]),
            frozen=int(counts[TickStatus.FROZEN]),
            bars=bars,
            amended=amended,
        )


@dataclass
class PipelineResult:
    """Output of :meth:`AssetPipeline.process` / :meth:`AssetPipeline.flush`.

    Attributes
    ----------
    counts
        Accounting of the batch.
    consensus_bars, provider_bars
        New or amended bars (see :class:`~tickcast.market.bars.BarUpdate`).
    late
        Ticks older than the watermark, to be kept aside.
    watermark_ns
        The bar builder's watermark after the batch.
    """

    counts: IngestCounts
    consensus_bars: pd.DataFrame
    provider_bars: pd.DataFrame
    late: TickBatch
    watermark_ns: int


class AssetPipeline:
    """Validate, deduplicate, screen and aggregate the ticks of one asset into bars.

    Parameters
    ----------
    asset
        Asset id; must be one of ``settings.assets``.
    settings
        The configuration (sections validation, dedup, outliers, consensus, bars).

    Raises
    ------
    UnknownAsset
        ``asset`` is not configured.

    Examples
    --------
    >>> from tickcast.config import Settings
    >>> t0 = 1_700_000_040 * 10**9
    >>> b = TickBatch.from_columns("BTC-USD", ["a", "b", "a", "b", "a"],
    ...                            ts_event=t0 + np.array([1, 2, 3, 4, 65]) * 10**9,
    ...                            price=[100.0, 100.2, float("nan"), 500.0, 100.1], seq=[1, 1, 2, 2, 3])
    >>> pipe = AssetPipeline("BTC-USD", Settings())
    >>> res = pipe.process(b)
    >>> res.counts.to_dict()
    {'ticks_in': 5, 'ticks_accepted': 3, 'rejected': {'non_finite': 1}, 'duplicates': 0, 'outliers': {'b': 1}, 'late': 0, 'frozen': 0, 'bars': 1, 'amended': 0}
    >>> res.consensus_bars[["open", "close", "providers"]].values.tolist()
    [[100.1, 100.1, 2.0]]
    """

    def __init__(self, asset: str, settings: Settings) -> None:
        if asset not in settings.assets:
            raise UnknownAsset(f"asset {asset!r} is not configured (settings.assets)", field="asset")
        self.asset = asset
        self.settings = settings
        self.dedup = TickDeduplicator(settings.dedup.window)
        self.book = ConsensusBook(settings.outliers, settings.consensus)
        self.bars = BarBuilder(asset, settings.bars, settings.consensus)
        self.totals = IngestCounts()

    def process(self, batch: TickBatch) -> PipelineResult:
        """Run one batch through every stage; statuses are set in place on ``batch``.

        A batch of another asset is rejected tick by tick (``UNKNOWN_ASSET``), not raised.
        """
        validate(batch, self.settings.validation, (self.asset,))
        if batch.asset == self.asset and len(batch):
            self.dedup.update(batch)
            self.book.update(batch)
            update = self.bars.update(batch, self.book.last_tick_reliability)
        else:
            update = BarUpdate(empty_bar_frame(), empty_bar_frame(True),
                               TickBatch.empty(batch.asset, batch.providers), self.bars.watermark_ns)
        return self._result(IngestCounts.of_batch(batch), update)

    def flush(self) -> PipelineResult:
        """Emit every bar still open (end of a replay); later ticks in those bars are late."""
        return self._result(IngestCounts(), self.bars.flush())

    def _result(self, counts: IngestCounts, update: BarUpdate) -> PipelineResult:
        counts.bars, counts.amended = update.bars_new, update.bars_amended
        self.totals.merge(counts)
        return PipelineResult(counts, update.consensus, update.provider, update.late, update.watermark_ns)
