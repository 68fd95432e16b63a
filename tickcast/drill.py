"""Closed-loop drills: the whole loop, end to end, on a scripted market.

``tickcast drill --scenario regime-shift|worse-challenger|bad-promotion --data-dir DIR``

Every drill runs the real parts, on this machine: an embedded Redis of its own (under ``DIR``),
Ray (the cluster of ``connect_ray``, else a private instance), the asset's market shard fed
through its Redis Stream, the bar store, a champion trained by the real pipeline (Ray Tune, XGBoost,
conformal calibration, ONNX, registry), the Serve app on a free port, the shard's drift and
safety and the controller. The script:

1. **Calm history**: two days of real BTC/USD minutes of the shared multi-venue file (all
   venues, expanded into ticks) go through the market shard; the champion is trained on them.
2. **Live replay**: the following minutes are fed one bar at a time; after each bar closes the
   drill asks the HTTP endpoint for a forecast (``POST /v1/predict``, online features), so the
   prediction stream holds one forecast per bar (two in shadow mode) for the loop to pair with
   realized returns. Event time runs ~10-20 bars per second.
3. **The scenario** (what happens after ``warmup_bars`` live bars):

   * ``regime-shift`` -- from there on the market changes regime, made in code: every one-minute
     log return ``r`` becomes ``r' = shift_vol * r + shift_momentum * r'_prev`` (volatility
     about 3x and strong momentum). Every venue's prices of a minute go through the same
     monotone map, so bars stay consistent. Drift must go CRITICAL, the controller retrains on
     the most recent bars, shadows the challenger and decides with a Diebold-Mariano test.
   * ``worse-challenger`` -- a deliberately worse model is registered as challenger: the same
     training pipeline run on a copy of the calm history with a phantom trend of
     ``bad_trend_bp`` bp added to every one-minute return, so it forecasts a steady rally that
     is not there (biased median, shifted interval). It is shadow-tested; it must not be
     promoted.
   * ``bad-promotion`` -- that same bad model is forced to champion, as an operator would do it
     (``TrafficControl.promote``, what ``POST /v1/admin/promote`` runs). The controller notices
     the external promotion, watches the new champion against the previous one and must roll
     it back.

The drill ends when the scenario's outcome is known (or after ``max_live_bars``) and prints,
as the last line, JSON with ``alert_at``, ``candidate``, ``decision``, ``dm_stat``, ``dm_p``,
``rolled_back``, ``seconds`` and the evidence. Progress goes to stderr.

Small budgets make it fit in a few minutes on two cores: :data:`DRILL_PROFILE` (Tune trials,
drift windows, evaluation sizes), applied under any ``--set`` of the user. ``DIR`` must be empty,
absent, or a previous drill's directory (which is wiped): the drill never touches other data.
Its events stay readable afterwards with ``tickcast events --data-dir DIR``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from tickcast.config import Settings, load_settings
from tickcast.errors import InvalidInput, ServiceUnavailable
from tickcast.net import free_port
from tickcast.ticks import NS_PER_MIN, NS_PER_S

SCENARIOS: tuple[str, ...] = ("regime-shift", "worse-challenger", "bad-promotion")
MARKER = ".tickcast-drill"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / \
    "btc_multivenue_1min_2023-03-01_09.csv.gz"

# Config of a drill (applied before the user's --set): budgets and windows small enough for a
# few minutes on two cores, still large enough for the statistics (see the module docstring).
DRILL_PROFILE: tuple[str, ...] = (
    "tune.trials=2", "tune.max_rounds=60", "tune.grace_rounds=20", "tune.report_every=10",
    "model.walk_forward_folds=2", "model.purge_bars=10",
    "drift.window=240", "drift.min_window=120", "drift.eval_every=10", "drift.detector_warmup=60",
    "drift.performance_window=120", "drift.performance_min_labels=60",
    "drift.alarm_hold_events=60",
    # The drill's 240-bar window is twice as noisy as the default 500: its calm morning touches
    # the SLA's 0.2 now and then, so the drill retrains on CRITICAL (0.3), as its script says.
    "drift.retrain_score=0.3",
    "controller.min_paired=150", "controller.watch_labels=60",
    "controller.retrain_min_new_bars=240", "controller.retrain_window_bars=480",
    "controller.retrain_cooldown_s=0", "controller.poll_s=0.2", "controller.monitor_poll_s=0.2",
    "serve.feature_refresh_s=0.02", "serve.registry_poll_s=0.5",
    "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
    # Replayed bars carry their 2023 timestamps: served features are "old" by wall clock.
    "serve.feature_max_age_s=10000000000",
)


@dataclass(frozen=True)
class DrillScript:
    """The scripted market and the scenario constants (documented in the module docstring)."""

    asset: str = "BTC-USD"
    history_start: str = "2023-03-05T00:00:00Z"  # live replay from Mar 7: a calm morning
    history_bars: int = 2880
    warmup_bars: int = 120
    shift_vol: float = 2.0
    shift_momentum: float = 0.8
    bad_trend_bp: float = 3.0
    max_live_bars: int = 1200
    predict_timeout_s: float = 5.0
    progress_s: float = 3.0

    def __post_init__(self) -> None:
        if self.history_bars < 600 or self.warmup_bars < 10 or self.max_live_bars <= self.warmup_bars:
            raise InvalidInput("history_bars >= 600, warmup_bars >= 10 and max_live_bars > "
                               "warmup_bars are required", field="script")
        if not (self.shift_vol > 0 and 0 <= self.shift_momentum < 1):
            raise InvalidInput("shift_vol must be > 0 and shift_momentum in [0, 1)", field="script")


def drill_settings(config: str | None = None, overrides: list[str] | None = None) -> Settings:
    """Settings of a drill: the config file, :data:`DRILL_PROFILE`, then ``overrides``."""
    return load_settings(config, overrides=list(DRILL_PROFILE) + list(overrides or []))


# ------------------------------------------------------------------------------------------
# the scripted market (pure)
# ------------------------------------------------------------------------------------------
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "vwap")


def shift_prices(bars: pd.DataFrame, start_ts: int, vol: float = 1.0, momentum: float = 0.0,
                 trend_bp: float = 0.0) -> pd.DataFrame:
    """Change the market's regime from minute ``start_ts`` on, consistently across venues.

    The minute's reference price is the median close over the rows of that minute (the venues;
    one row for consensus bars) and ``r_t`` its log return. From ``start_ts`` on the new returns
    are ``r'_t = vol * r_t + momentum * r'_{t-1} + trend_bp * 1e-4``; every price ``p`` of minute
    ``t`` (open, high, low, close, vwap, every venue) becomes ``exp(c_t + vol * log p)`` with
    ``c_t`` chosen so the reference follows ``r'``. The map is increasing, so each bar's low <=
    open, close <= high still holds; volumes are unchanged.

    Examples
    --------
    >>> b = pd.DataFrame({"ts": [0, 60, 120, 180], "close": [100.0, 101.0, 100.0, 102.0]})
    >>> out = shift_prices(b, 120, vol=2.0)
    >>> np.round(np.diff(np.log(out["close"])) / np.diff(np.log(b["close"])), 6).tolist()
    [1.0, 2.0, 2.0]
    >>> out = shift_prices(b, 60, trend_bp=10.0)
    >>> round(float(np.log(out["close"].iloc[-1] / b["close"].iloc[-1])), 6)
    0.003
    """
    if "ts" not in bars.columns or "close" not in bars.columns:
        raise InvalidInput("bars need ts and close columns", field="bars")
    out = bars.copy()
    ref = out.groupby("ts")["close"].median().sort_index()
    minutes = ref.index.to_numpy(np.int64)
    lref = np.log(ref.to_numpy(np.float64))
    s = int(np.searchsorted(minutes, start_ts))
    n = len(minutes)
    c = np.zeros(n)
    k = np.ones(n)
    if 0 < s < n:
        r = np.diff(lref, prepend=lref[0])
        rn = r.copy()
        mu = trend_bp * 1e-4
        for t in range(s, n):
            rn[t] = vol * r[t] + momentum * rn[t - 1] + mu
        refn = lref.copy()
        refn[s:] = lref[s - 1] + np.cumsum(rn[s:])
        c[s:] = refn[s - 1:-1] - vol * lref[s - 1:-1] + momentum * rn[s - 1:-1] + mu
        k[s:] = vol
    elif s == 0 and n:
        raise InvalidInput("start_ts must leave at least one minute before the shift", field="start_ts")
    idx = np.searchsorted(minutes, out["ts"].to_numpy(np.int64))
    for col in PRICE_COLUMNS:
        if col in out.columns:
            out[col] = np.exp(c[idx] + k[idx] * np.log(out[col].to_numpy(np.float64)))
    return out


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return pd.Timestamp(int(ns), unit="ns", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def prepare_dir(data_dir: Path) -> Path:
    """Make ``data_dir`` a fresh drill directory (refusing one that holds other data).

    Raises
    ------
    InvalidInput
        ``data_dir`` is not empty and is not a previous drill's directory.
    """
    d = Path(data_dir).resolve()
    if d.exists():
        if not d.is_dir():
            raise InvalidInput(f"--data-dir {d} is not a directory", field="data_dir")
        entries = [p for p in d.iterdir()]
        if entries and not (d / MARKER).exists():
            raise InvalidInput(f"--data-dir {d} holds data that is not a drill's; use an empty or "
                               f"new directory", field="data_dir")
        for p in entries:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text("tickcast drill workspace: wiped by the next drill\n")
    return d


class _Progress:
    def __init__(self, out: TextIO | None, t0: float) -> None:
        self.out = out
        self.t0 = t0

    def __call__(self, msg: str) -> None:
        if self.out is not None:
            print(f"[drill {time.monotonic() - self.t0:6.1f}s] {msg}", file=self.out, flush=True)


class DrillRun:
    """One drill (use :func:`run_drill`)."""

    def __init__(self, settings: Settings, scenario: str, data_dir: Path, script: DrillScript,
                 progress: TextIO | None, data_file: Path) -> None:
        if scenario not in SCENARIOS:
            raise InvalidInput(f"unknown scenario {scenario!r} (use one of {', '.join(SCENARIOS)})",
                               field="scenario")
        if not data_file.exists():
            raise InvalidInput(f"market data file {data_file} not found", field="data_file")
        self.t0 = time.monotonic()
        self.log = _Progress(progress, self.t0)
        self.scenario = scenario
        self.script = script
        self.asset = script.asset
        self.data_file = data_file
        self.data_dir = prepare_dir(data_dir)
        self.base_settings = settings
        self.freq_ns = settings.bars.freq_s * NS_PER_S
        if self.freq_ns != NS_PER_MIN:
            raise InvalidInput("drills replay one-minute bars: bars.freq_s must be 60", field="bars.freq_s")
        self.redis: Any = None
        self.conn: Any = None
        self.serving = False
        self.out: dict[str, Any] = {"scenario": scenario, "asset": self.asset,
                                    "data_dir": str(self.data_dir)}

    # -------------------------------------------------------------- setup
    def _market(self) -> tuple[pd.DataFrame, int, int]:
        """Venue bars of the script (regime change applied), first live minute, shift minute."""
        from tickcast.sources.replay import read_bar_file

        s = self.script
        start = int(pd.Timestamp(s.history_start).value)
        live0 = start + s.history_bars * self.freq_ns
        end = live0 + (s.max_live_bars + 2) * self.freq_ns
        bars = read_bar_file(self.data_file, (self.asset,)).bars
        bars = bars[(bars["asset"] == self.asset) & (bars["ts"] >= start) & (bars["ts"] < end)]
        if bars["ts"].nunique() < s.history_bars + s.max_live_bars // 2:
            raise InvalidInput(f"{self.data_file} has too few {self.asset} minutes after "
                               f"{s.history_start}", field="history_start")
        shift_at = live0 + s.warmup_bars * self.freq_ns
        if self.scenario == "regime-shift":
            bars = shift_prices(bars, shift_at, s.shift_vol, s.shift_momentum)
        return bars.reset_index(drop=True), live0, shift_at

    def setup(self) -> None:
        """Redis, settings, Ray, market, history through the actor, the loop's actors."""
        from actors.feeder import StreamFeeder
        from actors.market_shard import get_or_create_shards
        from tickcast.ray_runtime import connect_ray
        from tickcast.redis_server import EmbeddedRedis, connect
        from tickcast.sources.replay import expand_bars_to_ticks

        self.redis = EmbeddedRedis.start(self.data_dir)
        self.settings = self.base_settings.with_overrides(**{
            "data_dir": str(self.data_dir), "redis.url": self.redis.url,
            "serve.port": free_port(), "assets": [self.asset]})
        self.client = connect(self.redis.url, self.settings.redis.socket_timeout_s)
        self.conn = connect_ray(self.settings)
        bars, self.live0, self.shift_at = self._market()
        ticks = expand_bars_to_ticks(bars, self.asset)
        self.ticks = ticks
        self.tick_minute = ticks.ts_event // self.freq_ns * self.freq_ns
        # The asset's market shard, with its drift and safety (they follow the champion once
        # it is registered; safety's volatility windows fill from the history as it is fed).
        self.shards = get_or_create_shards(self.settings, self.redis.url, (self.asset,),
                                           closed_loop=True)
        self.actor = self.shards.ref(self.asset)
        self.feeder = StreamFeeder(self.client, self.settings, self.data_dir / "wal" / "feeder.wal",
                                   (self.asset,))
        hist = np.flatnonzero(self.tick_minute < self.live0)
        step = self.settings.ingest.batch_max_ticks
        for i in range(0, len(hist), step):
            self.feeder.add(ticks.take(hist[i:i + step]))
        self.feeder.flush()
        import ray

        st = ray.get(self.actor.wait_until.remote(self.feeder.last_ids[self.asset],
                                                  self.settings.ingest.wait_timeout_s))
        # Online features catch up after a bulk feed (the actor stores bars first).
        ray.get(self.actor.wait_settled.remote(self.settings.ingest.wait_timeout_s))
        self.log(f"history: {len(hist):,} ticks of {self.script.history_bars} minutes "
                 f"({_iso(self.live0 - self.script.history_bars * self.freq_ns)} ..) -> "
                 f"{st['counts']['bars']} consensus bars")
        from actors.loop_support import stream_tail_id

        self.events_from = stream_tail_id(self.client, self.settings.controller.events_stream)
        self.start_loop()

    def _train(self, settings: Settings, end_ns: int, what: str) -> dict[str, Any]:
        from training.pipeline import train_model

        t = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):  # Tune's tables: stdout ends with our JSON
            res = train_model(settings, self.asset, None, end_ns, seed=0,
                              log=lambda m: self.log(f"  {what}: {m}"))
        self.log(f"{what}: {res['version']} ({res['alias']}) in {time.monotonic() - t:.1f} s, "
                 f"validation pinball {res['validation']['pinball']:.3g}")
        return res

    def train_models(self) -> None:
        """The champion on the calm history; for the bad scenarios, the deliberately bad model."""
        from tickcast.storage.bar_store import BarStore

        self.champion = self._train(self.settings, self.live0, "champion")["version"]
        self.out["champion"] = self.champion
        if self.scenario == "regime-shift":
            return
        # The bad model: same pipeline, on the calm history with a phantom trend added.
        scratch = self.data_dir / "bad-model"
        hist = BarStore(self.data_dir / "bars", fsync=False).read(self.asset, end_ns=self.live0)
        bent = shift_prices(hist, int(hist["ts"].iloc[1]), trend_bp=self.script.bad_trend_bp)
        BarStore(scratch / "bars", fsync=False).upsert(self.asset, "consensus", bent)
        bad_settings = self.settings.with_overrides(**{
            "data_dir": str(scratch), "model.registry_dir": str(scratch / "registry")})
        res = self._train(bad_settings, self.live0, "bad model")
        self.bad_dir = Path(res["registry"]) / self.asset / res["version"]
        self.out["how_made_worse"] = (
            f"trained by the same pipeline on a copy of the calm history with a phantom trend of "
            f"+{self.script.bad_trend_bp:g} bp added to every one-minute log return: it forecasts "
            f"a rally that is not there (median biased up, interval shifted)")

    def start_serving(self) -> None:
        """The Serve app on a free port; waits for the champion to answer."""
        import httpx

        from serve_app.app import start_serving

        t = time.monotonic()
        self.serve_was_up = self._serve_running()
        start_serving(self.settings, self.redis.url)
        self.serving = True
        self.url = self._serve_url()
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        deadline = time.monotonic() + self.settings.serve.ready_timeout_s
        while True:
            try:
                r = self.http.post("/v1/predict", json={"asset": self.asset})
                if r.status_code == 200 and r.json().get("model_version") == self.champion:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the serving app at {self.url} did not serve "
                                         f"{self.asset} within {self.settings.serve.ready_timeout_s:.0f} s")
            time.sleep(0.2)
        self.log(f"serving at {self.url} in {time.monotonic() - t:.1f} s")

    @staticmethod
    def _serve_running() -> bool:
        """Whether Serve already runs on this Ray (another app's: left running at the end)."""
        try:
            from ray.serve.context import _get_global_client

            return _get_global_client(raise_if_no_controller_running=False) is not None
        except Exception:  # noqa: BLE001 - private API moved: assume it runs (never shut down)
            return True

    def _serve_url(self) -> str:
        """Where Serve listens (an already running Serve keeps its own HTTP options)."""
        try:
            from ray.serve.context import _get_global_client

            cfg = _get_global_client().http_config
            host = "127.0.0.1" if cfg.host in ("0.0.0.0", "", None) else cfg.host
            return f"http://{host}:{cfg.port}"
        except Exception:  # noqa: BLE001 - private API moved: the configured address
            return f"http://{self.settings.serve.host}:{self.settings.serve.port}"

    def start_loop(self) -> None:
        """The controller; drift and safety already run in the asset's market shard.

        They start before the champion exists: the drift watch builds its monitor and the
        controller adopts the champion as soon as it is registered.
        """
        import ray

        from actors.controller import get_or_create_controller

        self.controller = get_or_create_controller(self.settings, self.redis.url)
        self.drift = self.shards.ref(self.asset, "drift")
        self.safety = self.shards.ref(self.asset, "safety")
        ray.get(self.controller.fingerprint.remote())
        self.log("controller up; drift and safety in the asset's market shard")

    # -------------------------------------------------------------- the live replay
    def _predict(self, bar_ts: int) -> dict[str, Any] | None:
        """Ask the endpoint until it answers from the features of ``bar_ts`` (or times out)."""
        import httpx

        deadline = time.monotonic() + self.script.predict_timeout_s
        time.sleep(self.settings.serve.feature_refresh_s / 2)  # the replica's cache refresh
        while True:
            try:
                r = self.http.post("/v1/predict", json={"asset": self.asset})
                if r.status_code == 200:
                    body = r.json()
                    if int(body.get("bar_ts") or -1) >= bar_ts:
                        return body
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def _events(self) -> list[dict[str, Any]]:
        from tickcast.monitoring.events import EventLog

        c = self.settings.controller
        return EventLog(self.client, c.events_stream, c.events_maxlen).read(
            asset=self.asset, after=self.events_from)

    def _scenario_action(self, i: int) -> None:
        """The operator's move at live bar ``warmup_bars`` (bad scenarios)."""
        if i != self.script.warmup_bars or self.scenario == "regime-shift":
            return
        from serve_app.control import RoutingStore, TrafficControl
        from training.registry import ModelRegistry, registry_root
        from tickcast.monitoring.events import EventLog, make_event

        reg = ModelRegistry(registry_root(self.settings))
        card = json.loads((self.bad_dir / "card.json").read_text())
        for key in ("version", "created", "asset"):
            card.pop(key, None)
        card["note"] = self.out["how_made_worse"]
        extras = {p.name: p.read_bytes() for p in self.bad_dir.iterdir()
                  if p.is_file() and p.name not in ("model.onnx", "card.json", "reference.parquet")}
        alias = "challenger" if self.scenario == "worse-challenger" else None
        version = reg.register(self.asset, (self.bad_dir / "model.onnx").read_bytes(), card,
                               pd.read_parquet(self.bad_dir / "reference.parquet"), alias=alias,
                               extra_files=extras)
        self.out["candidate"] = version
        c = self.settings.controller
        log = EventLog(self.client, c.events_stream, c.events_maxlen)
        if self.scenario == "worse-challenger":
            log.append([make_event("drill", self.asset, "challenger_registered", version=version,
                                   how_made_worse=self.out["how_made_worse"])])
            self.log(f"registered the worse model {version} as challenger")
        else:
            control = TrafficControl(RoutingStore(self.client, self.settings.serve.redis_prefix), reg)
            table, _ = control.promote(self.asset, version)
            route = table.get(self.asset)
            log.append([make_event("drill", self.asset, "forced_promotion", version=version,
                                   previous=self.champion, how_made_worse=self.out["how_made_worse"],
                                   route=None if route is None else route.to_dict())])
            self.log(f"forced the bad model {version} to champion (operator promotion)")

    def _done(self, events: list[dict[str, Any]]) -> bool:
        kinds = {e.get("type") for e in events}
        if self.scenario == "regime-shift":
            return "rejected" in kinds or bool(kinds & {"rolled_back", "watch_passed"})
        if self.scenario == "worse-challenger":
            return bool(kinds & {"promoted", "rejected"})
        return bool(kinds & {"rolled_back", "watch_passed"})

    def live(self) -> None:
        """Feed bars one at a time, forecast each through HTTP, until the outcome is known."""
        import ray

        s = self.script
        minutes = np.unique(self.tick_minute[self.tick_minute >= self.live0])
        starts = np.searchsorted(self.tick_minute, minutes)
        ends = np.append(starts[1:], len(self.tick_minute))
        predictions = stale = 0
        feed_s = predict_s = 0.0
        t_live = time.monotonic()
        next_log = time.monotonic()
        events: list[dict[str, Any]] = []
        self.live_bars = 0
        for i in range(min(len(minutes) - 1, s.max_live_bars + 1)):
            self._scenario_action(i)
            t_feed = time.perf_counter()
            eid = self.feeder.add(self.ticks.take(np.arange(starts[i], ends[i])))
            self.feeder.flush()
            ray.get(self.actor.wait_until.remote(eid, self.settings.ingest.wait_timeout_s))
            t_pred = time.perf_counter()
            feed_s += t_pred - t_feed
            if i == 0:
                continue  # the first live minute closes the last history bar
            self.live_bars = i
            body = self._predict(int(minutes[i - 1]))
            predict_s += time.perf_counter() - t_pred
            if body is None:
                stale += 1
            else:
                predictions += 1
                self.last_prediction = body
            if i % 10 == 0:
                events = self._events()
                if self._done(events):
                    break
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + s.progress_s
                self._progress_line(i, minutes[i - 1])
        self.out["live_bars"] = self.live_bars
        self.out["predictions"] = predictions
        self.out["predictions_missed"] = stale
        n = max(1, self.live_bars)
        self.out["live_seconds"] = round(time.monotonic() - t_live, 1)
        self.out["ms_per_bar"] = {"feed_to_bar_closed": round(1e3 * feed_s / n, 1),
                                  "forecast_via_http": round(1e3 * predict_s / n, 1)}
        self._settle(events)

    def _progress_line(self, i: int, bar_ts: int) -> None:
        import ray

        try:
            d, sf, c = ray.get([self.drift.status.remote(), self.safety.status.remote(),
                                self.controller.status.remote()], timeout=10)
        except Exception as exc:  # noqa: BLE001 - progress only
            self.log(f"bar {i}: status unavailable ({exc})")
            return
        loop = c["assets"].get(self.asset, {})
        where = ""
        if self.scenario == "regime-shift":
            k = (int(bar_ts) - self.shift_at) // self.freq_ns
            where = f" ({'+' if k >= 0 else ''}{k} vs shift)"
        phase = loop.get("phase")
        extra = ""
        if phase in ("shadow", "watch"):
            extra = f" {loop.get('paired')} paired"
        self.log(f"bar {i}{where} {_iso(int(bar_ts))} | drift {d.get('level')} "
                 f"{d.get('score', 0.0):.2f} | safety {sf.get('regime')} x{sf.get('multiplier', 1.0):.2f}"
                 f" | controller {phase}{extra}")

    def _settle(self, events: list[dict[str, Any]]) -> None:
        """Wait briefly for the last decision's event if the replay ended just before it."""
        deadline = time.monotonic() + 5.0
        while not self._done(events) and time.monotonic() < deadline:
            time.sleep(0.5)
            events = self._events()
        self.events = self._events()

    # -------------------------------------------------------------- outcome
    def result(self) -> dict[str, Any]:
        """The drill's JSON summary (the last line printed)."""
        ev = self.events
        first = {}
        for e in ev:
            first.setdefault(e.get("type"), e)
        out = self.out
        out["alert_at"] = None
        alert = first.get("drift_alert")
        if alert is None:  # the level change that raised it carries the same moment
            alert = next((e for e in ev if e.get("type") == "drift_level"
                          and e.get("to") == "CRITICAL"), None)
        if alert is not None:
            bar_ts = alert.get("bar_ts")
            out["alert_at"] = _iso(bar_ts) if isinstance(bar_ts, int) and bar_ts >= 0 else None
            out["alert_score"] = alert.get("score")
            if isinstance(bar_ts, int) and self.scenario == "regime-shift":
                out["alert_bars_after_shift"] = (bar_ts - self.shift_at) // self.freq_ns
        if self.scenario == "regime-shift":
            out["shift"] = {"at": _iso(self.shift_at), "vol": self.script.shift_vol,
                            "momentum": self.script.shift_momentum,
                            "returns": "r' = vol * r + momentum * r'_prev"}
        sub = first.get("retrain_submitted")
        fin = first.get("retrain_finished")
        out["retrain_runner"] = sub.get("runner") if sub else None
        out["retrain_seconds"] = fin.get("seconds") if fin else None
        if fin and not out.get("candidate"):
            out["candidate"] = fin.get("version")
        shadow = first.get("shadow_started")
        if shadow and not out.get("candidate"):
            out["candidate"] = shadow.get("challenger")
        decision = first.get("promoted") or first.get("rejected")
        if decision is not None and decision.get("candidate"):
            if out.get("candidate") and out["candidate"] != decision["candidate"]:
                out["injected"] = out["candidate"]  # the decision was about another model
            out["candidate"] = decision["candidate"]
        out["decision"] = None
        out["dm_stat"] = out["dm_p"] = None
        if self.scenario == "bad-promotion":
            out["decision"] = "promoted" if first.get("forced_promotion") else None
            out["decided_by"] = "operator (forced by the drill)"
        elif decision is not None:
            out["decision"] = decision["type"]
            out["decided_by"] = "controller"
            out["reason"] = decision.get("reason")
            out["dm_stat"] = decision.get("dm_stat")
            out["dm_p"] = decision.get("p_candidate_better")
            out["dm_p_two_sided"] = decision.get("dm_p")
            for k in ("n", "loss_candidate", "loss_incumbent", "sharpe_candidate",
                      "sharpe_incumbent", "coverage_candidate", "coverage_incumbent"):
                out[k] = decision.get(k)
        watch = first.get("rolled_back") or first.get("watch_passed")
        out["rolled_back"] = bool(first.get("rolled_back"))
        if watch is not None:
            out["watch"] = {k: watch.get(k) for k in (
                "type", "reason", "n", "dm_stat", "dm_p", "p_candidate_worse", "loss_candidate",
                "loss_incumbent", "sla") if k in watch}
            if self.scenario == "bad-promotion":
                out["dm_stat"] = watch.get("dm_stat")
                out["dm_p"] = watch.get("p_candidate_worse")
                out["dm_p_two_sided"] = watch.get("dm_p")
                out["reason"] = watch.get("reason")
        regimes = [e for e in ev if e.get("type") == "regime"]
        out["regimes"] = [f"{e.get('from')}->{e.get('to')}" for e in regimes]
        out["last_regime"] = (getattr(self, "last_prediction", None) or {}).get("regime")
        counts: dict[str, int] = {}
        for e in ev:
            counts[str(e.get("type"))] = counts.get(str(e.get("type")), 0) + 1
        out["events"] = counts
        alert_after = out.get("alert_bars_after_shift")
        expected = {"regime-shift": alert_after is not None and alert_after >= 0
                    and out["decision"] in ("promoted", "rejected") and out["dm_stat"] is not None,
                    "worse-challenger": out["decision"] == "rejected",
                    "bad-promotion": out["rolled_back"]}
        out["ok"] = bool(expected[self.scenario])
        out["seconds"] = round(time.monotonic() - self.t0, 1)
        return out

    def cleanup(self) -> None:
        """Stop what the drill started (actors, app, Redis, a private Ray)."""
        from actors.controller import kill_controller
        from actors.market_shard import kill_shards
        from tickcast.ray_runtime import disconnect_ray

        if self.conn is not None:
            for fn in (kill_controller, kill_shards):
                with contextlib.suppress(Exception):
                    fn()
            if self.serving:
                from ray import serve

                from serve_app.app import stop_serving

                with contextlib.suppress(Exception):
                    stop_serving()
                    if not self.serve_was_up:  # Serve was ours: its proxies go too
                        serve.shutdown()
            with contextlib.suppress(Exception):
                self.http.close()
            disconnect_ray(self.conn)
        if self.redis is not None:
            self.redis.stop()


