"""Model slots of a serving replica: loaded models, the immutable serving state, and hot swap.

A replica serves from one :class:`ServingState` at a time: the routing table it follows plus
every model that table names, loaded and warm. :class:`SlotManager` keeps it current from a
background thread:

1. every ``serve.feature_refresh_s`` it reads the routing revision from Redis (one ``HGET``);
2. on a new revision it loads the table, loads any model version it does not hold yet (the
   served engine, a warm-up run) — off the request path, while requests keep being served
   from the current state;
3. then it replaces the state with one reference assignment. A request reads the reference once
   and uses that state to the end, so a switch never mixes versions within a request, never
   drops one and never fails one;
4. every ``serve.registry_poll_s`` it reconciles the table with the registry's aliases
   (:meth:`serve_app.control.TrafficControl.reconcile`): a new challenger is loaded into the idle
   slot, a champion moved in the registry is followed.

Identical model files registered under several assets (a pooled model) share one predictor:
models are cached by the SHA-256 of their ONNX file, so a thousand assets cost one ONNX
session; a file already hashed (same device, inode, size and modification time: a hard link
of a pooled model) is not read again. The native XGBoost booster is not loaded with the model:
the compiled kernel (or onnxruntime) serves, and the booster is read on the first request for
an explanation (:class:`serve_app.explain.NativeExplainer`), or at load when no compiled
kernel can be built and large batches need it. A version that fails to load leaves that asset
on the route it had (reported in ``errors``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from serve_app.control import RoutingStore, TrafficControl
from serve_app.explain import NativeExplainer
from serve_app.periodic import PeriodicThread
from serve_app.routing import AssetRoute, RoutingTable
from tickcast.errors import RegistryError, TickcastError
from training.conformal import ConformalCalibrator
from training.engine import NATIVE_FILE, QuantilePredictor
from training.registry import CARD_FILE, MODEL_FILE, ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One registry version of one asset, ready to score.

    Attributes
    ----------
    predictor
        :class:`training.engine.QuantilePredictor`: the compiled tree kernel when it builds
        (every batch size), else ONNX for small batches and native XGBoost for large ones.
    feature_names
        Input columns, in order.
    schema_hash
        Feature schema hash the model was trained on (None when the card has none).
    calibrator
        Conformal state of the card (None: the raw [q05, q95] is served).
    sigma_index
        Column of the conformal volatility scale in the features (None when unscaled).
    coverage
        Nominal interval coverage, ``q_high - q_low`` (0.9).
    digest
        SHA-256 of the ONNX file (equal digests share one predictor and one explainer).
    explainer
        TreeSHAP of the version's native booster, loaded on first use.
    """

    asset: str
    version: str
    predictor: QuantilePredictor
    feature_names: tuple[str, ...]
    schema_hash: str | None
    calibrator: ConformalCalibrator | None
    sigma_index: int | None
    coverage: float
    digest: str
    calibration_key: str
    card: Mapping[str, Any] = field(repr=False)
    explainer: NativeExplainer | None = field(default=None, repr=False)

    def score(self, x: np.ndarray, sigma: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Median and calibrated interval for rows ``x`` (float32 ``[N, F]``).

        Returns
        -------
        (pred, lo, hi)
            float64 arrays of length N (log returns).
        """
        q = self.predictor.predict(x)
        q05 = q[:, 0].astype(np.float64)
        q50 = q[:, 1].astype(np.float64)
        q95 = q[:, 2].astype(np.float64)
        if self.calibrator is None:
            return q50, q05, q95
        if self.calibrator.scaled:
            s = sigma if sigma is not None else x[:, self.sigma_index].astype(np.float64)  # type: ignore[index]
            lo, hi = self.calibrator.interval(q05, q95, s)
        else:
            lo, hi = self.calibrator.interval(q05, q95)
        return q50, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


class ModelLoader:
    """Loads registry versions into :class:`LoadedModel`, sharing predictors by file digest.

    Parameters
    ----------
    registry
        Where versions live.
    native_min_rows, onnx_threads, native_threads
        Predictor engine settings (``model.native_min_rows``, ``serve.onnx_threads``,
        ``serve.native_threads``).
    """

    def __init__(self, registry: ModelRegistry, native_min_rows: int = 32, onnx_threads: int = 1,
                 native_threads: int = 1, compiled: bool = True, parity_tol: float = 1e-5) -> None:
        self.registry = registry
        self.native_min_rows = native_min_rows
        self.onnx_threads = onnx_threads
        self.native_threads = native_threads
        self.compiled = compiled
        self.parity_tol = parity_tol
        self._predictors: dict[str, QuantilePredictor] = {}
        self._calibrators: dict[str, ConformalCalibrator] = {}
        self._explainers: dict[str, NativeExplainer] = {}
        self._digests: dict[tuple[int, int, int, int], str] = {}  # file identity -> SHA-256

    def load(self, asset: str, version: str) -> LoadedModel:
        """Load ``version`` of ``asset`` and warm it up with one row.

        Raises
        ------
        RegistryError
            Missing/corrupt files or a card without usable ``feature_names``.
        NotFound
            Unknown version.
        """
        path = Path(self.registry.path(asset, version))
        card = self.registry.card(asset, version)
        names = card.get("feature_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise RegistryError(f"card of {asset}/{version} has no usable feature_names", field="card")
        model_path = path / MODEL_FILE
        native_path = path / NATIVE_FILE
        onnx_bytes: bytes | None = None
        try:
            st = os.stat(model_path)
        except OSError as exc:
            raise RegistryError(f"{asset}/{version}: cannot read {MODEL_FILE}: {exc}",
                                field=MODEL_FILE) from None
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = self._digests.get(identity)
        if digest is None or digest not in self._predictors:
            onnx_bytes = model_path.read_bytes()
            digest = hashlib.sha256(onnx_bytes).hexdigest()
            self._digests[identity] = digest
        predictor = self._predictors.get(digest)
        if predictor is None:
            assert onnx_bytes is not None
            predictor = self._predictor(onnx_bytes, native_path)
            if predictor.n_features not in (-1, len(names)):
                raise RegistryError(f"{asset}/{version}: model takes {predictor.n_features} features "
                                    f"but the card names {len(names)}", field=MODEL_FILE)
            # Warm the engines so the first real request pays no lazy initialization.
            predictor.predict(np.zeros((1, len(names)), dtype=np.float32))
            predictor.predict(np.zeros((max(predictor.native_min_rows, 1), len(names)),
                                       dtype=np.float32))
            self._predictors[digest] = predictor
        calibrator = None
        sigma_index = None
        conformal = card.get("conformal")
        calibration_key = "none"
        if isinstance(conformal, dict):
            # Equal conformal states share one calibrator, so a batch over many assets of a
            # pooled model widens all its rows in one vectorized call.
            calibration_key = hashlib.sha256(
                json.dumps(conformal, sort_keys=True, default=str).encode()).hexdigest()
            calibrator = self._calibrators.get(calibration_key)
            if calibrator is None:
                try:
                    calibrator = ConformalCalibrator.from_state(conformal)
                except TickcastError as exc:
                    raise RegistryError(f"{asset}/{version}: conformal state unusable: {exc.message}",
                                        field=CARD_FILE) from None
                self._calibrators[calibration_key] = calibrator
            if calibrator.scaled:
                if calibrator.sigma_feature not in names:
                    raise RegistryError(f"{asset}/{version}: conformal scale feature "
                                        f"'{calibrator.sigma_feature}' is not a model feature",
                                        field=CARD_FILE)
                sigma_index = names.index(calibrator.sigma_feature)
        quantiles = card.get("quantiles") or [0.05, 0.5, 0.95]
        coverage = float(quantiles[-1]) - float(quantiles[0])
        explainer = self._explainers.get(digest)
        if explainer is None:
            # The served median is output column 1 (LoadedModel.score): explain that one.
            median = f"q{float(quantiles[1]):g}" if len(quantiles) > 1 else "q0.5"
            explainer = self._explainers[digest] = NativeExplainer(
                native_path, names, target_index=1, target=median, threads=self.native_threads)
        return LoadedModel(asset=asset, version=version, predictor=predictor,
                           feature_names=tuple(names), schema_hash=card.get("schema_hash"),
                           calibrator=calibrator, sigma_index=sigma_index,
                           coverage=round(coverage, 6), digest=digest,
                           calibration_key=calibration_key, card=card, explainer=explainer)

    def _predictor(self, onnx_bytes: bytes, native_path: Path) -> QuantilePredictor:
        """The serving engine of a model. The native booster is passed only when the compiled
        kernel cannot be built, for the large batches it then serves (it costs memory and a
        load; with the kernel, every batch size is served without it)."""
        kwargs: dict[str, Any] = dict(native_min_rows=self.native_min_rows,
                                      onnx_threads=self.onnx_threads,
                                      native_threads=self.native_threads,
                                      compiled=self.compiled, parity_tol=self.parity_tol)
        predictor = QuantilePredictor(onnx_bytes, None, **kwargs)
        if not predictor.has_compiled and native_path.is_file():
            predictor = QuantilePredictor(onnx_bytes, native_path.read_bytes(), **kwargs)
        return predictor

    def forget_unused(self, models: Iterable[LoadedModel]) -> None:
        """Drop cached predictors and calibrators that no loaded model uses any more."""
        models = list(models)
        digests = {m.digest for m in models}
        keys = {m.calibration_key for m in models}
        for digest in [d for d in self._predictors if d not in digests]:
            del self._predictors[digest]
        for digest in [d for d in self._explainers if d not in digests]:
            del self._explainers[digest]
        for identity in [i for i, d in self._digests.items() if d not in digests]:
            del self._digests[identity]
        for key in [k for k in self._calibrators if k not in keys]:
            del self._calibrators[key]


@dataclass(frozen=True, eq=False)
class ServingState:
    """What a replica serves: a routing table and every model it names (immutable).

    Attributes
    ----------
    table
        The routing table (revision and per-asset routes actually served).
    models
        ``(asset, version) → LoadedModel`` for every version in ``table``.
    errors
        Asset → why its latest route could not be applied (it keeps its previous one).
    loaded_ns
        When this state was built (UNIX ns).
    """

    table: RoutingTable
    models: Mapping[tuple[str, str], LoadedModel]
    errors: Mapping[str, str]
    loaded_ns: int

    @property
    def rev(self) -> int:
        """Routing revision served."""
        return self.table.rev

    def model(self, asset: str, slot: str) -> LoadedModel | None:
        """Model serving ``slot`` of ``asset`` (None if the slot is empty)."""
        route = self.table.get(asset)
        if route is None:
            return None
        version = route.version(slot)
        return None if version is None else self.models.get((asset, version))


EMPTY_STATE = ServingState(table=RoutingTable(rev=-1, routes={}), models={}, errors={}, loaded_ns=0)


def build_state(table: RoutingTable, previous: ServingState, load: Callable[[str, str], LoadedModel]
                ) -> ServingState:
    """The serving state for ``table``, reusing ``previous``'s models and loading the rest.

    An asset whose new versions fail to load keeps its previous route and models (the failure
    is recorded in ``errors``); an asset that never loaded is left out until it does.
    """
    models: dict[tuple[str, str], LoadedModel] = {}
    errors: dict[str, str] = {}
    routes: dict[str, AssetRoute] = {}
    for asset, route in table.routes.items():
        loaded: dict[tuple[str, str], LoadedModel] = {}
        failure = None
        for version in route.versions:
            key = (asset, version)
            model = previous.models.get(key)
            if model is None:
                try:
                    model = load(asset, version)
                except (TickcastError, OSError, ValueError) as exc:
                    failure = f"cannot load {asset}/{version}: {getattr(exc, 'message', exc)}"
                    break
            loaded[key] = model
        if failure is None:
            routes[asset] = route
            models.update(loaded)
            continue
        errors[asset] = failure
        old = previous.table.get(asset)
        if old is not None:
            routes[asset] = old
            for version in old.versions:
                models[(asset, version)] = previous.models[(asset, version)]
    return ServingState(table=RoutingTable(rev=table.rev, routes=routes), models=models,
                        errors=errors, loaded_ns=time.time_ns())


class SlotManager:
    """Keeps a replica's :class:`ServingState` in step with Redis and the registry.

    Parameters
    ----------
    store
        The shared routing table.
    control
        Reconciles routes with registry aliases.
    loader
        Loads model versions.
    refresh_s
        How often the routing revision is polled.
    registry_poll_s
        How often aliases are reconciled.
    """

    def __init__(self, store: RoutingStore, control: TrafficControl, loader: ModelLoader,
                 refresh_s: float = 0.5, registry_poll_s: float = 2.0) -> None:
        self.store = store
        self.control = control
        self.loader = loader
        self.refresh_s = refresh_s
        self.registry_poll_s = registry_poll_s
        self._state: ServingState = EMPTY_STATE
        self._worker = PeriodicThread("slot-sync", refresh_s, self._step)
        self._lock = threading.Lock()  # one sync at a time (thread and admin calls)
        self.last_error = ""
        self._next_reconcile = 0.0
        self.syncs = 0

    @property
    def state(self) -> ServingState:
        """The state requests are served from (read once per request)."""
        return self._state

    def sync(self, force: bool = False) -> ServingState:
        """Apply the latest routing revision now (loads models first, then swaps)."""
        with self._lock:
            if not force and self.store.rev() == self._state.rev:
                return self._state
            table = self.store.load()
            if table.rev == self._state.rev and not force:
                return self._state
            new = build_state(table, self._state, self.loader.load)
            self.loader.forget_unused(new.models.values())
            self._state = new  # the swap: one reference assignment
            self.syncs += 1
            return new

    def reconcile(self, force: bool = False) -> None:
        """Follow registry aliases now (see :meth:`TrafficControl.reconcile`)."""
        self.control.reconcile(force=force)

    def start(self) -> None:
        """Start the background thread (a first reconcile and sync run before it returns)."""
        try:
            self.reconcile(force=True)
            self.sync(force=True)
        except Exception as exc:  # noqa: BLE001 - Redis or registry not there yet: thread retries
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("initial routing sync failed: %s", self.last_error)
        self._next_reconcile = time.monotonic() + self.registry_poll_s
        self._worker.start()

    @property
    def running(self) -> bool:
        """The background sync thread is alive."""
        return self._worker.running

    def stop(self) -> None:
        """Stop the background thread."""
        self._worker.stop()

    def _step(self) -> None:
        """One background pass: follow the registry now and then, sync every time."""
        try:
            retry_failed = False
            if time.monotonic() >= self._next_reconcile:
                self._next_reconcile = time.monotonic() + self.registry_poll_s
                self.reconcile(force=self._state.rev < 0)
                retry_failed = bool(self._state.errors)  # e.g. a model file fixed since
            self.sync(force=self._state.rev < 0 or retry_failed)
            self.last_error = ""
        except Exception as exc:  # noqa: BLE001 - keep serving the current state; retry
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("routing sync failed: %s", self.last_error)
