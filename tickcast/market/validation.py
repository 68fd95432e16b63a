"""Per-tick validation with reason codes, vectorized over a :class:`~tickcast.ticks.TickBatch`.

A bad tick is never dropped here: its ``status`` is set to the first reason that applies
(:class:`~tickcast.errors.TickStatus` 1-6) so that later stages skip it and the pipeline counts
it. Rows that a parser already rejected (status not ``OK``) keep their reason.
"""

from __future__ import annotations

import numpy as np

from tickcast.config import ValidationConfig
from tickcast.errors import TickStatus
from tickcast.ticks import NS_PER_S, TickBatch

__all__ = ["validate", "reason_codes"]


def reason_codes(batch: TickBatch, cfg: ValidationConfig, known_assets: tuple[str, ...]) -> np.ndarray:
    """Reason code per tick (``uint8``; 0 = valid), ignoring the current ``status``.

    Precedence (first match wins): ``UNKNOWN_ASSET`` (the batch's asset is not known),
    ``MALFORMED`` (provider index outside the vocabulary), ``NON_FINITE`` / ``NON_POSITIVE``
    price, ``MALFORMED`` (price above ``max_price``; size negative, non-finite or above
    ``max_size``; event time outside ``[min_event_ts_s, max_event_ts_s]`` or more than
    ``max_future_s`` ahead of the receive time), ``NON_FINITE`` / ``NON_POSITIVE`` bid or ask
    (NaN means "no quote" and is fine), ``CROSSED`` (bid > ask).

    Parameters
    ----------
    batch
        Ticks of one asset.
    cfg
        Validation thresholds.
    known_assets
        Assets this caller accepts.

    Returns
    -------
    numpy.ndarray
        ``uint8`` codes aligned with the batch.
    """
    n = len(batch)
    if batch.asset not in known_assets:
        return np.full(n, TickStatus.UNKNOWN_ASSET, dtype=np.uint8)
    price, size, bid, ask = batch.price, batch.size, batch.bid, batch.ask
    ts, ts_init = batch.ts_event, batch.ts_init
    with np.errstate(invalid="ignore"):
        bad_provider = (batch.provider < 0) | (batch.provider >= len(batch.providers))
        price_nonfinite = ~np.isfinite(price)
        price_nonpos = price <= 0.0
        # Receive time 0 means "unknown": the future check needs a real receive time.
        too_far_ahead = (ts_init > 0) & (ts - ts_init > int(cfg.max_future_s * NS_PER_S))
        malformed = (
            (price > cfg.max_price)
            | ~np.isfinite(size) | (size < 0.0) | (size > cfg.max_size)
            | (ts < int(cfg.min_event_ts_s * NS_PER_S)) | (ts > int(cfg.max_event_ts_s * NS_PER_S))
            | too_far_ahead
        )
        # NaN bid/ask = no quote; +-inf is a broken number.
        quote_nonfinite = np.isinf(bid) | np.isinf(ask)
        quote_nonpos = (bid <= 0.0) | (ask <= 0.0)
        crossed = bid > ask  # False whenever either side is NaN
    return np.select(
        [bad_provider, price_nonfinite, price_nonpos, malformed, quote_nonfinite, quote_nonpos, crossed],
        [TickStatus.MALFORMED, TickStatus.NON_FINITE, TickStatus.NON_POSITIVE, TickStatus.MALFORMED,
         TickStatus.NON_FINITE, TickStatus.NON_POSITIVE, TickStatus.CROSSED],
        default=TickStatus.OK,
    ).astype(np.uint8)


def validate(batch: TickBatch, cfg: ValidationConfig, known_assets: tuple[str, ...]) -> None:
    """Set a rejection reason in place on every tick still ``OK`` that fails a check.

    See :func:`reason_codes` for the checks and their precedence.

    Examples
    --------
    >>> from tickcast.config import ValidationConfig
    >>> t0 = 1_700_000_000 * 10**9
    >>> b = TickBatch.from_columns(
    ...     "BTC-USD", ["a"] * 6, ts_event=[t0] * 6,
    ...     price=[100.0, float("nan"), float("inf"), -1.0, 100.0, 100.0],
    ...     size=[1.0, 1.0, 1.0, 1.0, -2.0, 1.0],
    ...     bid=[99.0, 99.0, 99.0, 99.0, 99.0, 101.0], ask=[101.0, 101.0, 101.0, 101.0, 101.0, 100.0])
    >>> validate(b, ValidationConfig(), ("BTC-USD",))
    >>> [TickStatus(s).name for s in b.status]
    ['OK', 'NON_FINITE', 'NON_FINITE', 'NON_POSITIVE', 'MALFORMED', 'CROSSED']
    """
    if len(batch) == 0:
        return
    codes = reason_codes(batch, cfg, known_assets)
    hit = (batch.status == TickStatus.OK) & (codes != TickStatus.OK)
    batch.status[hit] = codes[hit]
