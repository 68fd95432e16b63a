"""What feeds the serving app's online features when ``tickcast serve`` runs.

The market shards (:mod:`actors.market_shard`) consume ``ticks:<ASSET>`` and publish a feature
row at every consensus bar close; serving reads those rows from Redis. ``serve.feed`` chooses
what ``tickcast serve`` starts:

``streams``
    the shards only: ticks come from feed handlers writing the ingress streams.
``simulator``
    the shards plus :class:`LiveSimulatorFeed`, the market simulator run at wall-clock time (a
    demo feed). It continues each asset from its last stored close, first back-filling
    ``serve.feed_backfill_minutes`` (so features have their history and the first fresh row
    arrives within seconds), then keeps pace with the clock.
``none``
    nothing: features are published by something else.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from tickcast.config import Settings
from tickcast.ticks import NS_PER_MIN, NS_PER_S

log = logging.getLogger(__name__)


class LiveSimulatorFeed:
    """The market simulator at wall-clock time, writing tick batches to the ingress streams.

    Parameters
    ----------
    settings
        ``simulator``, ``consensus``, ``bars``, ``ingest`` and ``serve.feed_*`` sections.
    redis_url
        Where the streams live.
    assets
        Assets to simulate.
    """

    def __init__(self, settings: Settings, redis_url: str, assets: tuple[str, ...]) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.assets = tuple(assets)
        self.batches = 0
        self.ticks = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start_prices(self) -> tuple[dict[str, float], int]:
        """Last stored close per asset (else the configured start price) and the last bar ts."""
        from tickcast.storage.bar_store import BarStore

        store = BarStore(Path(self.settings.data_dir) / "bars", fsync=False)
        prices = dict(self.settings.simulator.start_prices)
        last_ts = 0
        for asset in self.assets:
            try:
                ts = store.last_ts(asset)
            except Exception:  # noqa: BLE001 - unreadable history: start from the config price
                ts = None
            if ts is None:
                continue
            bars = store.read(asset, start_ns=ts, end_ns=ts + 1)
            if not bars.empty and math.isfinite(float(bars["close"].iloc[-1])):
                prices[asset] = float(bars["close"].iloc[-1])
                last_ts = max(last_ts, int(ts))
        missing = [a for a in self.assets if a not in prices]
        for asset in missing:
            # An asset without history or configured price starts at a round level.
            prices[asset] = 100.0
        return prices, last_ts

    def _build(self) -> Any:
        from tickcast.market.calendar import trading_calendar
        from tickcast.sources.simulator import MarketSimulator

        prices, last_ts = self._start_prices()
        settings = self.settings.with_overrides(**{"simulator.start_prices": prices})
        freq = settings.bars.freq_s * NS_PER_S
        now = time.time_ns()
        start = now - int(settings.serve.feed_backfill_minutes * NS_PER_MIN)
        start = max(start, last_ts + freq)  # never write ticks into stored (finalized) history
        start = min(start, now)
        start -= start % freq
        # Tick numbers start at the wall clock in microseconds: a restarted feed (`tickcast down`
        # then `serve` on the same data dir) never reuses one, which the actors' duplicate
        # filter would otherwise drop for hours. A provider sends far fewer than 10^6 ticks/s.
        return MarketSimulator(settings.simulator, self.assets, settings.serve.feed_seed,
                               consensus=settings.consensus, bars=settings.bars, start_ns=start,
                               first_seq=now // 1000,
                               calendars={a: trading_calendar(settings, a) for a in self.assets})

    def _run(self) -> None:
        from actors.feeder import StreamFeeder
        from tickcast.redis_server import connect

        try:
            sim = self._build()
            client = connect(self.redis_url, timeout_s=self.settings.redis.socket_timeout_s)
            wal = Path(self.settings.data_dir) / "serve" / "feed.wal"
            feeder = StreamFeeder(client, self.settings, wal, self.assets)
            step_ns = int(self.settings.simulator.batch_s * NS_PER_S)
            while not self._stop.is_set():
                lag = time.time_ns() - sim.clock_ns
                if lag >= step_ns:
                    # Catch up in slices of at most 10 simulated minutes (back-fill), then one
                    # batch interval at a time.
                    minutes = min(lag, 10 * NS_PER_MIN) / NS_PER_MIN
                    for batch in sim.run(minutes, flush=False):
                        feeder.add(batch)
                        self.batches += 1
                        self.ticks += len(batch)
                    feeder.flush()
                    continue
                self._stop.wait((step_ns - lag) / NS_PER_S)
            feeder.drain(timeout_s=5.0)
        except Exception as exc:  # noqa: BLE001 - a demo feed must not take the server down
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("live simulator feed stopped")

    def start(self) -> None:
        """Start feeding in a background thread."""
        self._thread = threading.Thread(target=self._run, name="live-simulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop feeding (what was handed to the feeder is flushed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


class FeatureFeed:
    """Starts (and stops) what ``serve.feed`` asks for.

    Parameters
    ----------
    settings
        Whole configuration.
    redis_url
        Redis URL.
    """

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.mode = settings.serve.feed
        self.shards: Any = None  # actors.market_shard.ShardSet once started
        self.simulator: LiveSimulatorFeed | None = None
        self.start_s = 0.0

    def start(self) -> None:
        """Start the market shards (unless ``none``; with the closed loop when
        ``serve.closed_loop``) and the live simulator (``simulator``)."""
        if self.mode == "none":
            return
        from actors.market_shard import get_or_create_shards

        t0 = time.perf_counter()
        self.shards = get_or_create_shards(self.settings, self.redis_url,
                                           closed_loop=self.settings.serve.closed_loop)
        self.start_s = time.perf_counter() - t0
        if self.mode == "simulator":
            self.simulator = LiveSimulatorFeed(self.settings, self.redis_url, tuple(self.settings.assets))
            self.simulator.start()

    def stop(self) -> None:
        """Stop the simulator and the shards (each checkpoints its assets first)."""
        if self.simulator is not None:
            self.simulator.stop()
        if self.shards is not None:
            from actors.loop_support import kill_named

            for name in self.shards.handles:
                try:
                    kill_named(name)
                except Exception as exc:  # noqa: BLE001 - Ray already going down
                    log.info("shard %s not stopped: %s", name, exc)

    def status(self) -> dict[str, Any]:
        """What runs (for the command's output): the shard map included."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.shards is not None:
            out["shards"] = {name: sum(1 for o in self.shards.owners.values() if o == name)
                             for name in self.shards.handles}
            out["shards_start_s"] = round(self.start_s, 2)
        if self.simulator is not None:
            out.update({"simulated_batches": self.simulator.batches,
                        "simulated_ticks": self.simulator.ticks, "error": self.simulator.error})
        return out
