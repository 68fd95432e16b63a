"""The one list of metric names, kinds and tag keys every plane emits.

Emit with ``ray.util.metrics`` (``Counter`` / ``Gauge`` / ``Histogram``) using these names and
tag keys; Ray exports them to Prometheus with the prefix ``ray_`` (so
``tickcast_ticks_total`` is scraped as ``ray_tickcast_ticks_total`` and the latency histogram
as ``ray_tickcast_request_latency_ms_bucket`` / ``_sum`` / ``_count``).
``configs/grafana_dashboard.json`` queries exactly these series; a test keeps both in step.
"""

from __future__ import annotations

from dataclasses import dataclass

TICKS_TOTAL = "tickcast_ticks_total"  # counter {asset, status}: status accepted|rejected|duplicate|outlier|late|frozen
TICKS_REJECTED_TOTAL = "tickcast_ticks_rejected_total"  # counter {asset, reason}
OUTLIERS_TOTAL = "tickcast_outliers_total"  # counter {asset, provider}
DUPLICATES_TOTAL = "tickcast_duplicates_total"  # counter {asset}
CONSENSUS_CONFIDENCE_BP = "tickcast_consensus_confidence_bp"  # gauge {asset}
PROVIDER_AGREEMENT = "tickcast_provider_agreement"  # gauge {asset}: share of providers agreeing, 0..1
GAP_MINUTES = "tickcast_gap_minutes"  # gauge {asset}: minutes since the last real bar
PROVIDER_RELIABILITY = "tickcast_provider_reliability"  # gauge {asset, provider}: 0..1 EWMA
PROVIDER_EXCLUDED = "tickcast_provider_excluded"  # gauge {asset, provider}: 1 while left out
REQUEST_LATENCY_MS = "tickcast_request_latency_ms"  # histogram {slot}
SLA_VIOLATIONS_TOTAL = "tickcast_sla_violations_total"  # counter {slot}
REQUESTS_TOTAL = "tickcast_requests_total"  # counter {slot, code}
DRIFT_SCORE = "tickcast_drift_score"  # gauge {asset}
REGIME = "tickcast_regime"  # gauge {asset}: 0 NORMAL, 1 ELEVATED, 2 CRISIS
POSITION_MULTIPLIER = "tickcast_position_multiplier"  # gauge {asset}
PROMOTIONS_TOTAL = "tickcast_promotions_total"  # counter {asset}
ROLLBACKS_TOTAL = "tickcast_rollbacks_total"  # counter {asset}

PROMETHEUS_PREFIX = "ray_"

# Tag keys.
ASSET = "asset"
STATUS = "status"
REASON = "reason"
PROVIDER = "provider"
SLOT = "slot"
CODE = "code"

# Latency histogram boundaries (ms). 150 ms, the SLA, is a boundary so the violation share
# read from the buckets is exact, and the p99 estimate is interpolated within a tight bucket.
LATENCY_BOUNDARIES_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 35, 50, 75, 100, 125, 150, 200,
                                            300, 500, 1000, 2500)

# Values of tickcast_regime.
REGIME_CODES: dict[str, int] = {"NORMAL": 0, "ELEVATED": 1, "CRISIS": 2}

# The prototype's SLA table: (metric, comparison, limit, what it means).
SLA_TABLE: tuple[tuple[str, str, float, str], ...] = (
    (REQUEST_LATENCY_MS, "<", 150.0, "latency p99 (ms)"),
    (SLA_VIOLATIONS_TOTAL, "<", 0.05, "SLA violation rate (share of requests over the latency SLA)"),
    (DRIFT_SCORE, "<", 0.15, "drift score"),
    (GAP_MINUTES, "<", 10.0, "data-gap duration (min)"),
    (DUPLICATES_TOTAL, "<", 0.01, "dedup rate (duplicates / ticks)"),
    (PROVIDER_AGREEMENT, ">", 0.9, "provider consensus (agreement share)"),
)


@dataclass(frozen=True)
class MetricSpec:
    """Kind, tag keys and description of one metric."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    tag_keys: tuple[str, ...]
    description: str

    @property
    def prometheus_name(self) -> str:
        """Name as scraped from Ray's Prometheus endpoint (histograms add _bucket/_sum/_count)."""
        return PROMETHEUS_PREFIX + self.name


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec(TICKS_TOTAL, "counter", (ASSET, STATUS), "Ticks processed, by outcome"),
    MetricSpec(TICKS_REJECTED_TOTAL, "counter", (ASSET, REASON), "Ticks rejected, by reason"),
    MetricSpec(OUTLIERS_TOTAL, "counter", (ASSET, PROVIDER), "Ticks flagged as outliers"),
    MetricSpec(DUPLICATES_TOTAL, "counter", (ASSET,), "Duplicate ticks dropped"),
    MetricSpec(CONSENSUS_CONFIDENCE_BP, "gauge", (ASSET,),
               "Consensus confidence of the last bar, basis points of price"),
    MetricSpec(PROVIDER_AGREEMENT, "gauge", (ASSET,), "Share of providers agreeing with consensus"),
    MetricSpec(GAP_MINUTES, "gauge", (ASSET,), "Minutes since the last real consensus bar"),
    MetricSpec(PROVIDER_RELIABILITY, "gauge", (ASSET, PROVIDER),
               "Provider reliability (EWMA of good quotes, 0..1)"),
    MetricSpec(PROVIDER_EXCLUDED, "gauge", (ASSET, PROVIDER),
               "1 while the provider is excluded from the consensus (reliability below the floor)"),
    MetricSpec(REQUEST_LATENCY_MS, "histogram", (SLOT,), "Prediction request latency, ms"),
    MetricSpec(SLA_VIOLATIONS_TOTAL, "counter", (SLOT,), "Requests slower than the latency SLA"),
    MetricSpec(REQUESTS_TOTAL, "counter", (SLOT, CODE), "Prediction requests, by HTTP code"),
    MetricSpec(DRIFT_SCORE, "gauge", (ASSET,), "Overall drift score of the champion"),
    MetricSpec(REGIME, "gauge", (ASSET,), "Volatility regime: 0 NORMAL, 1 ELEVATED, 2 CRISIS"),
    MetricSpec(POSITION_MULTIPLIER, "gauge", (ASSET,), "Advised position multiplier"),
    MetricSpec(PROMOTIONS_TOTAL, "counter", (ASSET,), "Challenger promotions"),
    MetricSpec(ROLLBACKS_TOTAL, "counter", (ASSET,), "Automatic rollbacks"),
)}

ALL_METRICS: tuple[str, ...] = tuple(METRICS)


def prometheus_names(name: str) -> tuple[str, ...]:
    """Every series name Prometheus holds for ``name`` (histograms: bucket, sum, count).

    Examples
    --------
    >>> prometheus_names(DRIFT_SCORE)
    ('ray_tickcast_drift_score',)
    >>> prometheus_names(REQUEST_LATENCY_MS)[0]
    'ray_tickcast_request_latency_ms_bucket'
    """
    spec = METRICS[name]
    base = spec.prometheus_name
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)
