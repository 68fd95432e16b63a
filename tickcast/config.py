"""Typed, validated configuration.

Every threshold of the system lives in ``configs/default.yaml``. Values are layered:

1. ``configs/default.yaml`` (or the file named by ``TICKCAST_CONFIG``),
2. environment variables ``TICKCAST__SECTION__KEY=value`` (values parsed as YAML scalars),
   plus the conventional ``REDIS_URL``, ``TICKCAST_DATA_DIR`` and ``TICKCAST_ADMIN_TOKEN``,
3. CLI overrides ``--set section.key=value``.

Unknown keys are rejected (``extra="forbid"``) so that a typo never silently falls back to a
default. A bad file or value raises :class:`tickcast.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from tickcast.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = ROOT / "configs" / "default.yaml"


class Section(BaseModel):
    """Base for config sections: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisConfig(Section):
    url: str | None = None  # redis://[:password@]host:port/db ; None -> embedded server
    embedded_port: int = Field(0, ge=0, le=65535)  # 0 -> pick a free port
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    socket_timeout_s: float = Field(2.0, gt=0)


class IngestConfig(Section):
    stream_prefix: str = "ticks:"
    batch_max_ticks: int = Field(20_000, ge=1)
    consumer_block_ms: int = Field(200, ge=1)
    consumer_count: int = Field(64, ge=1)  # stream entries (batches) read per XREAD
    checkpoint_every_batches: int = Field(1, ge=1)
    # None: join the cluster in RAY_ADDRESS or the one `ray start` recorded, else start a
    # private local Ray; "local": always private; anything else: that cluster address.
    ray_address: str | None = None
    ray_connect_timeout_s: float = Field(10.0, gt=0)  # a cluster's port must accept TCP by then
    keep_tick_status: bool = False  # audit mode: actors keep (provider, seq, status) per tick
    xadd_pipeline_entries: int = Field(32, ge=1)  # stream entries per Redis round trip (driver)
    actor_max_concurrency: int = Field(8, ge=2)  # asset actor threads: consumer + queries
    read_retry_initial_s: float = Field(0.05, gt=0)  # backoff after a failed XREAD ...
    read_retry_max_s: float = Field(2.0, gt=0)  # ... doubling up to this
    wait_timeout_s: float = Field(900.0, gt=0)  # driver: max wait for actors to catch up
    drain_timeout_s: float = Field(300.0, gt=0)  # driver: max wait for its WAL to reach Redis
    progress_every_s: float = Field(5.0, gt=0)  # driver: stderr progress line period
    max_backlog_entries: int = Field(64, ge=1)  # driver waits while streams hold more entries
    features_bars_per_batch: int = Field(64, ge=1)  # online-feature updates per consumed group;
    # more bars than this (a catch-up) are deferred until the stream is drained ...
    features_catchup_chunk: int = Field(2048, ge=1)  # ... then fed this many at a time


class ValidationConfig(Section):
    max_price: float = Field(1e9, gt=0)
    max_size: float = Field(1e12, gt=0)
    max_future_s: float = Field(300.0, ge=0)  # event time this far ahead of receive time is malformed
    min_event_ts_s: float = Field(946_684_800.0, ge=0)  # event time before 2000-01-01 is malformed
    max_event_ts_s: float = Field(4_102_444_800.0, gt=0)  # event time after 2100-01-01 is malformed


class DedupConfig(Section):
    window: int = Field(200_000, ge=16)  # recent (provider, key) pairs remembered per asset


class OutlierConfig(Section):
    band_bp: float = Field(400.0, gt=0)  # base band around the running reference
    dispersion_k: float = Field(12.0, ge=0)  # band widens by k x recent cross-provider dispersion
    level_window: int = Field(5, ge=1)  # ticks in each provider's robust (median) level
    dispersion_halflife_ticks: float = Field(200.0, gt=0)
    majority_min: int = Field(3, ge=2)  # fresh levels from which their median alone decides
    # With fewer fresh levels a provider's own level can confirm its own move (re-anchor after
    # a few ticks) only when that move, from the price of its last accepted tick, is plausible:
    # at most max(reanchor_max_bp, reanchor_vol_k x its recent 1-minute volatility). A larger
    # move must first persist for reanchor_persist_s, or be confirmed by another provider.
    reanchor_max_bp: float = Field(1000.0, gt=0)
    reanchor_vol_k: float = Field(10.0, ge=0)
    reanchor_persist_s: float = Field(300.0, ge=0)
    # Volatility: EWMA over the accepted ticks judged by fewer than majority_min levels of
    # r^2 / max(dt, reanchor_vol_min_dt_s), a variance per second (below the floor, price
    # changes are microstructure noise, not volatility).
    reanchor_vol_halflife_ticks: float = Field(500.0, gt=0)
    reanchor_vol_min_dt_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _reanchor_above_band(self) -> "OutlierConfig":
        # A move inside the band never needs re-anchoring; a plausibility cap below it would
        # hold back moves the band accepts.
        if self.reanchor_max_bp < self.band_bp:
            raise ValueError("reanchor_max_bp must be >= band_bp")
        return self


