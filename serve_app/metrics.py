"""Request metrics of a serving replica, mergeable across replicas (pure: no Ray, no Redis).

Each replica counts into one :class:`ServeMetrics` (a lock per observation, about a
microsecond). The replica publishes :meth:`ServeMetrics.snapshot` to Redis every second; the
``/metrics`` endpoint merges the snapshots of every live replica (:func:`merge_snapshots`) and
renders them as Prometheus text (:func:`render_prometheus`), so a scrape through the load
balancer sees the whole deployment whichever replica answers it.

Every request is observed once, with its final status code and its latency from its arrival
at the replica to the last byte of its response (see :mod:`serve_app.request_clock`), so the
SLA counters see the time a request waited behind others, and every status code is counted.

Besides the per-endpoint counters, each snapshot counts per *model* (asset, slot, version):
the requests that model was chosen to serve, those of them over the latency SLA, and its own
errors (the 5xx it caused: it raised, produced no finite forecast, or cannot use the online
features it was given). Errors that are no model's fault (stale features, no model loaded, a
client's 4xx) are counted per endpoint only. :class:`MetricsSnapshot` reads a published
snapshot back, and :func:`candidate_sla` gives the closed loop's rollback the serving figures
of one model since a baseline.

Examples
--------
>>> m = ServeMetrics(sla_ms=10.0)
>>> m.observe("predict", "blue", 200, 2.5, models=[("BTC-USD", "blue", "v1")])
>>> m.observe("predict", "green", 200, 12.0, models=[("BTC-USD", "green", "v2")])
>>> m.observe("predict", "none", 404, 0.4, error="unknown_asset")
>>> m.observe("predict", "green", 500, 0.9, error="model_failed", models=[("BTC-USD", "green", "v2")])
>>> m.count_model_errors([("BTC-USD", "green", "v2", "model_failed", 500)])
>>> snap = m.snapshot()
>>> snap["requests"]["predict|blue|200"], snap["sla_violations"]["predict|green"]
(1, 1)
>>> merged = merge_snapshots([snap, snap])
>>> merged["requests"]["predict|none|404"], merged["errors"]["predict|unknown_asset|404"]
(2, 2)
>>> text = render_prometheus(merged)
>>> 'tickcast_serve_requests_total{endpoint="predict",slot="blue",code="200"} 1' in text
False
>>> 'tickcast_serve_requests_total{endpoint="predict",slot="blue",code="200"} 2' in text
True
>>> typed = MetricsSnapshot.from_dict(snap)
>>> typed.own_errors_by_slot("BTC-USD"), typed.served("BTC-USD", "v2"), typed.slow("BTC-USD", "v2")
({'green': 1}, 2, 1)
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from tickcast.monitoring.shadow_eval import SlaFigures

# Upper bounds of the latency histogram, in milliseconds (the SLA of interest is single-digit).
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 25.0, 50.0,
                                         100.0, 150.0, 250.0, 500.0, 1000.0, 2500.0)
PREFIX = "tickcast_serve_"
_SEP = "|"

ModelKey = tuple[str, str, str]  # (asset, slot, version)
ModelFault = tuple[str, str, str, str, int]  # (asset, slot, version, error code, HTTP status)


class ServeMetrics:
    """Counters and a latency histogram per (endpoint, slot), plus per-model counts.

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
        # Tuple keys on the request path (no string formatting); joined at snapshot time.
        self._model_requests: Counter[ModelKey] = Counter()
        self._model_slow: Counter[ModelKey] = Counter()
        self._model_errors: Counter[ModelFault] = Counter()

    def observe(self, endpoint: str, slot: str, status: int, latency_ms: float,
                error: str | None = None, models: Iterable[ModelKey] = ()) -> None:
        """Count one request: status, latency (histogram, SLA), error code if any, and the
        models (asset, slot, version) it was served by (a batch names one per asset)."""
        key = f"{endpoint}{_SEP}{slot}"
        idx = bisect.bisect_left(self.buckets_ms, latency_ms)
        slow = latency_ms > self.sla_ms
        with self._lock:
            rkey = f"{key}{_SEP}{status}"
            self._requests[rkey] = self._requests.get(rkey, 0) + 1
            hist = self._hist.get(key)
            if hist is None:
                hist = self._hist[key] = [0] * (len(self.buckets_ms) + 1)
            hist[idx] += 1
            self._sum_ms[key] = self._sum_ms.get(key, 0.0) + latency_ms
            if slow:
                self._sla[key] = self._sla.get(key, 0) + 1
            if error is not None:
                ekey = f"{endpoint}{_SEP}{error}{_SEP}{status}"
                self._errors[ekey] = self._errors.get(ekey, 0) + 1
            if models:
                self._model_requests.update(models)
                if slow:
                    self._model_slow.update(models)

    def count_model_errors(self, faults: Iterable[ModelFault]) -> None:
        """Count errors of the models' own making: ``(asset, slot, version, error, status)``."""
        faults = list(faults)
        if faults:
            with self._lock:
                self._model_errors.update(faults)

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
                "model_requests": {_SEP.join(k): v for k, v in self._model_requests.items()},
                "model_slow": {_SEP.join(k): v for k, v in self._model_slow.items()},
                "model_errors": {_SEP.join((*k[:4], str(k[4]))): v
                                 for k, v in self._model_errors.items()},
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
        typed = MetricsSnapshot.from_dict(snap)
        self._model_requests = Counter(typed.model_requests)
        self._model_slow = Counter(typed.model_slow)
        self._model_errors = Counter(typed.model_errors)


