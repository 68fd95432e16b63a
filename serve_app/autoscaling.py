"""Replica autoscaling on event-loop load as well as on ongoing requests.

Ray Serve's default policy sizes a deployment by the requests its replicas hold at once. A
replica that scores single predictions on its event loop (``serve.predict_inline``) finishes
each one within a step or two of the loop, so under load the queue forms in socket buffers and
in HAProxy, where Serve does not count it: measured with a yield before scoring (so that
every arrived request was admitted first), a saturated replica held about eight requests on
average at 32 connections, and about two at 20 paced ones. How busy its event loop is does show the load, so
each replica reports it (:class:`BusyMeter`, through Serve's ``record_autoscaling_stats``
hook) and :class:`LoadPolicy` asks for enough replicas to satisfy both signals, with a band
between scaling up and scaling down so that the count does not flap. Serve applies the
configured bounds and up/down-scale delays around it.

"Busy" is the share of wall time the loop's thread was running or waiting for a CPU (Linux
``/proc/thread-self/schedstat``): CPU time alone reads low exactly when the host is short of
CPU, because a starved loop runs less. The thread's background siblings (feature refresh,
prediction log) are not counted: their cost follows the number of assets, not the traffic.

This module is pickled by value into Serve's controller: it imports nothing of ours.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping

BUSY_METRIC = "loop_busy"
_SCHEDSTAT = "/proc/thread-self/schedstat"


def _thread_busy_s() -> float:
    """Seconds the calling thread has run plus waited on a run queue (CPU time without Linux)."""
    try:
        with open(_SCHEDSTAT, "rb") as f:
            run_ns, wait_ns = f.read().split()[:2]
        return (int(run_ns) + int(wait_ns)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


class BusyMeter:
    """Share of wall time the calling thread was running or runnable, between two samples.

    Serve calls the hook on the replica's event loop, so that is the thread measured. The first
    call from a thread (and the first after the hook moved to another thread) starts the
    measurement and reports 0.0.
    """

    def __init__(self, clock: Callable[[], float] = _thread_busy_s) -> None:
        self._clock = clock
        self._thread: int | None = None
        self._busy = 0.0
        self._wall = 0.0

    def sample(self) -> float:
        """Busy share of this thread since its previous sample."""
        busy, wall, thread = self._clock(), time.monotonic(), threading.get_ident()
        if thread != self._thread:
            self._thread, self._busy, self._wall = thread, busy, wall
            return 0.0
        share = (busy - self._busy) / max(wall - self._wall, 1e-6)
        self._busy, self._wall = busy, wall
        return max(0.0, share)


def desired_replicas(current: int, total_requests: float, target_requests: float,
                     busy_by_replica: Mapping[Any, float], target_busy: float,
                     downscale_fill: float = 0.75) -> float:
    """Replicas needed so that neither signal exceeds its per-replica target.

    ``total_requests`` are the ongoing requests of all replicas (Serve's own signal);
    ``busy_by_replica`` each replica's event-loop busy share, averaged over the look-back
    period. Scaling up follows the targets; scaling down only goes as far as leaves every
    remaining replica at ``downscale_fill`` of the busy target, so that the load which has
    just scaled up does not scale back down at once (two replicas at 0.35 each with a target
    of 0.8 stay two, instead of becoming one at 0.7 and scaling up again when it wobbles).
    """
    by_requests = total_requests / target_requests if target_requests > 0 else 0.0
    busy = sum(busy_by_replica.values())
    by_busy = busy / target_busy if target_busy > 0 else 0.0
    want = max(by_requests, by_busy)
    if want < current and target_busy > 0:
        want = max(want, min(float(current), busy / (target_busy * downscale_fill)))
    return want


class LoadPolicy:
    """Serve autoscaling policy: ``max(ongoing / target_ongoing, Σ busy / target_busy)``,
    with the downscale band of :func:`desired_replicas`.

    Parameters
    ----------
    target_busy
        Share of wall time one replica's event loop should be busy, on average.
    downscale_fill
        Scale down only to a count that leaves each replica below this share of the target.
    """

    def __init__(self, target_busy: float = 0.8, downscale_fill: float = 0.75) -> None:
        self.target_busy = float(target_busy)
        self.downscale_fill = float(downscale_fill)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        want = desired_replicas(ctx.current_num_replicas, ctx.total_num_requests,
                                ctx.config.get_target_ongoing_requests(),
                                metrics.get(BUSY_METRIC, {}), self.target_busy, self.downscale_fill)
        return want, {}  # Serve rounds up, bounds it by min/max_replicas and applies the delays


def policy_config(target_busy: float, downscale_fill: float) -> dict[str, Any]:
    """The ``autoscaling_config["policy"]`` entry for :class:`LoadPolicy`."""
    return {"policy_function": f"{__name__}:LoadPolicy",
            "policy_kwargs": {"target_busy": target_busy, "downscale_fill": downscale_fill}}
