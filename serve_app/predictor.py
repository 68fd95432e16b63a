"""The request path's core: a precomputed per-asset view and the scoring of one or many assets.

:class:`ServingView` joins a :class:`~serve_app.slots.ServingState` (routes + loaded models)
with a :class:`~serve_app.feature_cache.FeatureSnapshot` (online features + safety state).
It is built once per change of either (a few microseconds per asset, off the per-request
cost) and holds, for every routed asset and slot, the feature row already reordered into that
model's column order as a float32 ``[1, F]`` array. A single prediction is then a dict lookup,
a hash, one ``session.run`` (plus one for the shadow slot) and a little arithmetic.

Batches are vectorized: rows are grouped by predictor and conformal state, and each group is
scored with one engine call and widened with one vectorized interval computation. Assets of a
pooled model (the same model file registered for many assets) form one group, whatever their
number.

No Ray, no Redis here: errors are raised as :class:`~tickcast.errors.TickcastError` and mapped
to HTTP by the app. Failures of a model's own making are their own classes
(:class:`ModelFailed`, :class:`ModelUnusable`) carrying the asset, slot and version at fault, so
the metrics blame that model and no other; stale features or an empty slot are no model's fault.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from serve_app.feature_cache import NORMAL, FeatureEntry, FeatureSnapshot, SafetyEntry
from serve_app.metrics import ModelFault
from serve_app.routing import AssetRoute
from serve_app.sessions import SessionBook, check_open, closed_assets, closed_rows, session_entry
from serve_app.slots import LoadedModel, ServingState
from tickcast.errors import InvalidInput, ServiceUnavailable, TickcastError, UnknownAsset


class ModelFailed(TickcastError):
    """A model raised while scoring, or gave no finite median (HTTP 500: a server defect, and
    that model's own)."""

    status = 500
    code = "model_failed"

    def __init__(self, message: str, *, asset: str, slot: str, version: str) -> None:
        super().__init__(message)
        self.asset, self.slot, self.version = asset, slot, version

    @property
    def fault(self) -> ModelFault:
        """``(asset, slot, version, error, status)`` for the metrics."""
        return (self.asset, self.slot, self.version, self.code, self.status)


class ModelUnusable(ServiceUnavailable):
    """The slot's model cannot use the asset's online features (schema or columns differ):
    HTTP 503, and that model's own fault (the features feed the asset's other models)."""

    def __init__(self, message: str, *, asset: str, slot: str, version: str) -> None:
        super().__init__(message)
        self.asset, self.slot, self.version = asset, slot, version

    @property
    def fault(self) -> ModelFault:
        """``(asset, slot, version, error, status)`` for the metrics."""
        return (self.asset, self.slot, self.version, self.code, self.status)


def _run_model(model: LoadedModel, asset: str, slot: str, x: np.ndarray,
               sigma: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``model.score`` with its failures named: an exception or a non-finite median is a
    :class:`ModelFailed` of that model (``asset`` is whose request it served)."""
    try:
        pred, lo, hi = model.score(x, sigma)
    except Exception as exc:  # noqa: BLE001 - whatever the engine raised, it is this model's fault
        raise ModelFailed(f"model {model.version} failed: {type(exc).__name__}: {exc}",
                          asset=asset, slot=slot, version=model.version) from exc
    if not np.isfinite(pred).all():
        raise ModelFailed(f"model {model.version} gave a non-finite median",
                          asset=asset, slot=slot, version=model.version)
    return pred, lo, hi


@dataclass(frozen=True, eq=False)
class SlotInput:
    """A slot's model and the asset's online features in that model's column order."""

    model: LoadedModel
    x: np.ndarray | None  # float32 [1, F]; None when the features cannot feed this model
    sigma: float  # raw conformal scale value (NaN when unscaled or missing)
    problem: str  # why x is None ("" when usable)


@dataclass(frozen=True, eq=False)
class AssetView:
    """Everything needed to serve one asset, precomputed."""

    asset: str
    route: AssetRoute
    feature: FeatureEntry | None
    safety: SafetyEntry
    blue: SlotInput | None
    green: SlotInput | None

    def slot_input(self, slot: str) -> SlotInput | None:
        """The input of ``slot`` (None when the slot is empty)."""
        return self.blue if slot == "blue" else self.green


@dataclass(frozen=True)
class Scored:
    """One prediction: which slot and version made it, and its numbers."""

    asset: str
    slot: str
    version: str
    pred: float
    lo: float
    hi: float
    coverage: float
    price: float | None
    bar_ts: int | None
    age_s: float | None
    safety: SafetyEntry
    calibrated: bool = True  # False: the model has no conformal state, the raw [q05, q95] is served
    model: LoadedModel | None = field(default=None, repr=False, compare=False)
    x: np.ndarray | None = field(default=None, repr=False, compare=False)  # the scored row [1, F]


def _slot_input(model: LoadedModel, feature: FeatureEntry | None) -> SlotInput:
    if feature is None:
        return SlotInput(model, None, math.nan, "no online features")
    if model.schema_hash is not None and feature.schema and feature.schema != model.schema_hash:
        return SlotInput(model, None, math.nan,
                         f"online features have schema {feature.schema}, model {model.version} "
                         f"was trained on {model.schema_hash}")
    if feature.names == model.feature_names:
        row = feature.values
    else:
        index = {n: i for i, n in enumerate(feature.names)}
        missing = [n for n in model.feature_names if n not in index]
        if missing:
            return SlotInput(model, None, math.nan,
                             f"online features lack {missing[:5]} needed by model {model.version}")
        row = feature.values[[index[n] for n in model.feature_names]]
    x = np.ascontiguousarray(row, dtype=np.float32).reshape(1, -1)
    x.setflags(write=False)
    sigma = math.nan
    if model.sigma_index is not None:
        sigma = float(row[model.sigma_index])
    return SlotInput(model, x, sigma, "")


@dataclass(frozen=True, eq=False)
class BatchResult:
    """Predictions of a batch as columns (row ``k`` = ``k``-th served asset, request order).

    ``shadow_*`` columns hold the mirrored predictions (logged, never returned).
    """

    asset: list[str]
    slot: list[str]
    version: list[str]
    pred: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    coverage: np.ndarray
    price: np.ndarray  # NaN when unknown
    bar_ts: np.ndarray
    age_s: np.ndarray
    regime: list[str]
    multiplier: list[float]
    halted: list[bool]
    shadow_asset: list[str]
    shadow_slot: list[str]
    shadow_version: list[str]
    shadow_pred: np.ndarray
    shadow_lo: np.ndarray
    shadow_hi: np.ndarray
    shadow_price: np.ndarray
    shadow_bar_ts: np.ndarray
    errors: list[tuple[str, str, str]]
    faults: list[ModelFault] = field(default_factory=list)  # errors of a model's own making
    calibrated: np.ndarray | None = None  # per served row (None: all calibrated)
    shadow_faults: list[ModelFault] = field(default_factory=list)  # shadow models that failed

    def __len__(self) -> int:
        return len(self.asset)


class _Group:
    """Rows of one (predictor, conformal state) group, stacked for one engine call."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.rows: list[np.ndarray] = []
        self.sigma: list[float] = []
        self.version: list[str] = []
        self.coverage: list[float] = []
        self.x = np.empty((0, 0), dtype=np.float32)
        self.sigma_arr = np.empty(0)
        self.version_arr = np.empty(0, dtype=object)
        self.coverage_arr = np.empty(0)

    def add(self, inp: SlotInput) -> int:
        assert inp.x is not None
        self.rows.append(inp.x[0])
        self.sigma.append(inp.sigma)
        self.version.append(inp.model.version)
        self.coverage.append(inp.model.coverage)
        return len(self.rows) - 1

    def freeze(self) -> None:
        self.x = np.ascontiguousarray(np.stack(self.rows), dtype=np.float32)
        self.sigma_arr = np.asarray(self.sigma, dtype=np.float64)
        self.version_arr = np.asarray(self.version, dtype=object)
        self.coverage_arr = np.asarray(self.coverage, dtype=np.float64)
        self.rows = []


class _BatchIndex:
    """Every servable asset of a view as arrays, so a batch is numpy indexing plus one engine
    call per model group (built once per view, on the first batch request)."""

    def __init__(self, view: "ServingView") -> None:
        names = [a for a, v in view.assets.items() if v.feature is not None]
        self.index = {a: i for i, a in enumerate(names)}
        n = len(names)
        self.names = np.asarray(names, dtype=object)
        self.bar_ts = np.zeros(n, dtype=np.int64)
        self.price = np.full(n, np.nan)
        self.weight = np.zeros(n)
        self.shadow = np.zeros(n, dtype=bool)
        self.regime = np.empty(n, dtype=object)
        self.multiplier = np.ones(n)
        self.halted = np.zeros(n, dtype=bool)
        self.groups: list[_Group] = []
        keyed: dict[tuple[str, str, int], int] = {}
        # per slot: group id (-1 unusable), row within the group, and whether the slot is filled
        self.group = {s: np.full(n, -1, dtype=np.int64) for s in ("blue", "green")}
        self.row = {s: np.zeros(n, dtype=np.int64) for s in ("blue", "green")}
        self.filled = {s: np.zeros(n, dtype=bool) for s in ("blue", "green")}
        self.version = {s: np.full(n, None, dtype=object) for s in ("blue", "green")}
        self.problem: dict[str, dict[int, str]] = {"blue": {}, "green": {}}
        for i, a in enumerate(names):
            v = view.assets[a]
            assert v.feature is not None
            self.bar_ts[i] = v.feature.bar_ts
            if v.feature.price is not None:
                self.price[i] = v.feature.price
            self.weight[i] = v.route.green_weight
            self.shadow[i] = v.route.shadow
            self.regime[i] = v.safety.regime
            self.multiplier[i] = v.safety.multiplier
            self.halted[i] = v.safety.halted
            for slot in ("blue", "green"):
                inp = v.slot_input(slot)
                if inp is None:
                    continue
                self.filled[slot][i] = True
                self.version[slot][i] = inp.model.version
                if inp.x is None:
                    self.problem[slot][i] = inp.problem
                    continue
                key = _group_key(inp.model)
                gid = keyed.get(key)
                if gid is None:
                    gid = keyed[key] = len(self.groups)
                    self.groups.append(_Group(inp.model))
                self.group[slot][i] = gid
                self.row[slot][i] = self.groups[gid].add(inp)
            # Two slots holding the same version: shadowing it would only repeat the prediction.
            if v.route.blue == v.route.green:
                self.shadow[i] = False
        for g in self.groups:
            g.freeze()
        self.calibrated = np.asarray([g.model.calibrator is not None for g in self.groups] + [True],
                                     dtype=bool)  # index -1 (no group): True, never read

    def score(self, idx: np.ndarray, green: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                         dict[int, str]]:
        """Score rows ``idx`` on their chosen slots (``green`` mask).

        Returns ``(gid, pred, lo, hi, version, coverage, failed)``: rows of group -1 (the
        slot's model cannot use the features) and of the groups in ``failed`` (group → why
        its model failed) are NaN.
        """
        gid = np.where(green, self.group["green"][idx], self.group["blue"][idx])
        row = np.where(green, self.row["green"][idx], self.row["blue"][idx])
        n = len(idx)
        pred, lo, hi = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        coverage = np.full(n, np.nan)
        version = np.empty(n, dtype=object)
        failed: dict[int, str] = {}
        for g in np.unique(gid[gid >= 0]).tolist():
            mask = gid == g
            group = self.groups[g]
            rows = row[mask]
            sigma = group.sigma_arr[rows] if group.model.sigma_index is not None else None
            try:
                p, l, h = _run_model(group.model, "", "", group.x[rows], sigma)
            except ModelFailed as exc:
                failed[g] = exc.message
                continue
            pred[mask], lo[mask], hi[mask] = p, l, h
            version[mask] = group.version_arr[rows]
            coverage[mask] = group.coverage_arr[rows]
        return gid, pred, lo, hi, version, coverage, failed


class ServingView:
    """Per-asset serving inputs for one (state, snapshot) pair (immutable once built).

    Parameters
    ----------
    state
        Routes and loaded models.
    snapshot
        Online features and safety state.
    known_assets
        Configured assets: an unknown asset outside this set, the routes and the features is
        a 404; a known one without a model is a 503.
    freq_ns
        Bar length (a bar's features age from its close, ``bar_ts + freq_ns``).
    max_age_s
        Features older than this are refused (``serve.feature_max_age_s``).
    sessions
        Trading calendars of the assets whose market closes (None: all trade 24/7).
    """

    def __init__(self, state: ServingState, snapshot: FeatureSnapshot, known_assets: Iterable[str],
                 freq_ns: int, max_age_s: float, sessions: SessionBook | None = None) -> None:
        self.sessions = sessions
        self.state = state
        self.snapshot = snapshot
        self.freq_ns = int(freq_ns)
        self.max_age_s = float(max_age_s)
        self.known = frozenset(known_assets) | frozenset(snapshot.features) | frozenset(state.table.routes)
        assets: dict[str, AssetView] = {}
        for asset, route in state.table.routes.items():
            feature = snapshot.features.get(asset)
            slots: dict[str, SlotInput | None] = {}
            for slot in ("blue", "green"):
                model = state.model(asset, slot)
                slots[slot] = None if model is None else _slot_input(model, feature)
            assets[asset] = AssetView(asset=asset, route=route, feature=feature,
                                      safety=snapshot.safety.get(asset, NORMAL),
                                      blue=slots["blue"], green=slots["green"])
        self.assets: Mapping[str, AssetView] = assets
        self._batch: _BatchIndex | None = None
        self._batch_lock = threading.Lock()

    # ------------------------------------------------------------------ lookups
    def asset_view(self, asset: str) -> AssetView:
        """The view of a routed asset.

        Raises
        ------
        UnknownAsset
            Nobody has heard of ``asset`` (404).
        ServiceUnavailable
            A known asset without a loaded model (503, reason given).
        """
        view = self.assets.get(asset)
        if view is not None:
            return view
        if asset not in self.known:
            raise UnknownAsset(f"unknown asset '{asset}'", field="asset")
        reason = self.state.errors.get(asset)
        raise ServiceUnavailable(reason or f"no model loaded for {asset}")

    def check_fresh(self, view: AssetView, now_ns: int) -> float:
        """Age (s) of the asset's online features; raises 503 when the market is closed, or the
        features are missing or too old."""
        check_open(self.sessions, view.asset, now_ns)
        feature = view.feature
        if feature is None:
            raise ServiceUnavailable(f"no online features for {view.asset}")
        age = feature.age_s(now_ns, self.freq_ns)
        if age > self.max_age_s:
            raise ServiceUnavailable(f"features of {view.asset} are stale: bar closed {age:.1f} s "
                                     f"ago (limit serve.feature_max_age_s = {self.max_age_s:g} s)")
        return age

    # ------------------------------------------------------------------ single
    def score_online(self, view: AssetView, slot: str, age_s: float) -> Scored:
        """Score the asset's online features with ``slot``'s model.

        Raises
        ------
        ServiceUnavailable
            The slot is empty (503).
        ModelUnusable
            The features cannot feed this model (schema mismatch), with the reason (503).
        ModelFailed
            The model raised or gave a non-finite median (500).
        """
        inp = view.slot_input(slot)
        if inp is None:
            raise ServiceUnavailable(f"{view.asset}: slot {slot} holds no model")
        model = inp.model
        if inp.x is None:
            raise ModelUnusable(f"{view.asset}: {inp.problem}", asset=view.asset, slot=slot,
                                version=model.version)
        pred, lo, hi = _run_model(model, view.asset, slot, inp.x,
                                  np.array([inp.sigma]) if model.sigma_index is not None else None)
        feature = view.feature
        assert feature is not None  # check_fresh ran
        return Scored(asset=view.asset, slot=slot, version=model.version, pred=float(pred[0]),
                      lo=float(lo[0]), hi=float(hi[0]), coverage=model.coverage,
                      price=feature.price, bar_ts=feature.bar_ts, age_s=age_s, safety=view.safety,
                      calibrated=model.calibrator is not None, model=model, x=inp.x)

    def score_explicit(self, view: AssetView, slot: str, features: Mapping[str, float | None],
                       price: float | None, strict: bool = True) -> Scored | None:
        """Score explicit features (names must match ``slot``'s model schema exactly).

        With ``strict=False`` (the shadow slot) a mismatch returns None instead of raising.

        Raises
        ------
        InvalidInput
            Missing or unknown feature names (422, naming them).
        ModelFailed
            The model raised or gave a non-finite median (500).
        """
        inp = view.slot_input(slot)
        if inp is None:
            raise ServiceUnavailable(f"{view.asset}: slot {slot} holds no model")
        model = inp.model
        names = model.feature_names
        missing = [n for n in names if n not in features]
        extra = [n for n in features if n not in set(names)]
        if missing or extra:
            if not strict:
                return None
            what = []
            if missing:
                what.append(f"missing {missing[:10]}")
            if extra:
                what.append(f"unknown {extra[:10]}")
            raise InvalidInput(f"features do not match model {model.version} of {view.asset}: "
                               + "; ".join(what), field=f"features.{(missing or extra)[0]}")
        row = np.array([math.nan if features[n] is None else features[n] for n in names],
                       dtype=np.float64)
        x = row.astype(np.float32).reshape(1, -1)
        sigma = np.array([row[model.sigma_index]]) if model.sigma_index is not None else None
        pred, lo, hi = _run_model(model, view.asset, slot, x, sigma)
        ref = price if price is not None else (view.feature.price if view.feature is not None else None)
        return Scored(asset=view.asset, slot=slot, version=model.version, pred=float(pred[0]),
                      lo=float(lo[0]), hi=float(hi[0]), coverage=model.coverage, price=ref,
                      bar_ts=None, age_s=None, safety=view.safety,
                      calibrated=model.calibrator is not None, model=model, x=x)

    # ------------------------------------------------------------------ batch
    def batch_index(self) -> _BatchIndex:
        """The array form of this view (built on first use)."""
        idx = self._batch
        if idx is None:
            with self._batch_lock:
                if self._batch is None:
                    self._batch = _BatchIndex(self)
                idx = self._batch
        return idx

    def score_batch(self, assets: Sequence[str], u: float, now_ns: int, shadow: bool = True) -> BatchResult:
        """Score many assets' online features: numpy gathers and one engine call per group.

        Parameters
        ----------
        assets
            Asset names, in request order (repeats allowed).
        u
            The request's routing point in ``[0, 1)`` (one per request: a client's batch lands
            in one A/B group).
        now_ns
            Wall clock for feature ages.
        shadow
            Also score the shadow slot where shadow mode is on.

        Raises
        ------
        UnknownAsset
            An asset nobody has heard of (the whole request is a client mistake: 404).
        """
        bi = self.batch_index()
        lookup = bi.index.get
        pos = np.fromiter((lookup(a, -1) for a in assets), dtype=np.int64, count=len(assets))
        errors: list[tuple[str, str, str]] = []
        if (pos < 0).any():
            for a, p in zip(assets, pos.tolist()):
                if p >= 0:
                    continue
                if a not in self.assets and a not in self.known:
                    raise UnknownAsset(f"unknown asset '{a}'", field="assets")
                if a in self.assets:
                    errors.append((a, "unavailable", f"no online features for {a}"))
                else:
                    errors.append((a, "unavailable", self.state.errors.get(a) or f"no model loaded for {a}"))
        ages = (now_ns - (bi.bar_ts[np.maximum(pos, 0)] + self.freq_ns)) / 1e9
        ages = np.maximum(ages, 0.0)
        shut = closed_rows(self.sessions, bi.names, pos, now_ns, errors)
        ok = (pos >= 0) & (ages <= self.max_age_s) & ~shut
        for k in np.flatnonzero((pos >= 0) & ~ok & ~shut).tolist():
            a = assets[k]
            errors.append((a, "unavailable", f"features of {a} are stale: bar closed {ages[k]:.1f} s "
                                             f"ago (limit {self.max_age_s:g} s)"))
        idx = pos[ok]
        age = ages[ok]
        # route.choose(u) for every row at once: green when u < weight, an empty slot hands over.
        green = ((u < bi.weight[idx]) & bi.filled["green"][idx]) | ~bi.filled["blue"][idx]
        gid, pred, lo, hi, version, coverage, failed = bi.score(idx, green)
        usable = gid >= 0
        if failed:
            usable &= ~np.isin(gid, list(failed))
        faults: list[ModelFault] = []
        if not usable.all():
            for k in np.flatnonzero(~usable).tolist():
                i = int(idx[k])
                a = str(bi.names[i])
                slot = "green" if green[k] else "blue"
                v = bi.version[slot][i]
                g = int(gid[k])
                if g in failed:
                    errors.append((a, ModelFailed.code, f"{a}: {failed[g]}"))
                    faults.append((a, slot, v, ModelFailed.code, ModelFailed.status))
                elif i in bi.problem[slot]:
                    errors.append((a, ModelUnusable.code, f"{a}: {bi.problem[slot][i]}"))
                    faults.append((a, slot, v, ModelUnusable.code, ModelUnusable.status))
                else:
                    errors.append((a, "unavailable", f"{a}: slot {slot} holds no model"))
            idx, age, green, gid = idx[usable], age[usable], green[usable], gid[usable]
            pred, lo, hi, version, coverage = (pred[usable], lo[usable], hi[usable], version[usable],
                                               coverage[usable])
        calibrated = bi.calibrated[gid]
        slots = np.where(green, "green", "blue")
        # Shadow: the other slot, for rows whose route mirrors and whose other slot is usable.
        s_idx = np.empty(0, dtype=np.int64)
        s_slot = np.empty(0, dtype=object)
        s_pred = s_lo = s_hi = np.empty(0)
        s_version = np.empty(0, dtype=object)
        shadow_faults: list[ModelFault] = []
        if shadow:
            want = bi.shadow[idx]
            other_green = ~green
            other_gid = np.where(other_green, bi.group["green"][idx], bi.group["blue"][idx])
            want &= other_gid >= 0
            if want.any():
                s_idx = idx[want]
                og = other_green[want]
                sg, s_pred, s_lo, s_hi, s_version, _, s_failed = bi.score(s_idx, og)
                if s_failed:  # a failing shadow model is skipped (and counted), never served
                    keep = ~np.isin(sg, list(s_failed))
                    for k in np.flatnonzero(~keep).tolist():
                        slot = "green" if og[k] else "blue"
                        shadow_faults.append((str(bi.names[s_idx[k]]), slot,
                                              bi.version[slot][s_idx[k]], ModelFailed.code,
                                              ModelFailed.status))
                    s_idx, og, s_pred, s_lo, s_hi, s_version = (s_idx[keep], og[keep], s_pred[keep],
                                                                s_lo[keep], s_hi[keep], s_version[keep])
                s_slot = np.where(og, "green", "blue")
        names = bi.names[idx].tolist()
        return BatchResult(
            asset=names, slot=slots.tolist(), version=version.tolist(), pred=pred, lo=lo, hi=hi,
            coverage=coverage, price=bi.price[idx], bar_ts=bi.bar_ts[idx], age_s=age,
            regime=bi.regime[idx].tolist(), multiplier=bi.multiplier[idx].tolist(),
            halted=bi.halted[idx].tolist(),
            shadow_asset=bi.names[s_idx].tolist(), shadow_slot=list(s_slot), shadow_version=list(s_version),
            shadow_pred=s_pred, shadow_lo=s_lo, shadow_hi=s_hi, shadow_price=bi.price[s_idx],
            shadow_bar_ts=bi.bar_ts[s_idx], errors=errors, faults=faults,
            calibrated=calibrated, shadow_faults=shadow_faults)

    # ------------------------------------------------------------------ health
    def readiness(self, now_ns: int, required: Iterable[str]) -> tuple[bool, list[str], dict[str, dict[str, object]]]:
        """Whether predictions can be served, why not, and per-asset status.

        Ready when at least one asset is servable and every asset of ``required`` that has a
        route is servable (an asset is servable when a slot's model is loaded and its features
        are fresh and fit that model).
        """
        reasons: list[str] = []
        status: dict[str, dict[str, object]] = {}
        servable: set[str] = set()
        for asset in sorted(set(self.assets) | set(required)):
            view = self.assets.get(asset)
            entry: dict[str, object] = {"model": False, "features": False,
                                        "session": session_entry(self.sessions, asset, now_ns)}
            if view is None:
                why = self.state.errors.get(asset) or "no model loaded"
                entry["reason"] = why
                status[asset] = entry
                continue
            entry["model"] = True
            entry["champion"] = view.route.champion
            try:
                age = self.check_fresh(view, now_ns)
                entry["feature_age_s"] = round(age, 3)
                inp = view.slot_input(view.route.champion_slot)
                if inp is None or inp.x is None:
                    raise ServiceUnavailable(inp.problem if inp else "champion slot empty")
                entry["features"] = True
                servable.add(asset)
            except ServiceUnavailable as exc:
                entry["reason"] = exc.message
                if view.feature is not None:
                    entry["feature_age_s"] = round(view.feature.age_s(now_ns, self.freq_ns), 3)
            status[asset] = entry
        resting = closed_assets(status)  # a closed market is not a failure: it blocks nothing
        required_routed = [a for a in required if a in self.assets and a not in resting]
        for a in required_routed:
            if a not in servable:
                reasons.append(f"{a}: {status[a].get('reason', 'not servable')}")
        if not servable and not resting:
            if not self.assets:
                reasons.append("no model loaded for any asset" if self.state.rev >= 0
                               else "routing state not loaded yet")
            else:
                reasons.extend(f"{a}: {status[a].get('reason')}" for a in sorted(self.assets)
                               if a not in required_routed)
        ready = bool(servable or resting) and all(a in servable for a in required_routed)
        return ready, reasons, status


def _group_key(model: LoadedModel) -> tuple[str, str, int]:
    """Rows sharing a predictor and a conformal state are scored together."""
    return (model.digest, model.calibration_key, -1 if model.sigma_index is None else model.sigma_index)