def run_drill(settings: Settings, scenario: str, data_dir: str | Path, *,
              script: DrillScript | None = None, progress: TextIO | None = sys.stderr,
              data_file: str | Path | None = None) -> dict[str, Any]:
    """Run one drill end to end; returns the summary (see the module docstring).

    Parameters
    ----------
    settings
        Configuration (build it with :func:`drill_settings` for the drill's small budgets).
        ``data_dir`` and the Redis URL are replaced by the drill's own.
    scenario
        One of :data:`SCENARIOS`.
    data_dir
        Workspace: empty, absent, or a previous drill's (wiped).
    script
        Market and scenario constants (default :class:`DrillScript`).
    progress
        Stream of progress lines (None: silent).
    data_file
        The multi-venue bar file (default: the shared BTC file).

    Raises
    ------
    InvalidInput
        Unknown scenario, a data dir holding other data, a missing data file.
    ServiceUnavailable
        The serving app did not come up.
    """
    run = DrillRun(settings, scenario, Path(data_dir), script or DrillScript(), progress,
                   Path(data_file) if data_file is not None else SHARED_DATA)
    try:
        run.setup()
        run.train_models()
        run.start_serving()
        run.live()
        result = run.result()
    finally:
        run.cleanup()
    result["seconds"] = round(time.monotonic() - run.t0, 1)
    result["script"] = asdict(run.script)
    return result


__all__ = ["DRILL_PROFILE", "DrillScript", "SCENARIOS", "drill_settings", "run_drill",
           "shift_prices", "prepare_dir"]