_COUNTER_MAPS = ("requests", "errors", "sla_violations", "predictions", "model_requests",
                 "model_slow", "model_errors")


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
            for k, v in (snap.get(name) or {}).items():
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


# ----------------------------------------------------------------------- typed snapshot
def _split_keys(raw: Any, parts: int) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for key, value in (raw.items() if isinstance(raw, Mapping) else ()):
        fields = str(key).split(_SEP)
        if len(fields) != parts:
            continue  # not this format (written by another version): ignored, never misread
        try:
            out[tuple(fields)] = out.get(tuple(fields), 0) + int(value)
        except (TypeError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class MetricsSnapshot:
    """One replica's published counters, typed (what :meth:`ServeMetrics.snapshot` wrote).

    The per-model maps are keyed by ``(asset, slot, version)``; ``model_errors`` by
    ``(asset, slot, version, error, status)``: errors of that model's own making only.
    ``raw`` keeps the published dictionary (the deployment-wide figures are read from it).
    """

    model_requests: Mapping[ModelKey, int] = field(default_factory=dict)
    model_slow: Mapping[ModelKey, int] = field(default_factory=dict)
    model_errors: Mapping[ModelFault, int] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "MetricsSnapshot":
        """Parse a published snapshot; missing or malformed parts read as zero."""
        raw = dict(raw) if isinstance(raw, Mapping) else {}
        errors: dict[ModelFault, int] = {}
        for (asset, slot, version, error, status), n in _split_keys(raw.get("model_errors"), 5).items():
            if status.isdigit():
                k = (asset, slot, version, error, int(status))
                errors[k] = errors.get(k, 0) + n
        return cls(model_requests=_split_keys(raw.get("model_requests"), 3),  # type: ignore[arg-type]
                   model_slow=_split_keys(raw.get("model_slow"), 3),  # type: ignore[arg-type]
                   model_errors=errors, raw=raw)

    @staticmethod
    def _match(key: tuple[Any, ...], asset: str, version: str | None, slot: str | None) -> bool:
        return key[0] == asset and (version is None or key[2] == version) and \
            (slot is None or key[1] == slot)

    def served(self, asset: str, version: str | None = None, slot: str | None = None) -> int:
        """Requests (batch rows) that model was chosen to serve, whatever their outcome."""
        return sum(n for k, n in self.model_requests.items() if self._match(k, asset, version, slot))

    def slow(self, asset: str, version: str | None = None, slot: str | None = None) -> int:
        """Of those, how many were slower than the latency SLA."""
        return sum(n for k, n in self.model_slow.items() if self._match(k, asset, version, slot))

    def own_errors(self, asset: str, version: str | None = None, slot: str | None = None,
                   server_only: bool = True) -> int:
        """Errors of the model's own making (5xx only unless ``server_only`` is False)."""
        return sum(n for k, n in self.model_errors.items()
                   if self._match(k, asset, version, slot) and (k[4] >= 500 or not server_only))

    def own_errors_by_slot(self, asset: str, version: str | None = None) -> dict[str, int]:
        """Own 5xx errors of ``asset``'s models, per slot."""
        out: dict[str, int] = {}
        for k, n in self.model_errors.items():
            if self._match(k, asset, version, None) and k[4] >= 500:
                out[k[1]] = out.get(k[1], 0) + n
        return out

    def total(self) -> int:
        """All per-model counts together (falls only when the replica restarted)."""
        return sum(self.model_requests.values()) + sum(self.model_errors.values())


def _typed(snap: "MetricsSnapshot | Mapping[str, Any]") -> MetricsSnapshot:
    return snap if isinstance(snap, MetricsSnapshot) else MetricsSnapshot.from_dict(snap)


def candidate_sla(baseline: Mapping[str, "MetricsSnapshot | Mapping[str, Any]"],
                  current: Mapping[str, "MetricsSnapshot | Mapping[str, Any]"],
                  asset: str, version: str | None) -> SlaFigures:
    """The serving figures of one model (``asset``'s ``version``, in whichever slot) since
    ``baseline``: what a rollback may blame on it.

    ``requests`` are the requests that model was chosen to serve, ``errors`` the 5xx of its own
    making among them, ``slow`` those over the latency SLA (measured from arrival to the last
    byte). ``p99_ms`` is the deployment's p99 over the prediction endpoints, for the evidence.
    Both mappings go from replica id to snapshot (typed or as published). A replica absent
    from the baseline, or whose counts went down (restarted), counts from zero.

    Examples
    --------
    >>> base = {"r1": {"model_requests": {"A|blue|v1": 10}}}
    >>> now = {"r1": {"model_requests": {"A|blue|v1": 10, "A|green|v2": 40},
    ...               "model_errors": {"A|green|v2|model_failed|500": 3}},
    ...        "r2": {"model_requests": {"A|green|v2": 10}}}
    >>> candidate_sla(base, now, "A", "v2")
    SlaFigures(requests=50, errors=3, slow=0, p99_ms=None)
    """
    requests = errors = slow = 0
    bounds: list[float] | None = None
    hist: list[int] | None = None
    for replica, snap in current.items():
        cur = _typed(snap)
        old = _typed(baseline.get(replica, {}))
        r1, e1, s1 = cur.served(asset, version), cur.own_errors(asset, version), cur.slow(asset, version)
        r0, e0, s0 = old.served(asset, version), old.own_errors(asset, version), old.slow(asset, version)
        b1, h1 = _predict_hist(cur.raw)
        b0, h0 = _predict_hist(old.raw)
        if cur.total() < old.total() or r1 < r0 or e1 < e0 or s1 < s0 or b0 != b1 or \
                any(a < b for a, b in zip(h1, h0)):
            r0 = e0 = s0 = 0  # restarted replica: its counters began again
            h0 = [0] * len(h1)
        requests += r1 - r0
        errors += e1 - e0
        slow += s1 - s0
        if not b1:
            continue
        delta = [a - b for a, b in zip(h1, h0)]
        if hist is None:
            bounds, hist = b1, delta
        elif b1 == bounds:
            hist = [a + b for a, b in zip(hist, delta)]
    p99 = None
    if hist is not None and bounds is not None and sum(hist) > 0:
        p99 = quantile_from_hist(hist, bounds, 0.99)
    return SlaFigures(requests=requests, errors=errors, slow=slow, p99_ms=p99)


_PREDICT_ENDPOINTS = ("predict", "batch")


def _predict_hist(raw: Mapping[str, Any]) -> tuple[list[float], list[int]]:
    """Bucket bounds and the summed latency histogram of the prediction endpoints."""
    try:
        bounds = [float(b) for b in raw.get("buckets_ms") or []]
    except (TypeError, ValueError):
        return [], []
    hist = [0] * (len(bounds) + 1)
    for key, counts in (raw.get("latency_hist") or {}).items():
        if str(key).split(_SEP, 1)[0] in _PREDICT_ENDPOINTS and len(counts) == len(hist):
            hist = [a + int(b) for a, b in zip(hist, counts)]
    return (bounds, hist) if bounds else ([], [])


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
             "Predictions by slot and role (served or shadow)."),
            ("model_errors_total", "model_errors", ("asset", "slot", "version", "error", "code"),
             "Errors of a model's own making (it failed, gave no finite forecast, or cannot "
             "use the online features).")):
        family(name, "counter", help_text)
        for key in sorted(merged.get(source) or {}):
            lines.append(f"{PREFIX}{name}{{{_labels(label_names, key)}}} {merged[source][key]}")

    family("request_latency_seconds", "histogram",
           "Latency from arrival at the replica to the response's last byte, by endpoint and slot.")
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