class ConsensusConfig(Section):
    stale_after_s: float = Field(120.0, gt=0)  # provider without a quote this long is excluded
    frozen_after_s: float = Field(90.0, gt=0)  # unchanged price this long while others move
    # ... and only if, during that run, the other providers' median level left the unchanged
    # price by more than <floor> + frozen_dispersion_k x recent dispersion (bp); the floor is
    # frozen_quote_move_bp at a tick repeating its whole bid/ask quote, else frozen_move_bp
    frozen_move_bp: float = Field(4.0, ge=0)
    frozen_quote_move_bp: float = Field(1.0, ge=0)
    frozen_dispersion_k: float = Field(2.0, ge=0)
    reliability_alpha: float = Field(0.02, gt=0, le=1)  # EWMA step of provider reliability
    min_reliability: float = Field(0.2, ge=0, le=1)  # below: provider excluded from consensus
    # Above it, a provider's votes weigh its reliability ("reliability": weighted median) or
    # count alike ("equal": the plain median of the providers left in).
    weighting: Literal["reliability", "equal"] = "reliability"


class BarConfig(Section):
    freq_s: int = Field(60, ge=1)
    allowed_lateness_s: float = Field(120.0, ge=0)


class GapConfig(Section):
    # By duration: ffill up to ffill_max_minutes; MICE from mice_min_minutes to
    # mice_max_minutes where other providers' series allow it; else linear interpolation up to
    # interp_max_minutes; else recovery from one other provider; else excluded.
    ffill_max_minutes: int = Field(2, ge=0)
    interp_max_minutes: int = Field(10, ge=0)
    provider_recovery: bool = True
    mice_min_minutes: int = Field(3, ge=1)
    mice_max_minutes: int = Field(720, ge=0)  # 0: MICE off
    mice_context_minutes: int = Field(240, ge=1)  # fitted on this much on each side of the gap
    mice_min_rows: int = Field(30, ge=2)  # fewest minutes where series and a predictor both quote
    mice_imputations: int = Field(5, ge=1)
    mice_max_iter: int = Field(10, ge=1)
    mice_seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "GapConfig":
        if self.interp_max_minutes < self.ffill_max_minutes:
            raise ValueError("interp_max_minutes must be >= ffill_max_minutes")
        if self.mice_max_minutes and self.mice_max_minutes < self.mice_min_minutes:
            raise ValueError("mice_max_minutes must be 0 (off) or >= mice_min_minutes")
        return self


class BreakerConfig(Section):
    window_type: Literal["count", "time"] = "count"
    window_size: int = Field(20, ge=1)  # calls (count) or seconds (time)
    min_calls: int = Field(5, ge=1)
    failure_rate_threshold: float = Field(0.5, gt=0, le=1)
    slow_call_s: float = Field(2.0, gt=0)
    slow_call_rate_threshold: float = Field(0.8, gt=0, le=1)
    open_s: float = Field(0.5, gt=0)  # first wait before half-open
    backoff_multiplier: float = Field(2.0, ge=1)
    max_open_s: float = Field(10.0, gt=0)
    half_open_probes: int = Field(3, ge=1)


