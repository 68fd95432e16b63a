"""The CPU-aware autoscaling policy and the deployment options that install it."""

from __future__ import annotations

import threading
import time

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app.app import deployment_options, replica_env
from serve_app.autoscaling import BUSY_METRIC, BusyMeter, LoadPolicy, desired_replicas
from tickcast.config import load_settings


def _context(replicas: int, ongoing: float, cpu: dict[str, float], target_ongoing: float = 8.0) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="d", app_name="a", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=list(cpu), total_num_requests=ongoing,
        total_queued_requests=0.0, aggregated_metrics={BUSY_METRIC: cpu}, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=target_ongoing))


def test_desired_replicas_takes_the_larger_signal() -> None:
    # A saturated inline replica: about one ongoing request, but its loop 0.95 busy.
    assert desired_replicas(1, 1.0, 8.0, {"r1": 0.95}, 0.8) == pytest.approx(0.95 / 0.8)
    # Requests piling up on an idle loop (batches on scoring threads): the request signal wins.
    assert desired_replicas(1, 40.0, 8.0, {"r1": 0.1}, 0.8) == pytest.approx(5.0)
    # No CPU reports yet (a replica just started): requests alone decide.
    assert desired_replicas(1, 16.0, 8.0, {}, 0.8) == pytest.approx(2.0)
    assert desired_replicas(1, 16.0, 8.0, {"r1": 5.0}, 0.0) == pytest.approx(2.0)  # busy signal off


def test_desired_replicas_scales_down_only_below_the_band() -> None:
    # Two replicas at 0.35 each: one would run at 0.7 (below the 0.8 target) but above
    # 0.75 x 0.8 = 0.6, so they stay two: no flapping right after a scale-up.
    assert desired_replicas(2, 1.0, 8.0, {"r1": 0.35, "r2": 0.35}, 0.8) == pytest.approx(0.7 / 0.6)
    # Light load (300 req/s: 0.1 each): down to one.
    assert desired_replicas(2, 0.5, 8.0, {"r1": 0.1, "r2": 0.1}, 0.8) <= 1.0
    # The band never asks for more replicas than are running.
    assert desired_replicas(3, 0.0, 8.0, {"r1": 0.7, "r2": 0.7, "r3": 0.7}, 0.8) <= 3.0
    # Scaling up is not damped.
    assert desired_replicas(2, 0.0, 8.0, {"r1": 0.9, "r2": 0.9}, 0.8) == pytest.approx(1.8 / 0.8)


def test_load_policy_reads_serve_context() -> None:
    policy = LoadPolicy(target_busy=0.5, downscale_fill=1.0)
    want, state = policy(_context(1, 1.0, {"r1": 0.9}))
    assert want == pytest.approx(1.8) and state == {}
    want, _ = policy(_context(2, 2.0, {"r1": 0.1, "r2": 0.1}))
    assert want == pytest.approx(0.4)
    want, _ = policy(_context(0, 0.0, {}))
    assert want == 0  # nothing running: Serve's cold-start path decides


def test_busy_meter_measures_the_calling_thread() -> None:
    meter = BusyMeter()
    assert meter.sample() == 0.0  # the first call starts the measurement
    t = time.thread_time()
    while time.thread_time() - t < 0.2:  # burn CPU on this thread
        pass
    busy = meter.sample()
    spin = threading.Thread(target=lambda: [0 for _ in range(3_000_000)])
    spin.start()  # another thread's work is not this thread's
    time.sleep(0.2)
    spin.join()
    idle = meter.sample()
    assert busy > 0.5  # spinning: about all of the time
    assert idle < 0.3
    other: list[float] = []
    th = threading.Thread(target=lambda: other.append(meter.sample()))
    th.start()
    th.join()
    assert other == [0.0]  # another thread: a new measurement starts


def test_busy_meter_counts_time_waiting_for_a_cpu() -> None:
    # Pin this thread and a CPU hog to one core: this thread runs about half the time but
    # wants to run all of it. CPU time would read ~0.5; busy reads ~1.
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/thread-self/schedstat"):
        pytest.skip("Linux only")
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        meter = BusyMeter()
        meter.sample()
        cpu0, t0 = time.thread_time(), time.monotonic()
        while time.monotonic() - t0 < 0.5:
            pass
        ran = (time.thread_time() - cpu0) / (time.monotonic() - t0)
        busy = meter.sample()
    finally:
        os.sched_setaffinity(0, saved)
        hog.kill()
        hog.wait()
    assert ran < 0.8  # the hog took its share of the core
    assert busy > 0.9


def test_deployment_installs_policy_and_replica_environment() -> None:
    settings = load_settings(overrides=["serve.autoscaling.target_busy=0.7", "serve.drain_period_s=3"])
    opts = deployment_options(settings)
    policy = opts["autoscaling_config"]["policy"]
    assert policy == {"policy_function": "serve_app.autoscaling:LoadPolicy",
                      "policy_kwargs": {"target_busy": 0.7, "downscale_fill": 0.75}}
    AutoscalingConfig(**opts["autoscaling_config"])  # Serve accepts it (imports and pickles the policy)
    env = opts["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == replica_env(settings)
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "3.0"
    off = deployment_options(load_settings(overrides=["serve.autoscaling.target_busy=0"]))
    assert "policy" not in off["autoscaling_config"]
