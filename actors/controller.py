"""The closed-loop controller: one named, detached actor ``controller`` (namespace ``tickcast``).

State it owns (:class:`ControllerState`, checkpointed)
    Per asset an :class:`AssetLoop`: the phase (``idle``, ``waiting_data``, ``retraining``,
    ``shadow``, ``watch``), the alert or schedule that started it, the retraining in flight
    (runner, job id, range), the candidate and incumbent versions with their paired forecasts
    (:class:`~tickcast.monitoring.shadow_eval.ForecastJoin` and
    :class:`~tickcast.monitoring.shadow_eval.PairedSample`), the serving-metrics baseline of a
    watch, the versions already judged and, while evaluating, its cursor on
    ``predictions:<ASSET>``. Plus the event counter.

Messages it answers
    ``on_alert(asset, alert)`` (from a market shard's drift watch when the score reaches
    ``drift.retrain_score``; returns True once recorded),
    ``retrain(asset, reason)`` (now), ``evaluate(asset, version)`` (shadow-test a registered
    version), ``status()``, ``fingerprint()``, ``pid()``, ``stop()``.

What it does, every ``controller.poll_s`` (a background thread), for the assets with work
    (an alert, moved aliases, a phase other than idle, the periodic sweep; idle assets cost
    nothing, so its work grows with what happens, not with the number of assets)
    1. *Retrain* on a drift alert (after ``retrain_min_new_bars`` bars of the new regime) or
       every ``retrain_schedule_s``: ``ray job submit`` of ``python -m training.retrain``
       (:class:`ray.job_submission.JobSubmissionClient`, ``working_dir`` = the project) when the
       cluster runs a job server, else the same :func:`training.pipeline.train_model` as a Ray
       task (``controller.retrain_runner`` chooses; the event says which ran). The pipeline
       registers the model as ``challenger``.
    2. *Shadow*: a new challenger (from a retrain, ``tickcast train`` or an operator) is loaded
       into the idle slot and shadow mode is switched on (:class:`serve_app.control.TrafficControl`,
       no HTTP hop), so every request is answered by the champion and mirrored to it; both
       predictions are logged. The controller pairs them per bar with the realized return.
    3. *Decide* on the first ``min_paired`` pairs: Diebold-Mariano (HLN) on pinball loss,
       one-sided, and paper Sharpe (:func:`~tickcast.monitoring.shadow_eval.decide_promotion`):
       promote through ``TrafficControl.promote`` or reject (challenger alias cleared).
    4. *Watch* a new champion -- promoted here or elsewhere (an operator, ``tickcast models
       promote``): the previous champion keeps predicting in shadow; on the first
       ``watch_labels`` pairs, significantly worse, or a broken error-rate / latency SLA since
       the promotion (the replicas' metrics in Redis), means an automatic rollback
       (:func:`~tickcast.monitoring.shadow_eval.decide_rollback`).

    Every step is an event on the events stream with its evidence (``tickcast events``);
    promotions and rollbacks are also Ray counters.

How it recovers
    Ray restarts it (``max_restarts=-1``); ``__init__`` loads the checkpoint and resumes reading
    each evaluated asset's prediction stream after its checkpointed id. A retraining job keeps running in the
    job server and is polled again by its id. A retraining task dies with its owner: on restart
    the controller adopts the challenger that task registered if it did, else reports it lost.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml

from actors.loop_support import (CheckpointedLoopActor, EventSink,
                                 LoopMetrics, call_quietly, checkpoint_path,
                                 get_or_create, kill_named, load_checkpoint, read_entries,
                                 save_checkpoint, settings_fingerprint, stream_tail_id)
from serve_app.metrics import MetricsSnapshot, candidate_sla
from tickcast.config import Settings
from tickcast.errors import TickcastError
from tickcast.monitoring import metrics_names as mn
from tickcast.monitoring.events import make_event
from tickcast.monitoring.shadow_eval import (Comparison, Decision, ForecastJoin, PairedSample,
                                             compare_forecasts, decide_promotion, decide_rollback,
                                             parse_prediction)
from tickcast.ray_runtime import ROOT, WORKING_DIR_EXCLUDES
from tickcast.redis_server import connect
from tickcast.storage.bar_store import BarStore
from tickcast.streams import prediction_stream_key
from tickcast.ticks import NS_PER_S
from training.registry import ModelRegistry, registry_root

log = logging.getLogger(__name__)

CONTROLLER_NAME = "controller"
PHASES: tuple[str, ...] = ("idle", "waiting_data", "retraining", "shadow", "watch")


@dataclass
class AssetLoop:
    """The controller's state for one asset (see the module docstring for the phases)."""

    asset: str
    champion: str | None = None  # the registry champion as last seen
    phase: str = "idle"
    phase_since_ns: int = 0
    alert: dict[str, Any] | None = None
    retrain: dict[str, Any] | None = None
    candidate: str | None = None  # challenger (shadow) or new champion (watch)
    incumbent: str | None = None  # champion (shadow) or previous champion (watch)
    origin: str | None = None  # where the candidate came from
    join: ForecastJoin | None = None
    sample: PairedSample | None = None
    baseline: dict[str, Any] | None = None  # replicas' metric snapshots when a watch began
    expected_champion: str | None = None  # set by the controller's own promote / rollback
    decided: list[str] = field(default_factory=list)  # versions judged (never re-evaluated)
    last_retrain_ns: int | None = None
    last_bar_ts: int = -1  # newest bar a logged forecast of this asset was for
    last_decision: dict[str, Any] | None = None
    predictions_id: str | None = None  # cursor on predictions:<ASSET> while evaluating

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no sample arrays)."""
        return {"asset": self.asset, "champion": self.champion, "phase": self.phase,
                "phase_since_ns": self.phase_since_ns, "alert": self.alert,
                "retrain": self.retrain, "candidate": self.candidate, "incumbent": self.incumbent,
                "origin": self.origin, "paired": self.sample.n if self.sample is not None else 0,
                "pending": self.join.pending if self.join is not None else 0,
                "dropped": dict(self.join.dropped) if self.join is not None else {},
                "decided": list(self.decided), "last_decision": self.last_decision,
                "last_bar_ts": self.last_bar_ts}


@dataclass
class ControllerState:
    """Everything the controller checkpoints."""

    assets: dict[str, AssetLoop] = field(default_factory=dict)
    seq: int = 0
    started_ns: int = field(default_factory=time.time_ns)


@ray.remote(num_cpus=0, max_retries=0)
def retrain_task(settings: Settings, asset: str, train_start_ns: int, train_end_ns: int,
                 trials: int | None, seed: int) -> dict[str, Any]:
    """The training pipeline as a Ray task (where no job server runs); returns its summary."""
    from training.pipeline import train_model

    return train_model(settings, asset, train_start_ns, train_end_ns, trials, seed=seed)


def _job_client() -> Any:
    """A JobSubmissionClient for this cluster's job server, or None when there is none."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    try:
        addr = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                            namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    except Exception:  # noqa: BLE001 - no GCS KV access: no job server either
        return None
    if not addr:
        return None
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(f"http://{addr.decode() if isinstance(addr, bytes) else addr}")
    except Exception as exc:  # noqa: BLE001 - dashboard without a job module, unreachable
        log.info("job server unavailable: %s", exc)
        return None


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out = json.loads(line)
            except ValueError:
                continue
            if isinstance(out, dict):
                return out
    return None