class RegimeConfig(Section):
    """Volatility regimes of one simulated asset (all off by default: a plain GBM).

    The mid's volatility is ``annual_vol x sqrt(g) x m``: ``g`` a GARCH(1,1) multiplier updated
    every ``garch_step_s`` from the step's standardized return (``g' = 1 - a - b + a e^2 + b g``,
    mean 1), ``m`` the multiplier of a spike (``spike_multiplier``) or a calm stretch
    (``calm_multiplier``), episodes starting at Poisson rates and lasting U[lo, hi] minutes.
    """

    garch_alpha: float = Field(0.0, ge=0, lt=1)
    garch_beta: float = Field(0.0, ge=0, lt=1)
    garch_step_s: float = Field(60.0, gt=0)
    spike_rate_per_hour: float = Field(0.0, ge=0)
    spike_multiplier: float = Field(4.0, ge=1)
    spike_minutes: tuple[float, float] = (10.0, 30.0)
    calm_rate_per_hour: float = Field(0.0, ge=0)
    calm_multiplier: float = Field(0.3, gt=0, le=1)
    calm_minutes: tuple[float, float] = (30.0, 90.0)

    @model_validator(mode="after")
    def _ranges(self) -> "RegimeConfig":
        if self.garch_alpha + self.garch_beta >= 1:
            raise ValueError("garch_alpha + garch_beta must be < 1 (a stationary variance)")
        for name in ("spike_minutes", "calm_minutes"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi")
        return self

    @property
    def active(self) -> bool:
        """Whether any regime process is on."""
        return self.garch_alpha > 0 or self.spike_rate_per_hour > 0 or self.calm_rate_per_hour > 0


class SimulatorConfig(Section):
    providers: tuple[str, ...] = ("alpha", "bravo", "charlie", "delta")
    ticks_per_provider_per_s: float = Field(2.0, gt=0)
    annual_vol: float = Field(0.6, gt=0)
    start_prices: dict[str, float] = {"BTC-USD": 60_000.0, "ETH-USD": 3_000.0}
    provider_noise_bp: float = Field(1.5, ge=0)
    latency_ms_mean: float = Field(40.0, ge=0)
    anomaly_rate: float = Field(0.01, ge=0, le=0.5)  # per tick, across kinds
    # Injected anomalies: relative weight of each kind (a "frozen" draw starts a whole stale
    # stretch, hence its small weight).
    anomaly_mix: dict[str, float] = {
        "null": 1.0, "nan": 1.0, "inf": 1.0, "nonpositive": 1.0, "jump": 1.0, "frozen": 0.1,
        "duplicate": 1.0, "out_of_order": 1.0, "late": 1.0,
    }
    provider_bias_bp: float = Field(0.5, ge=0)  # sd of each provider's persistent offset
    provider_dispersion: float = Field(0.5, ge=0, lt=1)  # providers' noise/spread/latency x U[1-d, 1+d]
    spread_bp: float = Field(2.0, ge=0)  # median full bid/ask spread
    spread_jitter: float = Field(0.3, ge=0)  # lognormal sigma of the spread, tick to tick
    latency_jitter: float = Field(0.5, ge=0)  # lognormal sigma of the latency (mean kept)
    size_notional_median: float = Field(2_000.0, gt=0)  # median trade size, quote currency
    size_log_sigma: float = Field(1.2, ge=0)
    batch_s: float = Field(5.0, gt=0)  # receive-time span of one emitted batch
    jump_factor: tuple[float, float] = (5.0, 20.0)  # a jump multiplies or divides by U[lo, hi]
    frozen_factor: float = Field(2.0, gt=1)  # stale stretch = factor x consensus.frozen_after_s
    duplicate_delay_s: float = Field(2.0, gt=0)  # a re-send arrives up to this after the original
    out_of_order_max_s: float = Field(20.0, gt=0)  # + batch_s must stay < bars.allowed_lateness_s
    late_extra_s: tuple[float, float] = (5.0, 60.0)  # late = lateness + batch_s + U[lo, hi] s
    # Volatility regimes per asset (GARCH clustering, spikes, calm stretches); an asset without
    # an entry follows a plain GBM at annual_vol.
    regimes: dict[str, RegimeConfig] = {}

    @model_validator(mode="after")
    def _anomalies(self) -> "SimulatorConfig":
        kinds = {"null", "nan", "inf", "nonpositive", "jump", "frozen", "duplicate",
                 "out_of_order", "late"}
        unknown = sorted(set(self.anomaly_mix) - kinds)
        if unknown:
            raise ValueError(f"anomaly_mix has unknown kind(s) {unknown}; known: {sorted(kinds)}")
        if any(w < 0 for w in self.anomaly_mix.values()):
            raise ValueError("anomaly_mix weights must be >= 0")
        if self.anomaly_rate > 0 and sum(self.anomaly_mix.values()) <= 0:
            raise ValueError("anomaly_mix weights must not all be 0 when anomaly_rate > 0")
        lo, hi = self.jump_factor
        if not 1 < lo <= hi:
            raise ValueError("jump_factor must satisfy 1 < lo <= hi")
        lo, hi = self.late_extra_s
        if not 0 <= lo <= hi:
            raise ValueError("late_extra_s must satisfy 0 <= lo <= hi")
        unknown = sorted(set(self.regimes) - set(self.start_prices))
        if unknown:
            raise ValueError(f"regimes has asset(s) {unknown} without a start price")
        return self


class FeatureConfig(Section):
    return_lags: tuple[int, ...] = (1, 2, 3, 5, 10, 15, 30)
    vol_short: int = Field(10, ge=2)
    vol_long: int = Field(60, ge=3)
    momentum: int = Field(30, ge=1)
    rsi: int = Field(14, ge=2)
    macd: tuple[int, int, int] = (12, 26, 9)
    volume_z: int = Field(60, ge=3)
    gap_age_cap: int = Field(240, ge=1)  # minutes_since_gap saturates here (history-independent)
    amend_depth: int = Field(5, ge=1)  # recent bars whose state is kept to replay an amendment

    @model_validator(mode="after")
    def _windows_ordered(self) -> "FeatureConfig":
        if self.vol_short >= self.vol_long:
            raise ValueError("vol_short must be < vol_long")
        fast, slow, signal = self.macd
        if not (1 <= fast < slow) or signal < 1:
            raise ValueError("macd must be (fast, slow, signal) with 1 <= fast < slow and signal >= 1")
        if not self.return_lags or min(self.return_lags) < 1 or len(set(self.return_lags)) != len(self.return_lags):
            raise ValueError("return_lags must be distinct integers >= 1")
        return self


class ModelConfig(Section):
    horizon: int = Field(1, ge=1)
    quantiles: tuple[float, float, float] = (0.05, 0.5, 0.95)
    registry_dir: str = "registry"
    calibration_fraction: float = Field(0.2, gt=0, lt=0.9)
    conformal_window: int = Field(720, ge=50)  # recent residuals used by adaptive conformal
    conformal_scaled: bool = True  # scores divided by the causal short realized vol
    conformal_aci_gamma: float = Field(0.005, ge=0, lt=1)  # ACI step (Gibbs & Candes); 0 = off
    conformal_sigma_floor: float = Field(1e-5, gt=0)  # smallest vol scale (log-return units)
    purge_bars: int = Field(60, ge=0)
    walk_forward_folds: int = Field(3, ge=1)
    fee_bp: float = Field(1.0, ge=0)
    onnx_parity_tol: float = Field(1e-5, gt=0)
    reference_sample_rows: int = Field(2000, ge=100)
    native_min_rows: int = Field(32, ge=1)  # no compiled engine: native XGBoost from N rows
    compiled_engine: bool = True  # all batch sizes on the compiled tree kernel (bench.inference)


class TuneConfig(Section):
    trials: int = Field(8, ge=1)
    max_rounds: int = Field(300, ge=10)
    grace_rounds: int = Field(30, ge=1)
    report_every: int = Field(10, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(10.0, ge=0)
    look_back_period_s: float = Field(5.0, gt=0)  # window the ongoing-request average is taken over
    metrics_interval_s: float = Field(1.0, gt=0)  # how often replicas report ongoing requests
    # Replicas also scale on event-loop load (serve_app/autoscaling.py): inline scoring hides
    # the queue from the ongoing-request count. Share of wall time a replica's loop should be
    # busy on average (0 turns this signal off); scale down only to below downscale_fill of it.
    target_busy: float = Field(0.8, ge=0, le=1)
    downscale_fill: float = Field(0.75, gt=0, le=1)


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    admin_token: str | None = None  # None -> admin endpoints disabled
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # Excess of an oversized body read and discarded before its 413, so the connection stays
    # usable (bigger bodies: the 413 at once and a close).
    body_drain_bytes: int = Field(262_144, ge=0)
    max_batch_assets: int = Field(5000, ge=1)
    feature_max_age_s: float = Field(180.0, gt=0)
    feature_refresh_s: float = Field(0.5, gt=0)
    prediction_stream: str = Field("predictions", min_length=1)  # prefix of predictions:<ASSET>
    prediction_log_batch: int = Field(256, ge=1)
    prediction_log_queue: int = Field(100_000, ge=1)
    sla_latency_ms: float = Field(150.0, gt=0)
    use_haproxy: bool = True
    haproxy_threads: int = Field(1, ge=1)  # HAProxy nbthread (Ray's default, 4, oversubscribes 2 cores)
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    # Replicas: resources and concurrency (one FastAPI-ingress deployment, see serve_app/app.py).
    replica_num_cpus: float = Field(0.0, ge=0)  # 0: replicas never wait for a CPU reservation
    drain_period_s: float = Field(5.0, gt=0)  # a stopping replica stays reachable while HAProxy drops it
    max_ongoing_requests: int = Field(32, ge=1)  # per replica; beyond it HAProxy queues
    handler_threads: int = Field(4, ge=0)  # batch scoring threads per replica; 0: on the event loop
    predict_inline: bool = True  # single predictions on the event loop (cheaper than a thread hop)
    access_log: bool = False  # Ray Serve's per-request access log line (costs ~3% at 2k req/s)
    gil_switch_interval_s: float = Field(0.001, gt=0)  # replica's sys.setswitchinterval (default 0.005)
    user_code_thread: bool = False  # Serve's second event loop for app code (Ray's default: on)
    onnx_threads: int = Field(1, ge=1)  # onnxruntime intra-op threads per session
    native_threads: int = Field(1, ge=1)  # XGBoost threads for large batches (model.native_min_rows)
    # Routing state (blue/green versions, weights, shadow) shared by replicas through Redis.
    redis_prefix: str = Field("serve:", min_length=1)
    registry_poll_s: float = Field(2.0, gt=0)  # registry aliases re-read (new champion/challenger)
    # Replicas follow the change feed (changes:online) each feature_refresh_s and re-read
    # every tracked asset only this often, as a safety net for writers that bypass the feed.
    feature_resync_s: float = Field(60.0, gt=0)
    switch_timeout_s: float = Field(10.0, gt=0)  # admin calls wait this long for the local swap
    shadow_default: bool = False
    sticky_header: str = Field("X-Request-Key", min_length=1)
    sticky_salt: str = ""  # change it to reshuffle every A/B group at once
    # Prediction log: one stream per asset, `<prediction_stream>:<ASSET>`, each capped at about
    # this many entries (both slots' rows).
    prediction_stream_maxlen_per_asset: int = Field(20_000, ge=1)
    prediction_log_flush_s: float = Field(0.05, gt=0)
    prediction_log_max_busy: float = Field(0.25, gt=0, le=1)  # writer's share of wall time, at most
    metrics_publish_s: float = Field(1.0, gt=0)  # replica metrics merged through Redis this often
    # `tickcast serve`: what feeds the online features, and how long --detach waits for ready.
    feed: Literal["simulator", "streams", "none"] = "simulator"
    closed_loop: bool = True  # `tickcast serve` also starts the drift/safety actors and controller
    feed_backfill_minutes: float = Field(90.0, ge=0)
    feed_seed: int = 7
    ready_timeout_s: float = Field(300.0, gt=0)
    stop_timeout_s: float = Field(120.0, gt=0)  # a stopping server's clean-up, then SIGKILL


class DriftConfig(Section):
    window: int = Field(500, ge=20)  # live events in each sliding window (features, predictions)
    min_window: int = Field(100, ge=10)  # window statistics are computed from this many events
    eval_every: int = Field(50, ge=1)  # window statistics refreshed at least this often (events)
    ks_threshold: float = Field(0.15, gt=0)  # a feature counts as drifted above this KS
    warning_score: float = Field(0.15, gt=0)
    critical_score: float = Field(0.3, gt=0)
    retrain_score: float = Field(0.2, gt=0)
    feature_top_fraction: float = Field(1.0, gt=0, le=1)  # feature score: mean of the top share
    # Column score = weighted mean of KS and the mapped PSI, W1/IQR, TVD and KL (each onto the
    # KS scale, see tickcast/monitoring/drift.py). Every measure counts; KS keeps the largest
    # share because it reacts least to the autocorrelation of rolling features.
    weight_ks: float = Field(1.0, ge=0)
    weight_psi: float = Field(0.25, ge=0)
    weight_w1: float = Field(0.25, ge=0)
    weight_tvd: float = Field(0.25, ge=0)
    weight_kl: float = Field(0.25, ge=0)
    # Features left out of drift: time-of-day is cyclical, so a window shorter than a day
    # never matches a reference sampled over whole days.
    exclude_features: tuple[str, ...] = ("tod_sin", "tod_cos")
    psi_bins: int = Field(10, ge=2)  # bins from reference quantiles
    psi_epsilon: float = Field(1e-4, gt=0, lt=0.1)  # floor for empty-bin proportions
    psi_warning: float = Field(0.1, gt=0)  # PSI mapped to warning_score ...
    psi_critical: float = Field(0.25, gt=0)  # ... and to critical_score
    w1_warning: float = Field(0.3, gt=0)  # Wasserstein-1 / reference IQR mapped likewise
    w1_critical: float = Field(0.6, gt=0)
    # Total variation distance and KL(P_ref || P_live) on the PSI bins; the levels are where a
    # normal location shift of 0.4 and 0.8 sigma puts them (KS is then 0.16 and 0.31).
    tvd_warning: float = Field(0.15, gt=0)
    tvd_critical: float = Field(0.3, gt=0)
    kl_warning: float = Field(0.075, gt=0)
    kl_critical: float = Field(0.3, gt=0)
    kl_pseudocount: float = Field(0.5, gt=0)  # added to every bin of both histograms (KT smoothing)
    # Label drift (P(Y), realized returns) and concept drift (P(Y|X): standardized residuals)
    # use sliding windows of `window` labels. Label drift compares with the model's reference
    # labels when it has them; both otherwise compare with the first this-many live labels.
    live_reference_labels: int = Field(500, ge=50)
    # Components whose score counts toward the overall score (the rest are reported only).
    score_components: tuple[Literal["features", "predictions", "performance", "labels",
                                    "concept"], ...] = ("features", "predictions", "performance",
                                                        "concept")
    detector: Literal["page_hinkley", "cusum"] = "page_hinkley"
    # Change detectors work on values standardized by the reference mean and std. With
    # allowance 0.5 and threshold 16 the one-sided ARL0 is ~5.7e7 events and the mean delay for
    # a 1-sigma shift ~32 events (Siegmund's approximation, see tickcast/monitoring/detectors.py).
    ph_delta: float = Field(0.5, ge=0)  # allowance, in reference standard deviations
    ph_threshold: float = Field(16.0, gt=0)
    ph_min_events: int = Field(30, ge=1)  # no alarm before the running mean has this many events
    cusum_k: float = Field(0.5, ge=0)  # allowance, in reference standard deviations
    cusum_h: float = Field(16.0, gt=0)
    # Live events the detector watches first to estimate each feature's autocorrelation and
    # rescale by its long-run variance (0: assume independent values); cap of that inflation.
    detector_warmup: int = Field(500, ge=0)
    detector_max_inflation: float = Field(400.0, ge=1)
    # A detector alarm keeps the level >= WARNING this long (events): the window statistics
    # need a while to show a fresh change, and calm real data still sees ~2 alarms a day.
    alarm_hold_events: int = Field(120, ge=1)
    performance_window: int = Field(200, ge=10)  # realized labels in the rolling loss
    performance_min_labels: int = Field(50, ge=1)  # fewer labels: no performance verdict
    performance_ratio_warning: float = Field(1.25, gt=1)
    performance_ratio_critical: float = Field(1.6, gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "DriftConfig":
        if self.min_window > self.window:
            raise ValueError("min_window must be <= window")
        if not self.warning_score < self.critical_score:
            raise ValueError("warning_score must be < critical_score")
        for lo, hi in (("psi_warning", "psi_critical"), ("w1_warning", "w1_critical"),
                       ("tvd_warning", "tvd_critical"), ("kl_warning", "kl_critical"),
                       ("performance_ratio_warning", "performance_ratio_critical")):
            if not getattr(self, lo) < getattr(self, hi):
                raise ValueError(f"{lo} must be < {hi}")
        if self.performance_min_labels > self.performance_window:
            raise ValueError("performance_min_labels must be <= performance_window")
        if 0 < self.detector_warmup < 30:
            raise ValueError("detector_warmup must be 0 or >= 30")
        if (self.weight_ks + self.weight_psi + self.weight_w1 + self.weight_tvd
                + self.weight_kl) <= 0:
            raise ValueError("the weights weight_ks .. weight_kl must not all be 0")
        if self.live_reference_labels < self.psi_bins:
            raise ValueError("live_reference_labels must be >= psi_bins")
        if not self.score_components or len(set(self.score_components)) != len(self.score_components):
            raise ValueError("score_components must name at least one component, none twice")
        return self


class SafetyConfig(Section):
    vol_short: int = Field(15, ge=2)
    vol_long: int = Field(240, ge=3)
    elevated_ratio: float = Field(1.5, gt=0)
    crisis_ratio: float = Field(2.5, gt=0)
    recovery_bars: int = Field(15, ge=1)  # ratio must stay low this long to step down
    multipliers: dict[str, float] = {"NORMAL": 1.0, "ELEVATED": 0.5, "CRISIS": 0.2}
    max_drawdown: float = Field(0.05, gt=0, lt=1)
    halt_recovery_bars: int = Field(60, ge=1)
    wide_interval_bp: float = Field(60.0, gt=0)  # beyond this the multiplier is cut
    wide_interval_multiplier: float = Field(0.5, ge=0, le=1)
    # Trading resumes after a halt once halt_recovery_bars have passed AND the drawdown of the
    # signal's paper equity (traded without the halt) is back at or below this level.
    halt_resume_drawdown: float = Field(0.025, ge=0, lt=1)
    sizing: Literal["sign", "interval"] = "sign"  # interval: median / half interval, clipped to 1
    # Deadband: the paper accounts hold a position only while the forecast's edge beats its
    # cost, |median| > model.fee_bp + half_spread_bp; otherwise they are flat. The market's
    # bid/ask is not known here: half_spread_bp is the half spread assumed (BTC-USD on a major
    # venue quotes about 0.1-1 bp; 1 bp leaves room for slippage). deadband: false trades
    # every forecast's sign (the behaviour before; for comparison, see bench.safety_days).
    deadband: bool = True
    half_spread_bp: float = Field(1.0, ge=0)
    # The user's own book (tickcast/monitoring/book.py): largest |position| accepted, as a
    # multiple of the book's equity.
    book_max_abs_position: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "SafetyConfig":
        if self.vol_short >= self.vol_long:
            raise ValueError("vol_short must be < vol_long")
        if not self.elevated_ratio < self.crisis_ratio:
            raise ValueError("elevated_ratio must be < crisis_ratio")
        if set(self.multipliers) != {"NORMAL", "ELEVATED", "CRISIS"}:
            raise ValueError("multipliers must have exactly the keys NORMAL, ELEVATED, CRISIS")
        if any(not 0 <= v <= 1 for v in self.multipliers.values()):
            raise ValueError("multipliers must lie in [0, 1]")
        if self.halt_resume_drawdown >= self.max_drawdown:
            raise ValueError("halt_resume_drawdown must be < max_drawdown")
        return self


class ShardConfig(Section):
    """Market shards: the actors that own the per-asset state (see docs/shards.md)."""

    count: int | None = Field(None, ge=1)  # None: one per CPU of the cluster
    # An asset's state is checkpointed after this many consumed entries or this many seconds,
    # whichever comes first (a restart replays what came after, idempotently).
    checkpoint_every_s: float = Field(60.0, gt=0)
    # The closed loop of an asset is stepped on its events (a bar, a prediction); this sweep
    # catches what has no event of its own (a champion changed in the registry).
    monitor_sweep_s: float = Field(15.0, gt=0)
    max_concurrency: int = Field(8, ge=2)  # consumer thread + queries
    start_timeout_s: float = Field(120.0, gt=0)  # one shard's creation, recovery included


class ControllerConfig(Section):
    min_paired: int = Field(200, ge=10)
    dm_alpha: float = Field(0.05, gt=0, lt=1)
    watch_labels: int = Field(200, ge=10)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    retrain_schedule_s: float | None = None  # None: retrain on CRITICAL drift only
    events_stream: str = "events"
    events_maxlen: int = Field(100_000, ge=100)  # approximate cap of the events stream
    # Promotion also needs the challenger's paper Sharpe >= the champion's minus this.
    sharpe_tolerance: float = Field(0.0, ge=0)
    # Latency SLA of a watched champion: share of requests slower than serve.sla_latency_ms.
    max_sla_violation_rate: float = Field(0.05, ge=0, le=1)
    sla_min_requests: int = Field(50, ge=1)  # fewer requests since the promotion: no SLA verdict
    # Retraining: "job" = `ray job submit` of training.retrain (needs the dashboard's job
    # server), "task" = the same pipeline as a Ray task, "auto" = job when a job server answers.
    retrain_runner: Literal["auto", "job", "task"] = "auto"
    retrain_window_bars: int = Field(10_080, ge=200)  # most recent bars a retrain fits on
    # Bars to wait after a CRITICAL alert before retraining (a challenger fitted before the new
    # regime is in its data cannot learn it); 0 retrains at once.
    retrain_min_new_bars: int = Field(60, ge=0)
    retrain_trials: int | None = Field(None, ge=1)  # Tune trials (None: tune.trials)
    retrain_cooldown_s: float = Field(3600.0, ge=0)  # least time between two retrains of an asset
    retrain_timeout_s: float = Field(7200.0, gt=0)  # a retrain running longer is abandoned
    shadow_timeout_s: float = Field(86_400.0, gt=0)  # shadow evaluation without a verdict ends
    label_timeout_bars: int = Field(30, ge=1)  # a forecast still unlabeled this far back is dropped
    poll_s: float = Field(1.0, gt=0)  # controller loop period
    monitor_poll_s: float = Field(0.5, gt=0)  # drift and safety actors' loop period
    stream_batch: int = Field(2000, ge=1)  # stream entries read per XREAD by the loop actors


ALWAYS_OPEN = "24/7"
"""The calendar of an asset that never closes (crypto): the default of ``calendars``."""

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _clock_time(value: object, field: str) -> str:
    """A local wall-clock time ``"HH:MM"`` (24 h), returned canonical (zero-padded).

    YAML 1.1 reads an unquoted ``17:00`` as the base-60 integer 1020, so a number is refused
    with a hint rather than guessed at.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a quoted \"HH:MM\" time (unquoted YAML 17:00 reads as "
                         f"a number), got {value!r}")
    parts = value.strip().split(":")
    if len(parts) != 2 or not all(p.isdigit() and 1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"{field} must look like \"HH:MM\", got {value!r}")
    hh, mm = int(parts[0]), int(parts[1])
    if not (0 <= hh <= 23 and 0 <= mm <= 59):
        raise ValueError(f"{field} {value!r} is not a time of day (00:00 to 23:59)")
    return f"{hh:02d}:{mm:02d}"


class WeeklySession(Section):
    """One weekly trading session: opens at ``open`` on each of ``days`` (local time).

    A ``close`` at or before ``open`` falls on the next day (an overnight session, as futures
    trade from the evening to the next afternoon).
    """

    days: tuple[Weekday, ...] = Field(min_length=1)
    open: str
    close: str

    @model_validator(mode="before")
    @classmethod
    def _times(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("open", "close"):
                if key in data:
                    data[key] = _clock_time(data[key], key)
        return data


class WeeklySessions(Section):
    """A trading calendar given as weekly sessions in a time zone, with holidays.

    ``holidays`` are local dates on which the market stays closed all day (00:00 to 24:00);
    ``early_closes`` map a local date to the time at which the session open then closes.
    """

    timezone: str
    sessions: tuple[WeeklySession, ...] = Field(min_length=1)
    holidays: tuple[date, ...] = ()
    early_closes: dict[date, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _early_times(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("early_closes"), dict):
            data = dict(data)
            data["early_closes"] = {k: _clock_time(v, f"early_closes.{k}")
                                    for k, v in data["early_closes"].items()}
        return data

    @model_validator(mode="after")
    def _zone(self) -> "WeeklySessions":
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not an IANA time zone "
                             "(e.g. America/Chicago, Europe/London, UTC)") from None
        return self


# A calendar entry: a name ("24/7" or a pandas_market_calendars calendar) or weekly sessions.
# The discriminator picks the branch by type, so an error names the field inside the branch.
CalendarSpec = Annotated[
    Union[Annotated[str, Tag("name")], Annotated[WeeklySessions, Tag("weekly")]],
    Discriminator(lambda v: "name" if isinstance(v, str) else "weekly"),
]


def exchange_calendar_names() -> frozenset[str]:
    """Names of the ``pandas_market_calendars`` calendars (imported on first use: ~1 s)."""
    import pandas_market_calendars as mcal  # heavy; only configs that name one pay for it

    return frozenset(mcal.get_calendar_names())


class Settings(Section):
    """The whole configuration. Build with :func:`load_settings`."""

    assets: tuple[str, ...] = ("BTC-USD", "ETH-USD")
    data_dir: str = "data"
    redis: RedisConfig = RedisConfig()
    ingest: IngestConfig = IngestConfig()
    validation: ValidationConfig = ValidationConfig()
    dedup: DedupConfig = DedupConfig()
    outliers: OutlierConfig = OutlierConfig()
    consensus: ConsensusConfig = ConsensusConfig()
    bars: BarConfig = BarConfig()
    gaps: GapConfig = GapConfig()
    breaker: BreakerConfig = BreakerConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    features: FeatureConfig = FeatureConfig()
    model: ModelConfig = ModelConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()
    drift: DriftConfig = DriftConfig()
    safety: SafetyConfig = SafetyConfig()
    controller: ControllerConfig = ControllerConfig()
    shards: ShardConfig = ShardConfig()
    # Trading calendar per asset (tickcast/market/calendar.py): "24/7" (the default for an
    # asset not listed), the name of a pandas_market_calendars calendar (e.g. CMEGlobex_FX,
    # XNYS), or WeeklySessions. Bars are expected only in session; a closure is not a gap.
    calendars: dict[str, CalendarSpec] = {}

    @field_validator("calendars")
    @classmethod
    def _calendars_known(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        assets = info.data.get("assets", ())
        unknown = sorted(set(value) - set(assets))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not in assets {list(assets)} (a typo would "
                             "silently trade 24/7)")
        names = {a: v for a, v in value.items() if isinstance(v, str) and v != ALWAYS_OPEN}
        if names:
            known = exchange_calendar_names()
            for asset, name in sorted(names.items()):
                if name not in known:
                    raise ValueError(f"{asset}: {name!r} is neither \"24/7\" nor a "
                                     "pandas_market_calendars name (e.g. CMEGlobex_FX, XNYS, XLON)")
        return value

    def with_overrides(self, **updates: Any) -> "Settings":
        """Return a validated copy with top-level or dotted overrides applied."""
        data = self.model_dump()
        for key, value in updates.items():
            _set_dotted(data, key.replace("__", "."), value)
        return _validate(data, source="overrides")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # e.g. "assets.x=1": assets is not a section
            raise ConfigError(f"'{dotted}' does not name a config section", field=dotted)
    node[parts[-1]] = value


def _validate(data: dict[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {field}: {err['msg']}", field=field) from None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Load, layer and validate the configuration.

    Parameters
    ----------
    path
        YAML file; default ``$TICKCAST_CONFIG`` or ``configs/default.yaml``.
    overrides
        ``["section.key=value", ...]`` as given on the command line (values parsed as YAML).
    env
        Environment to read (default ``os.environ``).

    Raises
    ------
    ConfigError
        Unreadable file, bad YAML, unknown key or out-of-range value, naming the field.
    """
    env = dict(os.environ if env is None else env)
    cfg_path = Path(path or env.get("TICKCAST_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {cfg_path}: {exc.strerror}", field="config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {cfg_path} is not valid YAML: {exc}", field="config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {cfg_path} must be a mapping", field="config")

    for key, value in sorted(env.items()):
        if key.startswith("TICKCAST__"):
            _set_dotted(raw, key[len("TICKCAST__"):].lower().replace("__", "."), yaml.safe_load(value))
    if env.get("REDIS_URL"):
        raw.setdefault("redis", {})["url"] = env["REDIS_URL"]
    if env.get("TICKCAST_DATA_DIR"):
        raw["data_dir"] = env["TICKCAST_DATA_DIR"]
    if env.get("TICKCAST_ADMIN_TOKEN"):
        raw.setdefault("serve", {})["admin_token"] = env["TICKCAST_ADMIN_TOKEN"]

    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value", field=item)
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return _validate(raw, source=str(cfg_path))
