"""Request metrics of a serving replica, mergeable across replicas (pure: no Ray, no Redis).

Each replica counts into one :class:`ServeMetrics` (a lock per observation, about a
microsecond). The replica publishes :meth:`ServeMetrics.snapshot` to Redis every second; the
``/metrics`` endpoint merges the snapshots of every live replica (:func:`merge_snapshots`) and
renders them as Prometheus text (:func:`render_prometheus`), so a scrape through the load
balancer sees the whole deployment whichever replica answers it.

Examples
--------
>>> m = ServeMetrics(sla_ms=10.0)
>>> m.observe("predict", "blue", 200, 2.5)
>>> m.observe("predict", "green", 200, 12.0)
>>> m.observe("predict", "none", 404, 0.4, error="unknown_asset")
>>> snap = m.snapshot()
>>> snap["requests"]["predict|blue|200"], snap["sla_violations"]["predict|green"]
(1, 1)
>>> merged = merge_snapshots([snap, snap])
>>> merged["requests"]["predict|none|404"], merged["errors"]["predict|unknown_asset|404"]
(2, 2)
>>> text = render_prometheus(merged)
>>> 'tickcast_serve_requests_total{endpoint="predict",slot="blue",code="200"} 2' in text
True
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any, Iterable, Mapping

# Upper bounds of the latency histogram, in milliseconds (the SLA of interest is single-digit).
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 25.0, 50.0,
                                         100.0, 150.0, 250.0, 500.0, 1000.0, 2500.0)
PREFIX = "tickcast_serve_"
_SEP = "|"


class ServeMetrics:
    """Counters and a latency histogram per (endpoint, slot), plus prediction counts.

    Parameters
    ----------
    sla_ms
        A request slower than this counts as an SLA violation.
    buckets_ms
        Histogram upper bounds in milliseconds, increasing.

    Raises
    ------
    ValueError
        Non-positive SLA or unsorted buckets.
    """

    def __init__(self, sla_ms: float, buckets_ms: Iterable[float] = LATENCY_BUCKETS_MS) -> None:
        if not sla_ms > 0:
            raise ValueError(f"sla_ms must be > 0, got {sla_ms}")
        self.sla_ms = float(sla_ms)
        self.buckets_ms = tuple(float(b) for b in buckets_ms)
        if not self.buckets_ms or list(self.buckets_ms) != sorted(set(self.buckets_ms)):
            raise ValueError("buckets_ms must be strictly increasing and non-empty")
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._requests: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._sla: dict[str, int] = {}
        self._hist: dict[str, list[int]] = {}  # per-bucket (not cumulative) counts + overflow
        self._sum_ms: dict[str, float] = {}
        self._predictions: dict[str, int] = {}

    def observe(self, endpoint: str, slot: str, status: int, latency_ms: float,
                error: str | None = None) -> None:
        """Count one request: status, latency (histogram, SLA) and error code if any."""
        key = f"{endpoint}{_SEP}{slot}"
        idx = bisect.bisect_left(self.buckets_ms, latency_ms)
        with self._lock:
            rkey = f"{key}{_SEP}{status}"
            self._requests[rkey] = self._requests.get(rkey, 0) + 1
            hist = self._hist.get(key)
            if hist is None:
                hist = self._hist[key] = [0] * (len(self.buckets_ms) + 1)
            hist[idx] += 1
            self._sum_ms[key] = self._sum_ms.get(key, 0.0) + latency_ms
            if latency_ms > self.sla_ms:
                self._sla[key] = self._sla.get(key, 0) + 1
            if error is not None:
                ekey = f"{endpoint}{_SEP}{error}{_SEP}{status}"
                self._errors[ekey] = self._errors.get(ekey, 0) + 1

    def count_predictions(self, slot: str, role: str, n: int = 1) -> None:
        """Count ``n`` predictions made by ``slot`` as ``served`` or ``shadow``."""
        key = f"{slot}{_SEP}{role}"
        with self._lock:
            self._predictions[key] = self._predictions.get(key, 0) + n

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter (safe to merge and render elsewhere)."""
        with self._lock:
            return {
                "buckets_ms": list(self.buckets_ms),
                "requests": dict(self._requests),
                "errors": dict(self._errors),
                "sla_violations": dict(self._sla),
                "latency_hist": {k: list(v) for k, v in self._hist.items()},
                "latency_sum_ms": dict(self._sum_ms),
                "predictions": dict(self._predictions),
            }

    def __getstate__(self) -> dict[str, Any]:
        return {"sla_ms": self.sla_ms, "snapshot": self.snapshot()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        snap = state["snapshot"]
        self.__init__(state["sla_ms"], snap["buckets_ms"])  # type: ignore[misc]
        self._requests = dict(snap["requests"])
        self._errors = dict(snap["errors"])
        self._sla = dict(snap["sla_violations"])
        self._hist = {k: list(v) for k, v in snap["latency_hist"].items()}
        self._sum_ms = dict(snap["latency_sum_ms"])
        self._predictions = dict(snap["predictions"])


_COUNTER_MAPS = ("requests", "errors", "sla_violations", "predictions")


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the snapshots of several replicas (histograms bucket by bucket).

    Snapshots with different bucket bounds than the first are skipped (a replica running an
    older configuration must not corrupt the histogram).
    """
    out: dict[str, Any] = {"replicas": 0}
    for snap in snapshots:
        if "buckets_ms" not in out:
            out["buckets_ms"] = list(snap["buckets_ms"])
            for name in _COUNTER_MAPS + ("latency_hist", "latency_sum_ms"):
                out[name] = {}
        elif list(snap["buckets_ms"]) != out["buckets_ms"]:
            continue
        out["replicas"] += 1
        for name in _COUNTER_MAPS:
            target = out[name]
            for k, v in snap[name].items():
                target[k] = target.get(k, 0) + int(v)
        for k, v in snap["latency_sum_ms"].items():
            out["latency_sum_ms"][k] = out["latency_sum_ms"].get(k, 0.0) + float(v)
        for k, counts in snap["latency_hist"].items():
            cur = out["latency_hist"].get(k)
            out["latency_hist"][k] = list(counts) if cur is None else [a + b for a, b in zip(cur, counts)]
    if "buckets_ms" not in out:
        out["buckets_ms"] = list(LATENCY_BUCKETS_MS)
        for name in _COUNTER_MAPS + ("latency_hist", "latency_sum_ms"):
            out[name] = {}
    return out


def _labels(names: tuple[str, ...], key: str) -> str:
    parts = key.split(_SEP)
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, parts))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_prometheus(merged: Mapping[str, Any], gauges: Iterable[tuple[str, str, Mapping[str, str], float]] = (),
                      counters: Iterable[tuple[str, str, Mapping[str, str], float]] = ()) -> str:
    """Prometheus text exposition (format 0.0.4) of merged snapshots plus extra series.

    Parameters
    ----------
    merged
        Output of :func:`merge_snapshots`.
    gauges, counters
        Extra ``(name, help, labels, value)`` series (name without the common prefix).
    """
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")

    for name, source, label_names, help_text in (
            ("requests_total", "requests", ("endpoint", "slot", "code"),
             "HTTP requests by endpoint, slot and status code."),
            ("errors_total", "errors", ("endpoint", "error", "code"),
             "Failed requests by endpoint, error code and status."),
            ("sla_violations_total", "sla_violations", ("endpoint", "slot"),
             "Requests slower than serve.sla_latency_ms."),
            ("predictions_total", "predictions", ("slot", "role"),
             "Predictions by slot and role (served or shadow).")):
        family(name, "counter", help_text)
        for key in sorted(merged[source]):
            lines.append(f"{PREFIX}{name}{{{_labels(label_names, key)}}} {merged[source][key]}")

    family("request_latency_seconds", "histogram", "Handler latency by endpoint and slot.")
    bounds = [b / 1000.0 for b in merged["buckets_ms"]]
    for key in sorted(merged["latency_hist"]):
        counts = merged["latency_hist"][key]
        labels = _labels(("endpoint", "slot"), key)
        running = 0
        for bound, c in zip(bounds, counts):
            running += c
            lines.append(f'{PREFIX}request_latency_seconds_bucket{{{labels},le="{_fmt(bound)}"}} {running}')
        running += counts[-1]
        lines.append(f'{PREFIX}request_latency_seconds_bucket{{{labels},le="+Inf"}} {running}')
        lines.append(f"{PREFIX}request_latency_seconds_sum{{{labels}}} "
                     f"{_fmt(merged['latency_sum_ms'].get(key, 0.0) / 1000.0)}")
        lines.append(f"{PREFIX}request_latency_seconds_count{{{labels}}} {running}")

    family("replicas_reporting", "gauge", "Serving replicas whose metrics are included.")
    lines.append(f"{PREFIX}replicas_reporting {merged.get('replicas', 0)}")

    for kind, series in (("counter", counters), ("gauge", gauges)):
        seen: set[str] = set()
        # A family's samples must be contiguous in the exposition: group them by name.
        for name, help_text, labels, value in sorted(series, key=lambda item: item[0]):
            if name not in seen:
                family(name, kind, help_text)
                seen.add(name)
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{PREFIX}{name}{{{label_text}}} {_fmt(value)}" if label_text
                         else f"{PREFIX}{name} {_fmt(value)}")
    return "\n".join(lines) + "\n"


def quantile_from_hist(counts: list[int], buckets_ms: list[float], q: float) -> float:
    """Approximate latency quantile (ms) from per-bucket counts: the bucket's upper bound.

    Returns ``inf`` when the quantile falls in the overflow bucket and NaN with no samples.

    >>> quantile_from_hist([0, 5, 5, 0], [1.0, 2.0, 5.0], 0.9)
    5.0
    """
    total = sum(counts)
    if total == 0:
        return float("nan")
    target = q * total
    running = 0
    for bound, c in zip(list(buckets_ms) + [float("inf")], counts):
        running += c
        if running >= target:
            return float(bound)
    return float("inf")
