"""What an asset actor owns and checkpoints, and the step that advances it (no Ray, no Redis).

:class:`AssetState` is the whole recoverable state of one asset's ingestion: the market pipeline
(validation, dedup, consensus, bar building), the online features, the cumulative counters, the
id of the last stream entry consumed and the bookkeeping of the gap policy. One pickle of it is
the actor's checkpoint; a new incarnation loads it and resumes after ``last_id``.

:meth:`AssetState.step` turns one decoded tick batch into a :class:`StepOutput`, the writes the
actor must make durable (bars to upsert, late ticks, gap audit rows). It performs no I/O except
through the ``alternates`` callback, which loads other providers' stored bars when a gap needs
them. Given the same state and the same batch it returns the same output, which is what makes a
replay after a crash harmless: the rewritten bars equal the stored ones and the upserts are
idempotent.

Finality and gaps. A consensus bar may still be amended until the pipeline's watermark (newest
accepted event time minus the allowed lateness) passes its end. Once ``watermark >= ts + freq``
the bar is final; final bars are handed to the gap policy together with the last final bar
before them, so every gap is judged once, with both neighbours known, whatever the batch
boundaries were.

Online features. Every consensus bar emitted (new or amended) is queued and fed, in emission
order, to :class:`~tickcast.features.online.OnlineFeatures` by :meth:`AssetState.feed_features`.
The actor feeds a few bars per step while it keeps up with its stream and defers the rest while
it catches up (bars first); the order is the same either way, so the features equal bar-by-bar
ones exactly. Each call feeds its bars in one :meth:`~OnlineFeatures.update_many` (bit-identical
to bar-by-bar updates) and returns the newest bar's row only: that one row is what the actor
publishes per call, during a catch-up as at any other time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from tickcast.config import Settings
from tickcast.errors import InvalidInput, TickStatus
from tickcast.features.online import OnlineFeatures
from tickcast.market.calendar import ALWAYS, TradingCalendar, trading_calendar
from tickcast.market.gaps import GapPolicy, fill_in_sessions
from tickcast.market.pipeline import AssetPipeline, IngestCounts, PipelineResult
from tickcast.storage.bar_store import BAR_COLUMNS, empty_bars
from tickcast.ticks import NS_PER_MIN, NS_PER_S, TickBatch

# Loads other providers' stored bars for [start_ns, end_ns] (both inclusive): name -> frame.
AlternatesLoader = Callable[[int, int], dict[str, pd.DataFrame]]

_BAR_FIELDS: tuple[str, ...] = tuple(BAR_COLUMNS)


@dataclass
class StepOutput:
    """The durable writes one step asks for, and what it observed.

    Attributes
    ----------
    consensus
        Consensus bars to upsert: new and amended real bars, and imputed gap fills.
    provider
        Provider bars to upsert (``provider`` column names the source).
    late
        Ticks beyond the allowed lateness, kept aside (never dropped).
    audit
        Gap audit rows of gaps judged in this step.
    counts
        Counters of this step alone.
    gaps
        Gaps judged in this step; ``imputed`` bars filled.
    confidence
        Consensus confidence (bp) of the newest bar closed in this step (NaN if none).
    agreement
        Share of this step's screened ticks (accepted, outlier or frozen) that were accepted,
        i.e. agreed with the consensus (NaN when none was screened).
    """

    consensus: pd.DataFrame
    provider: pd.DataFrame
    late: TickBatch
    audit: pd.DataFrame
    counts: IngestCounts
    gaps: int = 0
    imputed: int = 0
    confidence: float = float("nan")
    agreement: float = float("nan")


@dataclass
class TickStatusLog:
    """Audit mode: (provider, seq, status) of every processed tick, in processing order."""

    providers: list[np.ndarray] = field(default_factory=list)
    seqs: list[np.ndarray] = field(default_factory=list)
    statuses: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: TickBatch) -> None:
        self.providers.append(batch.provider_names().astype(str))
        self.seqs.append(batch.seq.copy())
        self.statuses.append(batch.status.copy())

    def arrays(self) -> dict[str, np.ndarray]:
        """Concatenated columns ``provider`` (str), ``seq`` (int64), ``status`` (uint8)."""
        if not self.statuses:
            return {"provider": np.empty(0, dtype=str), "seq": np.empty(0, dtype=np.int64),
                    "status": np.empty(0, dtype=np.uint8)}
        return {"provider": np.concatenate(self.providers), "seq": np.concatenate(self.seqs),
                "status": np.concatenate(self.statuses)}


class AssetState:
    """Recoverable ingestion state of one asset (the actor's checkpoint).

    Parameters
    ----------
    asset
        The asset id; batches of another asset are rejected as malformed.
    settings
        Whole configuration (pipeline, features, gap policy, lateness, audit mode).

    Attributes
    ----------
    last_id
        Id of the last stream entry whose effects are durable ("0-0" before the first).
    batches
        Stream entries processed.
    counts
        Cumulative :class:`IngestCounts`.
    gaps, imputed
        Gaps judged and bars imputed so far.
    calendar
        The asset's trading calendar (bars are expected only in session).
    off_session_bars
        Consensus bars of slots outside every session, not kept.
    """

    # Defaults for checkpoints taken before calendars existed (24/7 then).
    calendar: TradingCalendar = ALWAYS
    off_session_bars: int = 0

    def __init__(self, asset: str, settings: Settings) -> None:
        self.asset = asset
        self.freq_ns = int(settings.bars.freq_s) * NS_PER_S
        self.calendar = trading_calendar(settings, asset)
        self.off_session_bars = 0
        self.pipeline = AssetPipeline(asset, settings)
        self.features = OnlineFeatures(settings.features, self.freq_ns)
        self.gap_policy = GapPolicy(settings.gaps)
        self.counts = IngestCounts()
        self.last_id = "0-0"
        self.batches = 0
        self.gaps = 0
        self.imputed = 0
        self.feature_errors = 0
        self.watermark_ns: int | None = None
        self.newest_event_ns: int | None = None  # newest accepted tick's event time
        self.last_bar_ts: int | None = None  # newest real consensus bar emitted
        # Consensus bars not final yet (the latest emission of each ts).
        self._open: pd.DataFrame = _EMPTY_BARS
        # The newest final consensus bar (one row): left neighbour of the next gap.
        self._last_final: pd.DataFrame | None = None
        # Consensus bars emitted but not yet fed to the online features (see feed_features).
        self._feature_backlog: list[pd.DataFrame] = []
        self.status_log: TickStatusLog | None = TickStatusLog() if settings.ingest.keep_tick_status else None

    # -- the step -------------------------------------------------------------------------------
    def step(self, batch: TickBatch, alternates: AlternatesLoader) -> StepOutput:
        """Process one decoded stream entry (statuses are set in place on ``batch``)."""
        result = self.pipeline.process(batch)
        self.watermark_ns = int(result.watermark_ns)
        if self.status_log is not None:
            self.status_log.add(batch)
        self.batches += 1
        out = self._absorb(result, final_all=False, alternates=alternates)
        accepted = batch.status == TickStatus.OK
        if accepted.any():
            newest = int(batch.ts_event[accepted].max())
            self.newest_event_ns = newest if self.newest_event_ns is None else max(self.newest_event_ns, newest)
        ok = int(np.count_nonzero(accepted))
        screened = ok + int(np.count_nonzero((batch.status == TickStatus.OUTLIER)
                                             | (batch.status == TickStatus.FROZEN)))
        out.agreement = ok / screened if screened else float("nan")
        return out

    def flush(self, alternates: AlternatesLoader) -> StepOutput:
        """End of input: close every open bar, judge every remaining gap."""
        result = self.pipeline.flush()
        self.watermark_ns = int(result.watermark_ns)
        return self._absorb(result, final_all=True, alternates=alternates)

    # -- online features --------------------------------------------------------------------------
    @property
    def features_pending(self) -> int:
        """Consensus bars emitted but not yet fed to the online features."""
        return sum(len(f) for f in self._feature_backlog)

    def feed_features(self, max_bars: int | None = None) -> tuple[int, np.ndarray] | None:
        """Feed pending consensus bars, oldest first, to the online features.

        Bars reach :class:`OnlineFeatures` in emission order whatever the chunking, so its state
        and rows are exactly those of feeding each bar at its close; only the moment differs
        (the actor defers this work while it is catching up on its stream).

        Returns
        -------
        (bar_ts, row) or None
            The feature row of the newest bar after feeding (None if nothing was fed).
        """
        budget = self.features_pending if max_bars is None else max(0, int(max_bars))
        fed = False
        while budget > 0 and self._feature_backlog:
            head = self._feature_backlog[0]
            take = head.iloc[:budget]
            # One call per chunk: the same state and rows as updating bar by bar, much faster
            # on a backlog (see OnlineFeatures.update_many); a refused bar (an amendment older
            # than the feature history kept) is counted and skipped, as before.
            self.features.update_many(take, on_error=self._feature_refused)
            fed = fed or len(take) > 0
            budget -= len(take)
            if len(take) == len(head):
                self._feature_backlog.pop(0)
            else:
                self._feature_backlog[0] = head.iloc[len(take):].reset_index(drop=True)
        if not fed or self.features.last_ts is None:
            return None
        return int(self.features.last_ts), self.features.last_row

    def _feature_refused(self, row: int, error: InvalidInput) -> None:
        """A bar the online features refused (counted in ``feature_errors``, then skipped)."""
        self.feature_errors += 1

    # -- internals ------------------------------------------------------------------------------
    def _absorb(self, result: PipelineResult, *, final_all: bool,
                alternates: AlternatesLoader) -> StepOutput:
        self.counts.merge(result.counts)
        consensus = _bar_frame(result.consensus_bars)
        confidence = float("nan")
        if len(consensus) and not self.calendar.always_open:
            in_session = self.calendar.expected_bars(consensus["ts"].to_numpy(dtype=np.int64),
                                                     self.freq_ns)
            if not in_session.all():
                self.off_session_bars += int(np.count_nonzero(~in_session))
                consensus = consensus.loc[in_session].reset_index(drop=True)
        if len(consensus):
            consensus = consensus.sort_values("ts", kind="stable")
            if self._last_final is not None:
                # Defensive: the pipeline never amends a bar behind its watermark.
                consensus = consensus.loc[consensus["ts"].to_numpy() > int(self._last_final["ts"].iloc[0])]
            consensus = consensus.reset_index(drop=True)
            self._feature_backlog.append(consensus)
            if len(consensus):
                newest_bar = int(consensus["ts"].iloc[-1])
                self.last_bar_ts = newest_bar if self.last_bar_ts is None else max(self.last_bar_ts, newest_bar)
            merged = pd.concat([self._open, consensus], ignore_index=True)
            self._open = merged.drop_duplicates("ts", keep="last").sort_values("ts", kind="stable")
            if len(consensus):
                confidence = float(consensus["confidence"].iloc[-1])

        fills, audit = self._judge_final(final_all, alternates, result.provider_bars)
        out_consensus = consensus if fills.empty else pd.concat([consensus, fills], ignore_index=True)
        provider = result.provider_bars
        if provider is None or len(provider) == 0:
            provider = _EMPTY_PROVIDER_BARS
        late = result.late if result.late is not None else TickBatch.empty(self.asset)
        return StepOutput(consensus=out_consensus, provider=provider, late=late, audit=audit,
                          counts=result.counts, gaps=len(audit), imputed=len(fills),
                          confidence=confidence)

    def _judge_final(self, final_all: bool, alternates: AlternatesLoader,
                     fresh_provider_bars: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Run the gap policy over bars that became final; return (imputed bars, audit).

        ``fresh_provider_bars`` are the provider bars of the current step, not stored yet: they
        join the stored ones as alternates (newer rows win).
        """
        if final_all:
            horizon = np.iinfo(np.int64).max
        elif self.watermark_ns is None:
            return _EMPTY_BARS, _EMPTY_AUDIT
        else:
            # The watermark already trails the newest event time by the allowed lateness: a
            # bar whose end is at or before it can no longer be amended.
            horizon = self.watermark_ns - self.freq_ns
        if self._open.empty:
            return _EMPTY_BARS, _EMPTY_AUDIT
        is_final = self._open["ts"].to_numpy() <= horizon
        if not is_final.any():
            return _EMPTY_BARS, _EMPTY_AUDIT
        final = self._open.loc[is_final]
        self._open = self._open.loc[~is_final].reset_index(drop=True)
        bars = final if self._last_final is None else pd.concat([self._last_final, final], ignore_index=True)
        self._last_final = bars.iloc[[-1]].reset_index(drop=True)
        ts = bars["ts"].to_numpy(dtype=np.int64)
        if len(ts) < 2 or not (np.diff(ts) > self.freq_ns).any():
            return _EMPTY_BARS, _EMPTY_AUDIT
        segments = None
        if not self.calendar.always_open:
            # Only slots in session are expected: a closure between two bars is no gap.
            segments = self.calendar.expected_segments(int(ts[0]), int(ts[-1]) + self.freq_ns,
                                                       self.freq_ns)
            if int(((segments[1] - segments[0]) // self.freq_ns).sum()) <= len(ts):
                return _EMPTY_BARS, _EMPTY_AUDIT
        alt = _with_fresh(alternates(int(ts[0]), int(ts[-1])), fresh_provider_bars,
                          int(ts[0]), int(ts[-1]))
        if segments is None:
            filled, audit = self.gap_policy.fill(bars.reset_index(drop=True), self.freq_ns, alt)
        else:
            filled, audit = fill_in_sessions(self.gap_policy, bars.reset_index(drop=True),
                                             self.freq_ns, segments[0], segments[1], alt)
        imputed_mask = filled["imputed"].astype(str).to_numpy() != ""
        fills = filled.loc[imputed_mask, list(_BAR_FIELDS)].reset_index(drop=True)
        self.gaps += len(audit)
        self.imputed += len(fills)
        return fills, audit.reset_index(drop=True)

    @property
    def gap_minutes(self) -> float | None:
        """Minutes of event time in session since the end of the newest real consensus bar
        (None: no bar). A closure adds nothing: the gauge neither grows while the market is
        shut nor jumps when it reopens."""
        if self.last_bar_ts is None or self.newest_event_ns is None:
            return None
        since = self.last_bar_ts + self.freq_ns
        if self.calendar.always_open:
            return max(0.0, (self.newest_event_ns - since) / NS_PER_MIN)
        return self.calendar.open_ns_between(since, self.newest_event_ns) / NS_PER_MIN

    def status(self) -> dict[str, Any]:
        """JSON-ready summary (counters, progress, gap bookkeeping)."""
        return {
            "asset": self.asset,
            "last_id": self.last_id,
            "batches": self.batches,
            "counts": self.counts.to_dict(),
            "gaps": self.gaps,
            "imputed": self.imputed,
            "feature_errors": self.feature_errors,
            "watermark_ns": self.watermark_ns,
            "open_bars": len(self._open),
            "features_pending": self.features_pending,
            "features_last_ts": self.features.last_ts,
            "gap_minutes": self.gap_minutes,
            "calendar": self.calendar.name,
            "off_session_bars": self.off_session_bars,
        }


def _bar_frame(frame: pd.DataFrame | None) -> pd.DataFrame:
    if frame is None or len(frame) == 0:
        return _EMPTY_BARS
    return frame.loc[:, list(_BAR_FIELDS)].reset_index(drop=True)


def _with_fresh(stored: dict[str, pd.DataFrame], fresh: pd.DataFrame | None, start_ns: int,
                end_ns: int) -> dict[str, pd.DataFrame]:
    """Stored alternates plus this step's provider bars in ``[start_ns, end_ns]``."""
    if fresh is None or len(fresh) == 0 or "provider" not in fresh.columns:
        return stored
    ts = fresh["ts"].to_numpy()
    fresh = fresh.loc[(ts >= start_ns) & (ts <= end_ns)]
    out = dict(stored)
    for name in sorted(set(fresh["provider"].astype(str))):
        rows = fresh.loc[fresh["provider"].astype(str).to_numpy() == name, list(_BAR_FIELDS)]
        base = out.get(name)
        both = rows if base is None or len(base) == 0 else pd.concat(
            [base.loc[:, list(_BAR_FIELDS)], rows], ignore_index=True)
        out[name] = both.drop_duplicates("ts", keep="last").sort_values("ts").reset_index(drop=True)
    return out


# Shared empty frames (never mutated: every update builds a new frame). Building an empty
# frame with a schema costs about a millisecond; most steps emit nothing.
_EMPTY_BARS: pd.DataFrame = empty_bars()
_EMPTY_PROVIDER_BARS: pd.DataFrame = empty_bars(provider="")
_EMPTY_AUDIT: pd.DataFrame = pd.DataFrame({
    "start": np.empty(0, np.int64), "end": np.empty(0, np.int64),
    "missing_minutes": np.empty(0, np.float64), "method": np.empty(0, dtype=object),
    "filled": np.empty(0, dtype=bool)})
