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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class ValidationConfig(Section):
    max_price: float = Field(1e9, gt=0)
    max_size: float = Field(1e12, gt=0)
    max_future_s: float = Field(300.0, ge=0)  # event time this far ahead of receive time is malformed


class DedupConfig(Section):
    window: int = Field(200_000, ge=16)  # recent (provider, key) pairs remembered per asset


class OutlierConfig(Section):
    band_bp: float = Field(400.0, gt=0)  # base band around the running reference
    dispersion_k: float = Field(12.0, ge=0)  # band widens by k x recent cross-provider dispersion
    level_window: int = Field(5, ge=1)  # ticks in each provider's robust (median) level
    dispersion_halflife_ticks: float = Field(200.0, gt=0)


class ConsensusConfig(Section):
    stale_after_s: float = Field(120.0, gt=0)  # provider without a quote this long is excluded
    frozen_after_s: float = Field(90.0, gt=0)  # unchanged price this long while others move
    reliability_alpha: float = Field(0.02, gt=0, le=1)  # EWMA step of provider reliability
    min_reliability: float = Field(0.2, ge=0, le=1)  # below: provider excluded from consensus


class BarConfig(Section):
    freq_s: int = Field(60, ge=1)
    allowed_lateness_s: float = Field(120.0, ge=0)


class GapConfig(Section):
    ffill_max_minutes: int = Field(2, ge=0)
    interp_max_minutes: int = Field(10, ge=0)
    provider_recovery: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> "GapConfig":
        if self.interp_max_minutes < self.ffill_max_minutes:
            raise ValueError("interp_max_minutes must be >= ffill_max_minutes")
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


class SimulatorConfig(Section):
    providers: tuple[str, ...] = ("alpha", "bravo", "charlie", "delta")
    ticks_per_provider_per_s: float = Field(2.0, gt=0)
    annual_vol: float = Field(0.6, gt=0)
    start_prices: dict[str, float] = {"BTC-USD": 60_000.0, "ETH-USD": 3_000.0}
    provider_noise_bp: float = Field(1.5, ge=0)
    latency_ms_mean: float = Field(40.0, ge=0)
    anomaly_rate: float = Field(0.01, ge=0, le=0.5)  # per tick, across kinds


class FeatureConfig(Section):
    return_lags: tuple[int, ...] = (1, 2, 3, 5, 10, 15, 30)
    vol_short: int = Field(10, ge=2)
    vol_long: int = Field(60, ge=3)
    momentum: int = Field(30, ge=1)
    rsi: int = Field(14, ge=2)
    macd: tuple[int, int, int] = (12, 26, 9)
    volume_z: int = Field(60, ge=3)


class ModelConfig(Section):
    horizon: int = Field(1, ge=1)
    quantiles: tuple[float, float, float] = (0.05, 0.5, 0.95)
    registry_dir: str = "registry"
    calibration_fraction: float = Field(0.2, gt=0, lt=0.9)
    conformal_window: int = Field(720, ge=50)  # recent residuals used by adaptive conformal
    purge_bars: int = Field(60, ge=0)
    walk_forward_folds: int = Field(3, ge=1)
    fee_bp: float = Field(1.0, ge=0)
    onnx_parity_tol: float = Field(1e-5, gt=0)
    reference_sample_rows: int = Field(2000, ge=100)


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


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    admin_token: str | None = None  # None -> admin endpoints disabled
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_batch_assets: int = Field(5000, ge=1)
    feature_max_age_s: float = Field(180.0, gt=0)
    feature_refresh_s: float = Field(0.5, gt=0)
    prediction_stream: str = "predictions"
    prediction_log_batch: int = Field(256, ge=1)
    prediction_log_queue: int = Field(100_000, ge=1)
    sla_latency_ms: float = Field(150.0, gt=0)
    use_haproxy: bool = True
    autoscaling: AutoscalingConfig = AutoscalingConfig()


class DriftConfig(Section):
    window: int = Field(500, ge=20)
    ks_threshold: float = Field(0.15, gt=0)
    warning_score: float = Field(0.15, gt=0)
    critical_score: float = Field(0.3, gt=0)
    retrain_score: float = Field(0.2, gt=0)
    psi_bins: int = Field(10, ge=2)
    detector: Literal["page_hinkley", "cusum", "adwin"] = "page_hinkley"
    ph_delta: float = Field(0.1, ge=0)  # in reference standard deviations
    ph_threshold: float = Field(25.0, gt=0)
    performance_ratio_warning: float = Field(1.25, gt=1)
    performance_ratio_critical: float = Field(1.6, gt=1)


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


class ControllerConfig(Section):
    min_paired: int = Field(200, ge=10)
    dm_alpha: float = Field(0.05, gt=0, lt=1)
    watch_labels: int = Field(200, ge=10)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    retrain_schedule_s: float | None = None  # None: retrain on CRITICAL drift only
    events_stream: str = "events"


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