@ray.remote(max_restarts=-1, max_task_retries=-1)
class Controller(CheckpointedLoopActor):
    """Retrain, shadow-evaluate, promote, watch and roll back (see the module docstring).

    Parameters
    ----------
    settings
        The whole configuration (``controller``, ``serve``, ``model``, ``tune``...).
    redis_url
        The Redis of the streams, the routing table and the events.
    """

    def __init__(self, settings: Settings, redis_url: str) -> None:
        from serve_app.control import RoutingStore, TrafficControl

        self.settings = settings
        self.redis_url = redis_url
        self._fingerprint = settings_fingerprint(settings, redis_url)
        self.data_dir = Path(settings.data_dir).resolve()
        self.client = connect(redis_url, settings.redis.socket_timeout_s)
        self.registry = ModelRegistry(registry_root(settings))
        self.control = TrafficControl(RoutingStore(self.client, settings.serve.redis_prefix),
                                      self.registry, settings.serve.shadow_default)
        self.bars = BarStore(self.data_dir / "bars", fsync=False)
        self.sink = EventSink(self.client, settings, "controller")
        self.metrics = LoopMetrics((mn.PROMOTIONS_TOTAL, mn.ROLLBACKS_TOTAL))
        self.freq_ns = settings.bars.freq_s * NS_PER_S
        self.path = checkpoint_path(settings, "controller")
        self.last_error: str | None = None
        self.restored = False
        self._tasks: dict[str, Any] = {}  # asset -> ObjectRef of a retraining task
        self._woken: set[str] = set()  # assets with an event since the last step
        self._registry_seen = -1
        self._next_sweep = 0.0
        self._jobs: Any = None
        self._jobs_checked = False
        state, err = load_checkpoint(self.path)
        if isinstance(state, ControllerState):
            self.state = state
            self.restored = True
        else:
            if err or state is not None:
                self.last_error = err or "checkpoint of another kind: ignored"
            self.state = ControllerState()
        for asset in settings.assets:
            self.state.assets.setdefault(asset, AssetLoop(asset, phase_since_ns=time.time_ns()))
        self._lock = threading.RLock()
        self._steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ plumbing
    def _idle_s(self) -> float:
        """The controller polls on its own period (``controller.poll_s``)."""
        return self.settings.controller.poll_s

    def _rollback(self) -> None:
        """A step failed half-way: back to the last checkpoint (its inputs are read again).

        Actions already taken (a job submitted, an alias moved) are not undone; the next steps
        see their effects in the registry and the routing table.
        """
        with self._lock:
            state, _ = load_checkpoint(self.path)
            if isinstance(state, ControllerState):
                self.state = state

    def _emit(self, asset: str | None, kind: str, **evidence: Any) -> dict[str, Any]:
        self.state.seq += 1
        ev = make_event("controller", asset, kind, seq=self.state.seq, **evidence)
        self.sink.emit([ev])
        return ev

    def _save(self) -> None:
        err = save_checkpoint(self.path, self.state)
        if err:
            self.last_error = err

    def _phase(self, loop: AssetLoop, phase: str) -> None:
        loop.phase = phase
        loop.phase_since_ns = time.time_ns()

    def _job_server(self) -> Any:
        if not self._jobs_checked:
            self._jobs = _job_client()
            self._jobs_checked = True
        return self._jobs

    def _serve_snapshots(self) -> dict[str, MetricsSnapshot]:
        """Every live replica's cumulative metrics snapshot (published by the replicas)."""
        prefix = self.settings.serve.redis_prefix
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in self.client.zrange(f"{prefix}metrics:replicas", 0, -1)]
        if not ids:
            return {}
        docs = self.client.mget([f"{prefix}metrics:{i}" for i in ids])
        out: dict[str, Any] = {}
        for rid, raw in zip(ids, docs):
            if raw is None:
                continue
            try:
                out[rid] = MetricsSnapshot.from_dict(json.loads(raw).get("metrics", {}))
            except (ValueError, AttributeError):
                continue
        return out

    def _notify_monitors(self, asset: str, champion: str | None) -> None:
        """Tell the shard that owns the asset about the new champion (no wait)."""
        from actors.market_shard import shard_for

        ref = call_quietly(lambda: shard_for(asset, self.client))
        if ref is not None:
            call_quietly(lambda: ref.follow_champion.remote(champion))

    def _latest_bar(self, asset: str, since_ns: int | None) -> tuple[int | None, int]:
        """(newest stored bar ts, bars stored after ``since_ns``)."""
        bars = self.bars.read(asset, start_ns=None if since_ns is None else since_ns + 1)
        if not len(bars):
            return None, 0
        return int(bars["ts"].iloc[-1]), int(len(bars))

    # ------------------------------------------------------------------ the step
    def _step(self) -> bool:
        """Advance the assets with something to do; the rest cost nothing.

        An idle asset has work only when its aliases move (one stat of the registry's change
        marker tells), when a drift alert arrives (``on_alert``) or on the periodic sweep
        (scheduled retraining). Assets retraining, shadowing or watching are advanced every
        step, reading their own ``predictions:<ASSET>`` streams.
        """
        with self._lock:
            self.sink.drain()
            now = time.monotonic()
            changed = self.registry.changed_ns()
            sweep = changed != self._registry_seen or now >= self._next_sweep
            if sweep:
                self._registry_seen = changed
                self._next_sweep = now + self.settings.shards.monitor_sweep_s
            loops = [lp for lp in self.state.assets.values()
                     if sweep or lp.phase != "idle" or lp.asset in self._woken]
            self._woken.clear()
            more = False
            for loop in loops:
                forecasts: list[Any] = []
                if loop.phase in ("shadow", "watch"):
                    forecasts, full = self._read_forecasts(loop)
                    more = more or full
                try:
                    self._advance(loop, forecasts)
                except TickcastError as exc:
                    self.last_error = f"{loop.asset}: {exc.message}"
                    log.warning("controller %s: %s", loop.asset, exc.message)
            if loops:
                self._save()
            self._steps += 1
            return more

    def _read_forecasts(self, loop: AssetLoop) -> tuple[list[Any], bool]:
        """New forecasts of ``loop.asset`` from its prediction stream (and whether more wait)."""
        c = self.settings.controller
        key = prediction_stream_key(self.settings.serve.prediction_stream, loop.asset)
        if loop.predictions_id is None:
            loop.predictions_id = stream_tail_id(self.client, key)
        preds = read_entries(self.client, key, loop.predictions_id, c.stream_batch)
        forecasts = []
        for _eid, fields in preds:
            f, _why = parse_prediction(fields)
            if f is not None and f.asset == loop.asset:
                forecasts.append(f)
        if preds:
            loop.predictions_id = preds[-1][0]
        if forecasts:
            loop.last_bar_ts = max(loop.last_bar_ts, max(f.bar_ts for f in forecasts))
        return forecasts, len(preds) >= c.stream_batch

    def _newest_forecast_bar(self, asset: str) -> int:
        """Bar of the newest logged forecast of ``asset`` (-1 when none)."""
        key = prediction_stream_key(self.settings.serve.prediction_stream, asset)
        newest: Any = self.client.xrevrange(key, count=1)
        for _eid, fields in newest or ():
            f, _why = parse_prediction(fields)
            if f is not None:
                return int(f.bar_ts)
        return -1

    def _advance(self, loop: AssetLoop, forecasts: list[Any]) -> None:
        aliases = self.registry.aliases(loop.asset)
        self._follow_champion(loop, aliases)
        challenger = aliases.get("challenger")
        if loop.phase in ("idle", "waiting_data") and challenger and loop.champion is not None \
                and challenger != loop.champion and challenger not in loop.decided:
            # A challenger registered elsewhere (``tickcast train``, an operator) is tested at
            # once; a retrain waiting for data would only produce another one.
            if loop.phase == "waiting_data":
                self._emit(loop.asset, "retrain_cancelled", challenger=challenger,
                           reason="a challenger was registered meanwhile", alert=loop.alert)
            self._start_shadow(loop, challenger, "registry")
            return
        if loop.phase == "waiting_data":
            self._maybe_submit(loop)
        elif loop.phase == "retraining":
            self._poll_retrain(loop, aliases)
        elif loop.phase in ("shadow", "watch"):
            if loop.phase == "shadow" and aliases.get("challenger") != loop.candidate:
                self._end_shadow(loop, "shadow_aborted",
                                 f"challenger alias moved to {aliases.get('challenger')!r}")
                return
            self._ensure_shadow(loop)
            self._collect(loop, forecasts)
            if loop.phase == "shadow":
                self._judge_shadow(loop)
            else:
                self._judge_watch(loop)
        if loop.phase == "idle":
            self._maybe_schedule(loop)

    # ------------------------------------------------------------------ champion changes
    def _follow_champion(self, loop: AssetLoop, aliases: dict[str, str]) -> None:
        champion = aliases.get("champion")
        if champion == loop.champion:
            return
        before = loop.champion
        loop.champion = champion
        if before is None or champion == loop.expected_champion:
            loop.expected_champion = None
            return  # first sight, or the controller's own promotion / rollback
        # Someone else moved the champion (an operator, `tickcast models promote`).
        previous = aliases.get("previous")
        self._emit(loop.asset, "champion_changed", by="external", **{"from": before, "to": champion},
                   previous=previous, phase=loop.phase)
        if loop.phase == "shadow":
            self._end_shadow(loop, "shadow_aborted", "the champion changed during the evaluation")
        if champion is not None and previous is not None and previous == before:
            self._start_watch(loop, champion, previous, "external promotion")
        self._notify_monitors(loop.asset, champion)

    # ------------------------------------------------------------------ retraining
    def _maybe_schedule(self, loop: AssetLoop) -> None:
        every = self.settings.controller.retrain_schedule_s
        if every is None or loop.champion is None:
            return
        last = loop.last_retrain_ns or self.state.started_ns
        if time.time_ns() - last >= every * 1e9:
            loop.alert = None
            self._submit(loop, "schedule")

    def _maybe_submit(self, loop: AssetLoop) -> None:
        need = self.settings.controller.retrain_min_new_bars
        since = (loop.alert or {}).get("bar_ts")
        newest, count = self._latest_bar(loop.asset, since if isinstance(since, int) else None)
        if need and count < need:
            return
        self._submit(loop, "drift")

    def _submit(self, loop: AssetLoop, trigger: str) -> None:
        c = self.settings.controller
        newest, _ = self._latest_bar(loop.asset, None)
        if newest is None:
            self._emit(loop.asset, "retrain_failed", trigger=trigger, reason="no stored bars")
            self._phase(loop, "idle")
            return
        end_ns = newest + self.freq_ns
        start_ns = end_ns - c.retrain_window_bars * self.freq_ns
        trials = c.retrain_trials
        runner = c.retrain_runner
        jobs = self._job_server() if runner in ("auto", "job") else None
        info: dict[str, Any] = {"trigger": trigger, "train_start_ns": start_ns,
                                "train_end_ns": end_ns, "submitted_ns": time.time_ns(),
                                "trials": trials, "alert": loop.alert}
        if jobs is not None:
            from training.dataset import iso

            cfg_dir = self.data_dir / "controller"
            cfg_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = cfg_dir / f"retrain-{loop.asset}-{info['submitted_ns']}.yaml"
            cfg_path.write_text(yaml.safe_dump(self.settings.model_dump(mode="json"), sort_keys=False))
            parts = [sys.executable, "-m", "training.retrain", "--asset", loop.asset,
                     "--data-dir", str(self.data_dir), "--config", str(cfg_path),
                     "--train-start", iso(start_ns), "--train-end", iso(end_ns)]
            if trials is not None:
                parts += ["--trials", str(trials)]
            entrypoint = " ".join(shlex.quote(p) for p in parts)
            job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env={
                "working_dir": str(ROOT), "excludes": list(WORKING_DIR_EXCLUDES)})
            info.update(runner="job", job_id=job_id, entrypoint=entrypoint)
        elif runner == "job":
            self._emit(loop.asset, "retrain_failed", trigger=trigger,
                       reason="controller.retrain_runner is 'job' but this cluster runs no job server")
            self._phase(loop, "idle")
            return
        else:
            ref = retrain_task.remote(self.settings, loop.asset, start_ns, end_ns, trials, 0)
            self._tasks[loop.asset] = ref
            info.update(runner="task", task="training.pipeline.train_model as a Ray task "
                                             "(no job server on this cluster)")
        loop.retrain = info
        loop.last_retrain_ns = info["submitted_ns"]
        self._phase(loop, "retraining")
        self._emit(loop.asset, "retrain_submitted", champion=loop.champion, **info)
        self._save()  # a failure later in this step must not submit it twice

    def _poll_retrain(self, loop: AssetLoop, aliases: dict[str, str]) -> None:
        info = loop.retrain or {}
        c = self.settings.controller
        age_s = (time.time_ns() - int(info.get("submitted_ns", 0))) / 1e9
        result: dict[str, Any] | None = None
        error: str | None = None
        if info.get("runner") == "job":
            jobs = self._job_server()
            if jobs is None:
                error = "job server no longer reachable"
            else:
                status = str(jobs.get_job_status(info["job_id"]))
                if status.endswith("SUCCEEDED"):
                    logs = jobs.get_job_logs(info["job_id"])
                    result = _last_json(logs)
                    if result is None:
                        error = "job succeeded without a JSON summary"
                elif status.endswith(("FAILED", "STOPPED")):
                    tail = jobs.get_job_logs(info["job_id"]).strip().splitlines()[-5:]
                    error = f"job {status.rsplit('.', 1)[-1]}: {' | '.join(tail)}"
                elif age_s > c.retrain_timeout_s:
                    call_quietly(lambda: jobs.stop_job(info["job_id"]))
                    error = f"timed out after {age_s:.0f} s"
        else:
            ref = self._tasks.get(loop.asset)
            if ref is None:
                # The task died with a previous incarnation: adopt what it registered, if any.
                challenger = aliases.get("challenger")
                if challenger and challenger not in loop.decided:
                    card = call_quietly(lambda: self.registry.card(loop.asset, challenger)) or {}
                    result = {"version": challenger, "alias": "challenger",
                              "adopted_after_restart": True, "created": card.get("created")}
                else:
                    error = "the retraining task was lost with the controller's previous incarnation"
            else:
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    self._tasks.pop(loop.asset, None)
                    try:
                        result = ray.get(ready[0])
                    except Exception as exc:  # noqa: BLE001 - the pipeline's error, reported
                        error = f"{type(exc).__name__}: {exc}"[:2000]
                elif age_s > c.retrain_timeout_s:
                    ray.cancel(ref, force=True)
                    self._tasks.pop(loop.asset, None)
                    error = f"timed out after {age_s:.0f} s"
        if result is None and error is None:
            return
        if error is not None:
            self._emit(loop.asset, "retrain_failed", runner=info.get("runner"), error=error,
                       seconds=age_s, trigger=info.get("trigger"))
            loop.retrain = None
            self._phase(loop, "idle")
            return
        assert result is not None
        version = result.get("version")
        self._emit(loop.asset, "retrain_finished", runner=info.get("runner"),
                   job_id=info.get("job_id"), version=version,
                   alias=result.get("alias"), seconds=age_s, trigger=info.get("trigger"),
                   validation=result.get("validation"), trials=result.get("trials"),
                   dm_vs_random_walk=result.get("dm_vs_random_walk"))
        loop.retrain = {**info, "version": version, "seconds": age_s}
        if not version or version == loop.champion:
            self._phase(loop, "idle")
            return
        if aliases.get("challenger") != version:
            self.registry.set_alias(loop.asset, "challenger", version)
        self._start_shadow(loop, version, f"retrain ({info.get('runner')})")

    # ------------------------------------------------------------------ shadow and watch
    def _new_join(self, loop: AssetLoop, candidate: str, incumbent: str, since: int) -> None:
        card = call_quietly(lambda: self.registry.card(loop.asset, candidate)) or {}
        horizon = int(card.get("horizon", self.settings.model.horizon))
        loop.join = ForecastJoin((candidate, incumbent), horizon, self.freq_ns, since_bar_ts=since,
                                 timeout_bars=self.settings.controller.label_timeout_bars)
        loop.sample = PairedSample(candidate, incumbent)

    def _start_shadow(self, loop: AssetLoop, challenger: str, origin: str) -> None:
        assert loop.champion is not None
        key = prediction_stream_key(self.settings.serve.prediction_stream, loop.asset)
        loop.predictions_id = stream_tail_id(self.client, key)
        self._new_join(loop, challenger, loop.champion, 0)
        loop.candidate, loop.incumbent, loop.origin = challenger, loop.champion, origin
        self._phase(loop, "shadow")
        self.control.reconcile(force=True)  # loads the challenger into the idle slot
        out = call_quietly(lambda: self.control.set_traffic(None, True, [loop.asset]))
        route = out[0].get(loop.asset) if out is not None else None
        self._emit(loop.asset, "shadow_started", challenger=challenger, champion=loop.champion,
                   origin=origin, min_paired=self.settings.controller.min_paired,
                   route=None if route is None else route.to_dict())

    def _start_watch(self, loop: AssetLoop, new: str, previous: str, origin: str) -> None:
        if loop.predictions_id is None:  # not read while idle: start from the stream's end
            key = prediction_stream_key(self.settings.serve.prediction_stream, loop.asset)
            loop.predictions_id = stream_tail_id(self.client, key)
            loop.last_bar_ts = max(loop.last_bar_ts, self._newest_forecast_bar(loop.asset))
        since = loop.last_bar_ts + self.freq_ns if loop.last_bar_ts >= 0 else 0
        self._new_join(loop, new, previous, since)
        loop.candidate, loop.incumbent, loop.origin = new, previous, origin
        loop.baseline = self._serve_snapshots()
        self._phase(loop, "watch")
        # The previous champion keeps its slot; shadow mode keeps its forecasts coming.
        table = call_quietly(lambda: self.control.set_traffic(None, True, [loop.asset])[0])
        route = table.get(loop.asset) if table is not None else None
        self._emit(loop.asset, "watch_started", champion=new, previous=previous, origin=origin,
                   watch_labels=self.settings.controller.watch_labels, since_bar_ts=since,
                   previous_in_a_slot=bool(route is not None and route.slot_of(previous)),
                   route=None if route is None else route.to_dict())

    def _ensure_shadow(self, loop: AssetLoop) -> None:
        """Keep shadow mode on while evaluating (a failed switch or a manual one is undone)."""
        route = self.control.store.load().get(loop.asset)
        if route is None:
            call_quietly(lambda: self.control.reconcile(force=True))
            route = self.control.store.load().get(loop.asset)
        if route is not None and not route.shadow:
            call_quietly(lambda: self.control.set_traffic(None, True, [loop.asset]))

    def _collect(self, loop: AssetLoop, forecasts: list[Any]) -> None:
        join, sample = loop.join, loop.sample
        if join is None or sample is None:
            return
        join.add(forecasts)
        needed = join.needed_range()
        if needed is not None:
            bars = self.bars.read(loop.asset, start_ns=needed[0], end_ns=needed[1])
            if len(bars):
                join.add_closes(bars["ts"].to_numpy(), bars["close"].to_numpy())
        if join.settle():
            y, f, ts = join.take()
            sample.extend(y, f, ts)

    def _compare(self, loop: AssetLoop, first: int) -> Comparison | None:
        sample = loop.sample
        if sample is None or sample.n < first:
            return None
        y, fa, fb = sample.arrays(first)
        card = call_quietly(lambda: self.registry.card(loop.asset, sample.candidate)) or {}
        return compare_forecasts(
            y, fa, fb, fee_bp=self.settings.model.fee_bp,
            periods_per_year=365 * 86_400 / self.settings.bars.freq_s,
            horizon=int(card.get("horizon", self.settings.model.horizon)),
            quantiles=tuple(card.get("quantiles", self.settings.model.quantiles)),
            sizing=self.settings.safety.sizing, candidate_name=sample.candidate,
            incumbent_name=sample.incumbent)

    def _judge_shadow(self, loop: AssetLoop) -> None:
        c = self.settings.controller
        sample = loop.sample
        n = sample.n if sample is not None else 0
        age_s = (time.time_ns() - loop.phase_since_ns) / 1e9
        decision = decide_promotion(self._compare(loop, c.min_paired), n, c)
        if decision.action == "wait":
            if age_s > c.shadow_timeout_s:
                decision = Decision("reject", f"shadow timeout: {n} of {c.min_paired} paired bars "
                                    f"after {age_s:.0f} s", {"paired": n})
            else:
                return
        candidate, champion = loop.candidate, loop.incumbent
        assert candidate is not None and champion is not None
        record = {"decision": decision.action, "candidate": candidate, "champion": champion,
                  "reason": decision.reason, "origin": loop.origin, **decision.evidence}
        loop.decided.append(candidate)
        loop.last_decision = {"phase": "shadow", **record}
        if decision.action == "promote":
            loop.expected_champion = candidate
            table, _ = self.control.promote(loop.asset, candidate)
            loop.champion = candidate
            self.metrics.inc(mn.PROMOTIONS_TOTAL, loop.asset)
            route = table.get(loop.asset)
            self._emit(loop.asset, "promoted", **record,
                       route=None if route is None else route.to_dict())
            self._notify_monitors(loop.asset, candidate)
            self._start_watch(loop, candidate, champion, "promotion by the controller")
            self._save()
        else:
            aliases = self.registry.aliases(loop.asset)
            if aliases.get("challenger") == candidate:
                self.registry.set_alias(loop.asset, "challenger", None)
            call_quietly(lambda: self.control.set_traffic(None, False, [loop.asset]))
            self._emit(loop.asset, "rejected", **record)
            self._clear(loop)
            self._save()

    def _judge_watch(self, loop: AssetLoop) -> None:
        c = self.settings.controller
        sample = loop.sample
        n = sample.n if sample is not None else 0
        # Only the new champion's own requests and 5xx count, never other assets' or slots'.
        sla = candidate_sla(loop.baseline or {}, self._serve_snapshots(), loop.asset, loop.candidate)
        decision = decide_rollback(self._compare(loop, c.watch_labels), n, sla, c)
        if decision.action == "wait":
            route = self.control.store.load().get(loop.asset)
            previous_loaded = route is not None and loop.incumbent is not None and \
                route.slot_of(loop.incumbent) is not None
            age_s = (time.time_ns() - loop.phase_since_ns) / 1e9
            if previous_loaded and age_s <= c.shadow_timeout_s:
                return
            decision = Decision("keep", "watch ended without a full comparison: "
                                + ("the previous champion is in no slot" if not previous_loaded
                                   else f"timeout after {age_s:.0f} s"),
                                {**decision.evidence, "labels": n})
        new, previous = loop.candidate, loop.incumbent
        record = {"decision": decision.action, "champion": new, "previous": previous,
                  "reason": decision.reason, "origin": loop.origin, **decision.evidence}
        loop.last_decision = {"phase": "watch", **record}
        if decision.action == "rollback":
            loop.expected_champion = previous
            table, _ = self.control.rollback(loop.asset)
            loop.champion = previous
            self.metrics.inc(mn.ROLLBACKS_TOTAL, loop.asset)
            call_quietly(lambda: self.control.set_traffic(None, False, [loop.asset]))
            route = table.get(loop.asset)
            self._emit(loop.asset, "rolled_back", **record,
                       route=None if route is None else route.to_dict())
            if new is not None and new not in loop.decided:
                loop.decided.append(new)
            self._notify_monitors(loop.asset, previous)
        else:
            call_quietly(lambda: self.control.set_traffic(None, False, [loop.asset]))
            self._emit(loop.asset, "watch_passed", **record)
        self._clear(loop)
        self._save()

    def _end_shadow(self, loop: AssetLoop, kind: str, reason: str) -> None:
        call_quietly(lambda: self.control.set_traffic(None, False, [loop.asset]))
        self._emit(loop.asset, kind, candidate=loop.candidate, champion=loop.incumbent,
                   reason=reason, paired=loop.sample.n if loop.sample is not None else 0)
        self._clear(loop)

    def _clear(self, loop: AssetLoop) -> None:
        loop.predictions_id = None  # idle assets read nothing
        loop.candidate = loop.incumbent = loop.origin = None
        loop.join = loop.sample = None
        loop.baseline = None
        loop.alert = None
        loop.retrain = None
        self._phase(loop, "idle")

    # ------------------------------------------------------------------ messages
    def on_alert(self, asset: str, alert: dict[str, Any]) -> bool:
        """A drift actor's CRITICAL alert; True once recorded (the drift actor stops retrying)."""
        c = self.settings.controller
        with self._lock:
            loop = self.state.assets.get(asset)
            if loop is None:
                self._emit(asset, "alert_ignored", reason="asset not configured", alert=alert)
                self._save()
                return True
            now = time.time_ns()
            if loop.phase != "idle":
                self._emit(asset, "alert_ignored", reason=f"busy: {loop.phase}", alert=alert)
            elif loop.last_retrain_ns is not None and \
                    now - loop.last_retrain_ns < c.retrain_cooldown_s * 1e9:
                self._emit(asset, "alert_ignored", alert=alert,
                           reason=f"retrained {(now - loop.last_retrain_ns) / 1e9:.0f} s ago "
                                  f"(cooldown {c.retrain_cooldown_s:.0f} s)")
            else:
                loop.alert = dict(alert)
                self._woken.add(asset)
                self._phase(loop, "waiting_data")
                self._emit(asset, "retrain_scheduled", alert=alert,
                           min_new_bars=c.retrain_min_new_bars,
                           window_bars=c.retrain_window_bars)
            self._save()
            return True

    def retrain(self, asset: str, reason: str = "requested") -> dict[str, Any]:
        """Submit a retraining of ``asset`` now (if it is idle); returns its loop state."""
        with self._lock:
            loop = self.state.assets.get(asset)
            if loop is None:
                raise ValueError(f"asset {asset!r} is not configured")
            if loop.phase in ("idle", "waiting_data"):
                loop.alert = {"reason": reason}
                self._submit(loop, "manual")
                self._save()
            return loop.to_dict()

    def evaluate(self, asset: str, version: str, origin: str = "requested") -> dict[str, Any]:
        """Shadow-evaluate a registered ``version`` of ``asset`` against its champion now.

        The version becomes the ``challenger`` alias. Ignored unless the asset is idle or
        waiting for data to retrain.
        """
        with self._lock:
            loop = self.state.assets.get(asset)
            if loop is None:
                raise ValueError(f"asset {asset!r} is not configured")
            if loop.phase in ("idle", "waiting_data") and loop.champion is not None:
                version = self.registry.resolve(asset, version)
                self.registry.set_alias(asset, "challenger", version)
                self._start_shadow(loop, version, origin)
                self._save()
            return loop.to_dict()

    def status(self) -> dict[str, Any]:
        """Per-asset phase, candidate, pairs, last decision; errors (JSON-ready)."""
        with self._lock:
            return {"assets": {a: lp.to_dict() for a, lp in self.state.assets.items()},
                    "events": self.state.seq,
                    "steps": self._steps, "restored": self.restored,
                    "last_error": self.last_error, "pid": os.getpid(),
                    "job_server": self._jobs is not None if self._jobs_checked else None,
                    "event_writer": self.sink.stats()}



def get_or_create_controller(settings: Settings, redis_url: str, timeout_s: float = 60.0) -> Any:
    """The controller with this configuration (created if needed, detached)."""
    return get_or_create(Controller, CONTROLLER_NAME, settings, redis_url, (settings, redis_url),
                         timeout_s=timeout_s)


def kill_controller() -> bool:
    """Stop and remove the controller."""
    return kill_named(CONTROLLER_NAME)
