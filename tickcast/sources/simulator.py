"""A synthetic multi-provider market with injected, recorded anomalies.

Several providers quote the same assets around one common mid price that follows a geometric
Brownian motion. Each provider has its own persistent offset and noise (basis points), bid/ask
spread and network latency; trades print at the bid or the ask with lognormal sizes. On top,
anomalies are injected at ``anomaly_rate`` per tick and every injection is recorded per emitted
tick, so tests and benchmarks can score how well the pipeline detects them
(:func:`score_detection`).

Anomaly kinds and the status the pipeline is expected to give them (:data:`EXPECTED_STATUS`):

============  ========================================================  ===============
kind          what is injected                                          expected status
============  ========================================================  ===============
null          price missing (the tick arrives with status ``NULL``)     NULL
nan, inf      price NaN / +-infinity                                    NON_FINITE
nonpositive   price 0 or the negated price                              NON_POSITIVE
jump          price x or / U[jump_factor], one tick                     OUTLIER
frozen        a provider repeats its last quote for                     FROZEN
              ``frozen_factor x consensus.frozen_after_s`` while the
              market moves; ticks older than ``frozen_after_s`` carry
              the label (younger ones are labelled ``"stale"``, which is
              neither clean nor scored: nothing can tell them apart yet)
duplicate     an exact re-send (same seq, same fields) a little later   DUPLICATE
out_of_order  delivered after the provider's next tick, within the      OK (accepted)
              allowed lateness
late          delivered more than ``bars.allowed_lateness_s`` (+ one    LATE
              batch) after its event time
============  ========================================================  ===============

Volatility regimes (``simulator.regimes``, per asset; :class:`~tickcast.config.RegimeConfig`):
the mid's volatility is ``annual_vol x sqrt(g) x m``, with ``g`` a GARCH(1,1) multiplier updated
every ``garch_step_s`` from the step's standardized return (volatility clustering) and ``m`` the
multiplier of a volatility spike or a calm stretch, episodes that start at Poisson rates. Every
tick records its regime (:class:`VolRegime`: normal, calm, spike) and its annualized volatility
(:meth:`MarketSimulator.tick_keys`, :meth:`MarketSimulator.regime_bars`,
:meth:`MarketSimulator.regime_events`). An asset without regimes follows the plain GBM, tick for
tick the same as without this feature (regime draws come from a stream of their own).

Ticks are generated in vectorized blocks of event time and emitted per asset in batches of
``batch_s`` of receive time (``ts_init``), in delivery order. A provider delivers its own ticks in
order (as over one TCP connection), except the injected out-of-order and late ones.

An asset with a trading calendar (``calendars``; :meth:`MarketSimulator.from_settings` takes
``calendars.<ASSET>``) trades only in session: no tick has an event time in a closure. The mid
keeps moving through the closure, so the first ticks after the open jump by the closure's
worth of volatility (the gap at the reopen). Assets without one (24/7) are generated exactly as
before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import pandas as pd

from tickcast.config import (
    BarConfig,
    ConsensusConfig,
    RegimeConfig,
    Settings,
    SimulatorConfig,
)
from tickcast.errors import TickStatus
from tickcast.market.calendar import TradingCalendar, trading_calendar
from tickcast.ticks import NS_PER_MIN, NS_PER_S, TickBatch

KINDS: tuple[str, ...] = (
    "null", "nan", "inf", "nonpositive", "jump", "frozen", "duplicate", "out_of_order", "late",
)
STALE = "stale"
"""Label of the first ticks of a frozen stretch, before the price has been unchanged for
``frozen_after_s``: not clean, but not detectable either; excluded from scoring."""

LABELS: tuple[str, ...] = ("", *KINDS, STALE)
"""Label names by code; code 0 (``""``) is a clean tick."""

EXPECTED_STATUS: dict[str, TickStatus] = {
    "null": TickStatus.NULL,
    "nan": TickStatus.NON_FINITE,
    "inf": TickStatus.NON_FINITE,
    "nonpositive": TickStatus.NON_POSITIVE,
    "jump": TickStatus.OUTLIER,
    "frozen": TickStatus.FROZEN,
    "duplicate": TickStatus.DUPLICATE,
    "out_of_order": TickStatus.OK,
    "late": TickStatus.LATE,
}



class VolRegime(IntEnum):
    """Volatility regime of the simulated market at a tick (code stored per tick)."""

    NORMAL = 0
    CALM = 1
    SPIKE = 2


REGIMES: tuple[str, ...] = tuple(r.name.lower() for r in VolRegime)
"""Regime names by code."""

SECONDS_PER_YEAR = 365.25 * 86_400  # crypto trades around the clock
DEFAULT_START_NS = 1_704_067_200 * NS_PER_S  # 2024-01-01T00:00:00Z
_GEN_BLOCK_S = 60.0  # event time generated per vectorized step (rounded up to whole batches)
_OOO_MARGIN_NS = 1_000_000  # an out-of-order tick arrives >= 1 ms after its successor

_CODE = {name: i for i, name in enumerate(LABELS)}
_K = {name: i for i, name in enumerate(KINDS)}
_COLUMNS = ("provider", "ts_event", "ts_init", "price", "size", "bid", "ask", "seq", "status",
            "label", "occurrence", "regime", "vol")
_RECORDED = ("label", "provider", "seq", "occurrence", "ts_event", "ts_init", "regime", "vol")
_NEVER_NS = np.iinfo(np.int64).max  # "no such time" in the future


def _empty_columns() -> dict[str, np.ndarray]:
    dt = {"provider": np.int16, "ts_event": np.int64, "ts_init": np.int64, "seq": np.int64,
          "status": np.uint8, "label": np.uint8, "occurrence": np.uint8, "regime": np.uint8}
    return {c: np.empty(0, dtype=dt.get(c, np.float64)) for c in _COLUMNS}


@dataclass
class _VolRegimes:
    """The volatility regime process of one asset: GARCH multiplier, spikes, calm stretches.

    Carried from block to block; the mid's path over a block is drawn by :meth:`path` from the
    block's standard normal draws, so the asset's main random stream is used exactly as without
    regimes.
    """

    cfg: RegimeConfig
    rng: np.random.Generator
    anchor_ns: int
    step_ns: int
    g: float = 1.0  # GARCH variance multiplier of the current step
    step: int = -1  # index of the step being accumulated (-1: none yet)
    acc_r: float = 0.0  # its log return so far
    acc_var: float = 0.0  # its variance so far, without g (sum of (sigma x m)^2 dt)
    next_spike: int = _NEVER_NS
    next_calm: int = _NEVER_NS
    events: list[tuple[int, int, int, float]] = field(default_factory=list)  # start, end, regime, m

    def __post_init__(self) -> None:
        self.next_spike = self._onset(self.anchor_ns, self.cfg.spike_rate_per_hour)
        self.next_calm = self._onset(self.anchor_ns, self.cfg.calm_rate_per_hour)

    def _onset(self, after_ns: int, rate_per_hour: float) -> int:
        if rate_per_hour <= 0:
            return _NEVER_NS
        return after_ns + int(self.rng.exponential(3600.0 / rate_per_hour) * NS_PER_S)

    def _schedule(self, upto_ns: int) -> None:
        """Draw the spike and calm episodes that start before ``upto_ns``."""
        cfg = self.cfg
        while min(self.next_spike, self.next_calm) < upto_ns:
            spike = self.next_spike <= self.next_calm
            start = self.next_spike if spike else self.next_calm
            lo, hi = cfg.spike_minutes if spike else cfg.calm_minutes
            end = start + int(self.rng.uniform(lo, hi) * 60 * NS_PER_S)
            if spike:
                self.events.append((start, end, int(VolRegime.SPIKE), cfg.spike_multiplier))
                self.next_spike = self._onset(end, cfg.spike_rate_per_hour)
            else:
                self.events.append((start, end, int(VolRegime.CALM), cfg.calm_multiplier))
                self.next_calm = self._onset(end, cfg.calm_rate_per_hour)

    def _multipliers(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Episode multiplier and regime code at each tick (a spike wins over a calm stretch)."""
        self._schedule(int(ts[-1]) + 1)
        m = np.ones(len(ts))
        code = np.zeros(len(ts), dtype=np.uint8)
        for kind in (VolRegime.CALM, VolRegime.SPIKE):
            for start, end, k, mult in self.events:
                if k != kind or end <= ts[0] or start > ts[-1]:
                    continue
                inside = (ts >= start) & (ts < end)
                m[inside] = mult
                code[inside] = k
        return m, code

    def _close_step(self) -> None:
        """GARCH update from the finished step's standardized return."""
        a, b = self.cfg.garch_alpha, self.cfg.garch_beta
        e2 = self.acc_r * self.acc_r / self.acc_var if self.acc_var > 0 else self.g
        self.g = (1.0 - a - b) + a * e2 + b * self.g
        self.acc_r = self.acc_var = 0.0

    def path(self, ts: np.ndarray, dt: np.ndarray, z: np.ndarray, sigma_s: float,
             log_mid0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log mid at each tick, regime code and volatility multiplier ``sqrt(g) x m``."""
        m, code = self._multipliers(ts)
        step = (ts - self.anchor_ns) // self.step_ns
        cuts = np.flatnonzero(np.diff(step)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(ts)]])
        incr = np.empty(len(ts))
        mult = np.empty(len(ts))
        for i0, i1 in zip(starts.tolist(), ends.tolist()):
            k = int(step[i0])
            if self.step >= 0 and k != self.step:
                self._close_step()
                # Steps without a tick: no information, the variance moves to its mean.
                for _ in range(min(k - self.step - 1, 10_000)):
                    self._close_step()
            self.step = k
            base = sigma_s * m[i0:i1]
            sig = base * math.sqrt(self.g)
            d = dt[i0:i1]
            incr[i0:i1] = -0.5 * sig * sig * d + sig * np.sqrt(d) * z[i0:i1]
            mult[i0:i1] = math.sqrt(self.g) * m[i0:i1]
            self.acc_r += float(incr[i0:i1].sum())
            self.acc_var += float((base * base * d).sum())
        return log_mid0 + np.cumsum(incr), code, mult


@dataclass
class _AssetState:
    """Everything the simulator carries from one block to the next for one asset."""

    asset: str
    rng: np.random.Generator
    start_price: float
    noise_bp: np.ndarray  # per provider
    bias_bp: np.ndarray
    spread_bp: np.ndarray
    latency_ns: np.ndarray
    size_median: float
    t_last: int
    log_mid: float
    seq_next: np.ndarray
    init_carry: np.ndarray  # last in-order ts_init per provider
    last_quote: np.ndarray  # (providers, 3): price, bid, ask of each provider's last tick
    last_ts: np.ndarray
    last_clean: np.ndarray
    regimes: _VolRegimes | None = None
    frozen_p: int = -1
    frozen_until: int = 0
    frozen_anchor_ts: int = 0
    frozen_quote: np.ndarray = field(default_factory=lambda: np.zeros(3))
    calendar: TradingCalendar | None = None  # None or 24/7: trades around the clock
    pending: dict[str, np.ndarray] = field(default_factory=_empty_columns)
    emitted: list[dict[str, np.ndarray]] = field(default_factory=list)


class MarketSimulator:
    """Providers quoting assets around a common GBM mid, with recorded anomaly injections.

    Parameters
    ----------
    cfg
        The ``simulator`` config section.
    assets
        Assets to simulate; each needs an entry in ``cfg.start_prices``.
    seed
        Seed; the same seed gives the same ticks, batches and labels.
    consensus, bars
        Sections whose thresholds shape the frozen and late/out-of-order injections
        (``frozen_after_s``, ``allowed_lateness_s``); defaults when omitted.
    start_ns
        Event time of the first tick (UNIX ns).
    first_seq
        Sequence number of every provider's first tick. A feed restarted onto streams that
        already carry its earlier ticks must number above them: consumers drop a repeated
        ``(provider, seq)`` as a duplicate.
    calendars
        Trading calendar per asset; an asset absent (or 24/7) trades around the clock.

    Raises
    ------
    ValueError
        No asset or provider, an asset without a start price, or an out-of-order delay that
        could exceed the allowed lateness (``out_of_order_max_s + batch_s`` must stay below
        ``bars.allowed_lateness_s``).

    Examples
    --------
    >>> sim = MarketSimulator(SimulatorConfig(), ("BTC-USD",), seed=7)
    >>> batches = list(sim.run(minutes=1))
    >>> sum(len(b) for b in batches) == len(sim.labels("BTC-USD"))
    True
    >>> sorted(sim.injected) == sorted(KINDS)
    True
    """

    def __init__(
        self,
        cfg: SimulatorConfig,
        assets: tuple[str, ...] | list[str],
        seed: int,
        *,
        consensus: ConsensusConfig | None = None,
        bars: BarConfig | None = None,
        start_ns: int = DEFAULT_START_NS,
        first_seq: int = 0,
        calendars: Mapping[str, TradingCalendar] | None = None,
    ) -> None:
        assets = tuple(assets)
        if first_seq < 0:
            raise ValueError(f"first_seq must be >= 0, got {first_seq}")
        if not assets:
            raise ValueError("assets must not be empty")
        if len(set(assets)) != len(assets):
            raise ValueError(f"assets repeat a name: {assets}")
        missing = [a for a in assets if a not in cfg.start_prices]
        if missing:
            raise ValueError(f"simulator.start_prices has no entry for {missing}")
        if not cfg.providers or len(set(cfg.providers)) != len(cfg.providers):
            raise ValueError("simulator.providers must be non-empty and distinct")
        self.cfg = cfg
        self.consensus = consensus or ConsensusConfig()
        self.bar_cfg = bars or BarConfig()
        self.assets = assets
        self.providers = tuple(cfg.providers)
        weights = np.array([cfg.anomaly_mix.get(k, 0.0) for k in KINDS], dtype=np.float64)
        self._mix = weights / weights.sum() if weights.sum() > 0 else np.full(len(KINDS), 1 / len(KINDS))
        lateness = self.bar_cfg.allowed_lateness_s
        if cfg.anomaly_rate > 0 and weights[_K["out_of_order"]] > 0 and (
            cfg.out_of_order_max_s + cfg.batch_s >= lateness
        ):
            raise ValueError(
                "simulator.out_of_order_max_s + simulator.batch_s "
                f"({cfg.out_of_order_max_s + cfg.batch_s}) must be < bars.allowed_lateness_s "
                f"({lateness}) for out-of-order ticks to stay within the lateness"
            )
        self._batch_ns = max(1, round(cfg.batch_s * NS_PER_S))
        self._block_ns = self._batch_ns * max(1, math.ceil(_GEN_BLOCK_S / cfg.batch_s))
        self._sigma_s = cfg.annual_vol / math.sqrt(SECONDS_PER_YEAR)
        self._clock = int(start_ns)
        n_p = len(self.providers)
        d = cfg.provider_dispersion
        self._states: list[_AssetState] = []
        for asset, child in zip(assets, np.random.SeedSequence(seed).spawn(len(assets))):
            rng = np.random.default_rng(child)
            price0 = float(cfg.start_prices[asset])
            reg_cfg = cfg.regimes.get(asset)
            regimes = None
            if reg_cfg is not None and reg_cfg.active:
                # A stream of its own (spawned from the asset's), so the ticks' draws stay those
                # of the plain market.
                regimes = _VolRegimes(reg_cfg, np.random.default_rng(child.spawn(1)[0]),
                                      anchor_ns=self._clock,
                                      step_ns=max(1, round(reg_cfg.garch_step_s * NS_PER_S)))
            self._states.append(_AssetState(
                asset=asset, rng=rng, start_price=price0,
                noise_bp=cfg.provider_noise_bp * rng.uniform(1 - d, 1 + d, n_p),
                bias_bp=cfg.provider_bias_bp * rng.standard_normal(n_p),
                spread_bp=cfg.spread_bp * rng.uniform(1 - d, 1 + d, n_p),
                latency_ns=cfg.latency_ms_mean * 1e6 * rng.uniform(1 - d, 1 + d, n_p),
                size_median=cfg.size_notional_median / price0,
                t_last=self._clock, log_mid=math.log(price0),
                seq_next=np.full(n_p, first_seq, dtype=np.int64),
                init_carry=np.full(n_p, np.iinfo(np.int64).min, dtype=np.int64),
                last_quote=np.full((n_p, 3), np.nan), last_ts=np.full(n_p, -1, dtype=np.int64),
                last_clean=np.zeros(n_p, dtype=bool), regimes=regimes,
                calendar=(calendars or {}).get(asset),
            ))

    @classmethod
    def from_settings(
        cls, settings: Settings, seed: int, assets: tuple[str, ...] | None = None,
        start_ns: int | None = None,
    ) -> "MarketSimulator":
        """A simulator shaped by the whole configuration (simulator, consensus, bars,
        calendars)."""
        assets = assets or settings.assets
        return cls(settings.simulator, assets, seed,
                   consensus=settings.consensus, bars=settings.bars,
                   start_ns=DEFAULT_START_NS if start_ns is None else start_ns,
                   calendars={a: trading_calendar(settings, a) for a in assets})

    # ------------------------------------------------------------------ public API

    @property
    def clock_ns(self) -> int:
        """Event time up to which ticks have been generated."""
        return self._clock

    def run(self, minutes: float, *, flush: bool = True) -> Iterator[TickBatch]:
        """Simulate ``minutes`` more of market time.

        Yields one batch per asset per ``batch_s`` slice of receive time (empty slices are
        skipped), in delivery order. With ``flush`` (default) the ticks still in flight at the
        end are delivered in a last batch per asset, and delayed injections (late,
        out-of-order, duplicate) that would arrive after the end are not made; with
        ``flush=False`` they stay in flight and a following ``run`` continues seamlessly.

        Raises
        ------
        ValueError
            ``minutes`` <= 0.
        """
        if not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        end = self._clock + round(minutes * NS_PER_MIN)
        final_end = end if flush else None
        t0 = self._clock
        while t0 < end:
            t1 = min(t0 + self._block_ns, end)
            for st in self._states:
                self._generate(st, t0, t1, final_end)
            self._clock = t1
            s0 = t0
            while s0 < t1:
                s1 = min(s0 + self._batch_ns, t1)
                for st in self._states:
                    batch = self._emit(st, s1)
                    if batch is not None:
                        yield batch
                s0 = s1
            t0 = t1
        if flush:
            for st in self._states:
                batch = self._emit(st, None)
                if batch is not None:
                    yield batch

    @property
    def injected(self) -> dict[str, int]:
        """Injected anomalies among the emitted ticks, by kind (all assets)."""
        counts = np.zeros(len(LABELS), dtype=np.int64)
        for st in self._states:
            for part in st.emitted:
                counts += np.bincount(part["label"], minlength=len(LABELS))
        return {k: int(counts[_CODE[k]]) for k in KINDS}

    def labels(self, asset: str) -> np.ndarray:
        """Label of each emitted tick of ``asset`` in emission order (kind name, ``""`` clean)."""
        return np.asarray(LABELS, dtype=object)[self._emitted(asset, "label")]

    def tick_keys(self, asset: str) -> pd.DataFrame:
        """Per emitted tick, in emission order: provider, seq, occurrence, label, ts_event,
        ts_init, regime (volatility regime name) and vol_annual (the mid's annualized
        volatility at the tick's event time).

        ``occurrence`` tells a duplicate (1) from its original (0), which share provider and
        seq; (provider, seq, occurrence) is unique, so statuses can be joined back by key.
        """
        return pd.DataFrame({
            "provider": np.asarray(self.providers, dtype=object)[self._emitted(asset, "provider")],
            "seq": self._emitted(asset, "seq"),
            "occurrence": self._emitted(asset, "occurrence").astype(np.int64),
            "label": self.labels(asset),
            "ts_event": self._emitted(asset, "ts_event"),
            "ts_init": self._emitted(asset, "ts_init"),
            "regime": self.regimes(asset),
            "vol_annual": self._emitted(asset, "vol"),
        })

    def regimes(self, asset: str) -> np.ndarray:
        """Volatility regime of each emitted tick of ``asset`` (name), in emission order."""
        return np.asarray(REGIMES, dtype=object)[self._emitted(asset, "regime")]

    def regime_bars(self, asset: str, freq_s: int = 60) -> pd.DataFrame:
        """Per bar of ``freq_s`` seconds (by event time) with emitted ticks of ``asset``.

        Columns: ``ts`` (bar open, UNIX ns), ``regime`` (the regime of most of its ticks; a
        tie goes to the more extreme), ``vol_annual`` (mean annualized volatility of the mid at
        its ticks) and ``ticks``.
        """
        freq = int(freq_s) * NS_PER_S
        ts = self._emitted(asset, "ts_event")
        frame = pd.DataFrame({"ts": ts - ts % freq, "regime": self._emitted(asset, "regime"),
                              "vol": self._emitted(asset, "vol")})
        counts = frame.groupby(["ts", "regime"]).size().unstack(fill_value=0)
        # Most ticks wins; among equals the higher code (spike > calm > normal).
        codes = counts.columns.to_numpy()
        mode = codes[len(codes) - 1 - np.argmax(counts.to_numpy()[:, ::-1], axis=1)]
        agg = frame.groupby("ts").agg(vol_annual=("vol", "mean"), ticks=("vol", "size"))
        return pd.DataFrame({
            "ts": agg.index.to_numpy(np.int64),
            "regime": np.asarray(REGIMES, dtype=object)[mode.astype(np.int64)],
            "vol_annual": agg["vol_annual"].to_numpy(),
            "ticks": agg["ticks"].to_numpy(np.int64),
        })

    def regime_events(self, asset: str) -> pd.DataFrame:
        """Spike and calm episodes of ``asset`` drawn so far: start_ns, end_ns, regime, multiplier."""
        reg = self._state(asset).regimes
        events = reg.events if reg is not None else []
        return pd.DataFrame({
            "start_ns": np.array([e[0] for e in events], dtype=np.int64),
            "end_ns": np.array([e[1] for e in events], dtype=np.int64),
            "regime": [REGIMES[e[2]] for e in events],
            "multiplier": np.array([e[3] for e in events], dtype=np.float64),
        })

    def provider_profile(self, asset: str) -> pd.DataFrame:
        """The drawn per-provider parameters of ``asset`` (index: provider name)."""
        st = self._state(asset)
        return pd.DataFrame({
            "bias_bp": st.bias_bp, "noise_bp": st.noise_bp, "spread_bp": st.spread_bp,
            "latency_ms": st.latency_ns / 1e6,
        }, index=pd.Index(self.providers, name="provider"))

    # ------------------------------------------------------------------ internals

    def _state(self, asset: str) -> _AssetState:
        for st in self._states:
            if st.asset == asset:
                return st
        raise KeyError(f"asset {asset!r} is not simulated (have {self.assets})")

    def _emitted(self, asset: str, column: str) -> np.ndarray:
        parts = [p[column] for p in self._state(asset).emitted]
        return np.concatenate(parts) if parts else _empty_columns()[column]

    def _emit(self, st: _AssetState, upto: int | None) -> TickBatch | None:
        """Deliver the pending ticks received before ``upto`` (all when None)."""
        pend = st.pending
        k = len(pend["ts_init"]) if upto is None else int(np.searchsorted(pend["ts_init"], upto, "left"))
        if k == 0:
            return None
        out = {c: v[:k] for c, v in pend.items()}
        st.pending = {c: v[k:] for c, v in pend.items()}
        st.emitted.append({c: out[c] for c in _RECORDED})
        return TickBatch(
            asset=st.asset, providers=self.providers, provider=out["provider"],
            ts_event=out["ts_event"], ts_init=out["ts_init"], price=out["price"],
            size=out["size"], bid=out["bid"], ask=out["ask"], seq=out["seq"],
            status=out["status"].copy(),
        )

    def _generate(self, st: _AssetState, t0: int, t1: int, final_end: int | None) -> None:
        """Generate the ticks with event time in [t0, t1) and add them to the pending set."""
        cfg, rng = self.cfg, st.rng
        n_p = len(self.providers)
        counts = rng.poisson(cfg.ticks_per_provider_per_s * (t1 - t0) / NS_PER_S, n_p)
        n = int(counts.sum())
        if n == 0:
            return
        provider = np.repeat(np.arange(n_p, dtype=np.int16), counts)
        ts = t0 + (rng.random(n) * (t1 - t0)).astype(np.int64)
        order = np.lexsort((provider, ts))
        provider, ts = provider[order], ts[order]
        if st.calendar is not None and not st.calendar.always_open:
            # Nothing trades while the market is closed; the mid moves on regardless (below,
            # dt spans the closure), which makes the gap at the reopen.
            in_session = st.calendar.is_open(ts)
            if not in_session.all():
                provider, ts = provider[in_session], ts[in_session]
                n = len(ts)
                if n == 0:
                    return

        # The common mid: exact GBM sampling at every tick time (volatility piecewise constant
        # per regime step when the asset has regimes).
        dt = np.diff(ts, prepend=st.t_last).astype(np.float64) / NS_PER_S
        sig = self._sigma_s
        if st.regimes is None:
            log_mid = st.log_mid + np.cumsum(-0.5 * sig * sig * dt + sig * np.sqrt(dt) * rng.standard_normal(n))
            regime = np.zeros(n, dtype=np.uint8)
            vol = np.full(n, cfg.annual_vol)
        else:
            log_mid, regime, mult = st.regimes.path(ts, dt, rng.standard_normal(n), sig, st.log_mid)
            vol = cfg.annual_vol * mult
        st.log_mid, st.t_last = float(log_mid[-1]), int(ts[-1])

        dev_bp = st.bias_bp[provider] + st.noise_bp[provider] * rng.standard_normal(n)
        quote_mid = np.exp(log_mid + dev_bp * 1e-4)
        half = 0.5e-4 * st.spread_bp[provider] * np.exp(cfg.spread_jitter * rng.standard_normal(n))
        bid, ask = quote_mid * (1 - half), quote_mid * (1 + half)
        price = np.where(rng.random(n) < 0.5, bid, ask)  # trades print at the touch
        size = st.size_median * np.exp(cfg.size_log_sigma * rng.standard_normal(n))
        jit = cfg.latency_jitter
        latency = st.latency_ns[provider] * np.exp(jit * rng.standard_normal(n) - 0.5 * jit * jit)
        ts_init = ts + latency.astype(np.int64)

        seq = np.empty(n, dtype=np.int64)
        prev_same = np.full(n, -1, dtype=np.int64)
        next_same = np.full(n, -1, dtype=np.int64)
        last_of = np.full(n_p, -1, dtype=np.int64)
        for p in range(n_p):
            idx = np.flatnonzero(provider == p)
            if not len(idx):
                continue
            # One connection per provider: its ticks arrive in the order they happened.
            ts_init[idx] = np.maximum.accumulate(np.maximum(ts_init[idx], st.init_carry[p]))
            st.init_carry[p] = ts_init[idx[-1]]
            seq[idx] = st.seq_next[p] + np.arange(len(idx))
            st.seq_next[p] += len(idx)
            prev_same[idx[1:]] = idx[:-1]
            next_same[idx[:-1]] = idx[1:]
            last_of[p] = idx[-1]

        hit = rng.random(n) < cfg.anomaly_rate
        kind = rng.choice(len(KINDS), size=n, p=self._mix)
        label = np.zeros(n, dtype=np.uint8)
        status = np.zeros(n, dtype=np.uint8)
        in_stretch = np.zeros(n, dtype=bool)
        base_quote = np.stack([price, bid, ask], axis=1)
        self._freeze(st, t1, provider, ts, hit, kind, prev_same, base_quote, label, in_stretch)
        price, bid, ask = (base_quote[:, c].copy() for c in range(3))

        elig = hit & (kind != _K["frozen"]) & ~in_stretch
        sel = {k: np.flatnonzero(elig & (kind == _K[k])) for k in KINDS if k != "frozen"}
        i = sel["null"]
        price[i], bid[i], ask[i], status[i] = np.nan, np.nan, np.nan, TickStatus.NULL
        price[sel["nan"]] = np.nan
        i = sel["inf"]
        price[i] = np.where(rng.random(len(i)) < 0.5, np.inf, -np.inf)
        i = sel["nonpositive"]
        price[i] = np.where(rng.random(len(i)) < 0.5, 0.0, -price[i])
        i = sel["jump"]
        lo, hi = cfg.jump_factor
        f = rng.uniform(lo, hi, len(i))
        price[i] = np.where(rng.random(len(i)) < 0.5, price[i] * f, price[i] / f)
        for k in ("null", "nan", "inf", "nonpositive", "jump"):
            label[sel[k]] = _CODE[k]

        base_init = ts_init.copy()
        # Late: past the lateness even when the consumer's watermark trails by one batch.
        i = sel["late"]
        lo, hi = cfg.late_extra_s
        delay_s = self.bar_cfg.allowed_lateness_s + cfg.batch_s + rng.uniform(lo, hi, len(i))
        new = ts[i] + (delay_s * NS_PER_S).astype(np.int64)
        ok = np.ones(len(i), dtype=bool) if final_end is None else new < final_end
        ts_init[i[ok]] = new[ok]
        label[i[ok]] = _CODE["late"]

        # Out of order: arrives after the provider's next tick, within out_of_order_max_s.
        i = sel["out_of_order"]
        nxt = next_same[i]
        max_ns = round(cfg.out_of_order_max_s * NS_PER_S)
        d = (rng.uniform(0, cfg.out_of_order_max_s, len(i)) * NS_PER_S).astype(np.int64)
        nxt_init = base_init[np.maximum(nxt, 0)] + _OOO_MARGIN_NS
        nxt_delayed = (nxt >= 0) & elig[np.maximum(nxt, 0)] & np.isin(
            kind[np.maximum(nxt, 0)], [_K["late"], _K["out_of_order"]])
        new = np.minimum(np.maximum(base_init[i] + d, nxt_init), ts[i] + max_ns)
        ok = (nxt >= 0) & ~nxt_delayed & (nxt_init <= ts[i] + max_ns)
        if final_end is not None:
            ok &= new < final_end
        ts_init[i[ok]] = new[ok]
        label[i[ok]] = _CODE["out_of_order"]

        # Duplicates: an exact re-send of a clean tick, a little later.
        i = sel["duplicate"]
        dup_init = base_init[i] + np.maximum(
            1, (rng.uniform(0, cfg.duplicate_delay_s, len(i)) * NS_PER_S).astype(np.int64))
        if final_end is not None:
            keep = dup_init < final_end
            i, dup_init = i[keep], dup_init[keep]

        for p in range(n_p):
            j = last_of[p]
            if j >= 0:
                st.last_quote[p] = (price[j], bid[j], ask[j])
                st.last_ts[p] = ts[j]
                st.last_clean[p] = label[j] == 0

        block = {
            "provider": provider, "ts_event": ts, "ts_init": ts_init, "price": price,
            "size": size, "bid": bid, "ask": ask, "seq": seq, "status": status, "label": label,
            "occurrence": np.zeros(n, dtype=np.uint8), "regime": regime, "vol": vol,
        }
        dups = {c: v[i] for c, v in block.items()}
        dups["ts_init"] = dup_init
        dups["status"] = np.zeros(len(i), dtype=np.uint8)
        dups["label"] = np.full(len(i), _CODE["duplicate"], dtype=np.uint8)
        dups["occurrence"] = np.ones(len(i), dtype=np.uint8)
        merged = {c: np.concatenate([st.pending[c], block[c], dups[c]]) for c in _COLUMNS}
        order = np.argsort(merged["ts_init"], kind="stable")
        st.pending = {c: v[order] for c, v in merged.items()}

    def _freeze(
        self, st: _AssetState, t1: int, provider: np.ndarray, ts: np.ndarray, hit: np.ndarray,
        kind: np.ndarray, prev_same: np.ndarray, quote: np.ndarray, label: np.ndarray,
        in_stretch: np.ndarray,
    ) -> None:
        """Mark stale stretches (continued from the last block or started here), in place.

        Rows of a stretch get the anchor's quote in ``quote`` and a frozen/stale ``label``.

        One provider at most is frozen at a time per asset, so that the others keep moving. A
        stretch repeats the quote of the provider's last tick before it, which must be clean,
        so that its price is unchanged from that tick's event time (the stretch's anchor).
        """
        frozen_after = round(self.consensus.frozen_after_s * NS_PER_S)
        length = round(self.cfg.frozen_factor * self.consensus.frozen_after_s * NS_PER_S)

        def mark(p: int, start: int, until: int, anchor_ts: int, anchor_q: np.ndarray) -> None:
            m = (provider == p) & (ts >= start) & (ts < until)
            in_stretch[m] = True
            quote[m] = anchor_q
            label[m] = np.where(ts[m] - anchor_ts >= frozen_after, _CODE["frozen"], _CODE[STALE])

        if st.frozen_p >= 0:
            mark(st.frozen_p, np.iinfo(np.int64).min, st.frozen_until, st.frozen_anchor_ts,
                 st.frozen_quote)
        if len(self.providers) >= 2 and self._mix[_K["frozen"]] > 0:
            for i in np.flatnonzero(hit & (kind == _K["frozen"])):
                if in_stretch[i] or (st.frozen_p >= 0 and ts[i] < st.frozen_until):
                    continue
                p, j = int(provider[i]), int(prev_same[i])
                if j >= 0:
                    if in_stretch[j] or (hit[j] and kind[j] != _K["frozen"]):
                        continue  # the anchor must be a clean tick
                    anchor_q, anchor_ts = quote[j].copy(), int(ts[j])
                else:
                    if st.last_ts[p] < 0 or not st.last_clean[p]:
                        continue
                    anchor_q, anchor_ts = st.last_quote[p].copy(), int(st.last_ts[p])
                until = anchor_ts + length
                if ts[i] >= until:
                    continue
                st.frozen_p, st.frozen_until = p, until
                st.frozen_anchor_ts, st.frozen_quote = anchor_ts, anchor_q
                mark(p, int(ts[i]), until, anchor_ts, anchor_q)
        if st.frozen_p >= 0 and st.frozen_until <= t1:
            st.frozen_p = -1


def score_detection(
    labels: np.ndarray | list[str], statuses: np.ndarray | list[int]
) -> tuple[dict[str, int], dict[str, int], float]:
    """Score a pipeline's statuses against the injection labels, tick by tick.

    Parameters
    ----------
    labels
        Per-tick labels (:meth:`MarketSimulator.labels`), in emission order.
    statuses
        The pipeline's :class:`~tickcast.errors.TickStatus` per tick, same order.

    Returns
    -------
    injected
        Ticks per anomaly kind.
    detected
        Of those, ticks whose status is the expected one (:data:`EXPECTED_STATUS`; for
        ``out_of_order`` that is ``OK``: accepted).
    clean_rejected_fraction
        Fraction of clean ticks (label ``""``) whose status is not ``OK``; 0 with no clean tick.
        ``"stale"`` ticks count nowhere.

    Raises
    ------
    ValueError
        ``labels`` and ``statuses`` differ in length.

    Examples
    --------
    >>> score_detection(["", "jump", "null", ""], [0, 8, 0, 7])
    ({'null': 1, 'nan': 0, 'inf': 0, 'nonpositive': 0, 'jump': 1, 'frozen': 0, 'duplicate': 0, 'out_of_order': 0, 'late': 0}, {'null': 0, 'nan': 0, 'inf': 0, 'nonpositive': 0, 'jump': 1, 'frozen': 0, 'duplicate': 0, 'out_of_order': 0, 'late': 0}, 0.5)
    """
    lab = np.asarray(labels, dtype=object)
    stat = np.asarray(statuses, dtype=np.int64)
    if len(lab) != len(stat):
        raise ValueError(f"labels ({len(lab)}) and statuses ({len(stat)}) differ in length")
    injected: dict[str, int] = {}
    detected: dict[str, int] = {}
    for kind in KINDS:
        mask = lab == kind
        injected[kind] = int(mask.sum())
        detected[kind] = int((stat[mask] == int(EXPECTED_STATUS[kind])).sum())
    clean = lab == ""
    frac = float((stat[clean] != int(TickStatus.OK)).mean()) if clean.any() else 0.0
    return injected, detected, frac
