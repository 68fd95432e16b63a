"""Replica autoscaling on CPU as well as on ongoing requests.

Ray Serve's default policy sizes a deployment by the requests its replicas hold at once. A
replica that scores single predictions on its event loop (``serve.predict_inline``) finishes
each one before it reads the next, so under load the queue forms in socket buffers and in
HAProxy, where Serve does not count it: at 20 connections a saturated replica still reports
about one ongoing request. How busy its event loop is does show the load, so each replica
reports the CPU time of that one thread (:class:`CpuMeter`, through Serve's
``record_autoscaling_stats`` hook): HTTP parsing, Serve's request handling and inline scoring,
but not the background threads that refresh features (their cost grows with the number of
assets, not with traffic). :class:`LoadPolicy` asks for enough replicas to satisfy both
signals, with a band between scaling up and scaling down so that the replica count does not
flap; Serve applies the configured bounds and up/down-scale delays around it.

This module is pickled by value into Serve's controller: it imports nothing of ours.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

CPU_METRIC = "cpu_cores"


class CpuMeter:
    """Share of one core the calling thread used between two calls of :meth:`sample`.

    Serve calls the hook on the replica's event loop, so that is the thread measured. The
    first call from a thread (and the first after the hook moved to another thread) starts
    the measurement and reports 0.0.
    """

    def __init__(self) -> None:
        self._thread: int | None = None
        self._cpu = 0.0
        self._wall = 0.0

    def sample(self) -> float:
        """Cores used by this thread since its previous sample."""
        cpu, wall, thread = time.thread_time(), time.monotonic(), threading.get_ident()
        if thread != self._thread:
            self._thread, self._cpu, self._wall = thread, cpu, wall
            return 0.0
        used = (cpu - self._cpu) / max(wall - self._wall, 1e-6)
        self._cpu, self._wall = cpu, wall
        return max(0.0, used)


def desired_replicas(current: int, total_requests: float, target_requests: float,
                     cpu_by_replica: Mapping[Any, float], target_cpu: float,
                     downscale_fill: float = 0.75) -> float:
    """Replicas needed so that neither signal exceeds its per-replica target.

    ``total_requests`` are the ongoing requests of all replicas (Serve's own signal);
    ``cpu_by_replica`` each replica's event-loop CPU in cores, averaged over the look-back
    period. Scaling up follows the targets; scaling down only goes as far as leaves every
    remaining replica at ``downscale_fill`` of the CPU target, so that the load which has just
    scaled up does not scale back down at once (two replicas at 0.4 cores each with a target
    of 0.8 stay two, instead of becoming one at 0.8 and scaling up again).
    """
    by_requests = total_requests / target_requests if target_requests > 0 else 0.0
    cpu = sum(cpu_by_replica.values())
    by_cpu = cpu / target_cpu if target_cpu > 0 else 0.0
    want = max(by_requests, by_cpu)
    if want < current and target_cpu > 0:
        want = max(want, min(float(current), cpu / (target_cpu * downscale_fill)))
    return want


class LoadPolicy:
    """Serve autoscaling policy: ``max(ongoing / target_ongoing, Σ cpu / target_cpu)``, with
    the downscale band of :func:`desired_replicas`.

    Parameters
    ----------
    target_cpu
        Share of a core one replica's event loop should be busy, on average (one replica's
        Python work is bound to about one core by the interpreter lock).
    downscale_fill
        Scale down only to a count that leaves each replica below this share of the target.
    """

    def __init__(self, target_cpu: float = 0.6, downscale_fill: float = 0.75) -> None:
        self.target_cpu = float(target_cpu)
        self.downscale_fill = float(downscale_fill)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        want = desired_replicas(ctx.current_num_replicas, ctx.total_num_requests,
                                ctx.config.get_target_ongoing_requests(),
                                metrics.get(CPU_METRIC, {}), self.target_cpu, self.downscale_fill)
        return want, {}  # Serve rounds up, bounds it by min/max_replicas and applies the delays


def policy_config(target_cpu: float, downscale_fill: float) -> dict[str, Any]:
    """The ``autoscaling_config["policy"]`` entry for :class:`LoadPolicy`."""
    return {"policy_function": f"{__name__}:LoadPolicy",
            "policy_kwargs": {"target_cpu": target_cpu, "downscale_fill": downscale_fill}}
