"""Quantile predictor that picks the faster engine per batch size.

onnxruntime's tree ensemble is the fastest way to score one row (tens of microseconds against
about 200 µs of fixed overhead per native XGBoost call), but XGBoost's own blocked predictor is
2-3x faster per row on large batches (see ``python -m bench.inference``). A registered version
stores both: ``model.onnx`` (the served contract, always present) and ``model.xgb.json`` (the
native booster, optional). :class:`QuantilePredictor` runs ONNX below ``native_min_rows`` rows
and the native booster from there on; both engines were checked equal to
``model.onnx_parity_tol`` at registration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tickcast.errors import InvalidInput, RegistryError
from training.onnx_export import INPUT_NAME, OUTPUT_NAME

NATIVE_FILE = "model.xgb.json"


class QuantilePredictor:
    """Scores feature rows with an exported quantile model.

    Parameters
    ----------
    onnx_bytes
        The exported model (input ``features`` [N, F], output ``quantiles`` [N, Q]).
    native_json
        The native booster as XGBoost JSON, or None (then ONNX serves every batch size).
    native_min_rows
        Batches of at least this many rows go to the native booster (when present).
    onnx_threads
        onnxruntime intra-op threads.
    native_threads
        XGBoost threads for the native engine.

    Raises
    ------
    InvalidInput
        Bad thread or threshold values.
    RegistryError
        The model bytes cannot be loaded.
    """

    def __init__(
        self,
        onnx_bytes: bytes,
        native_json: bytes | None = None,
        native_min_rows: int = 32,
        onnx_threads: int = 1,
        native_threads: int = 2,
    ) -> None:
        if native_min_rows < 1:
            raise InvalidInput("native_min_rows must be >= 1", field="native_min_rows")
        if onnx_threads < 1 or native_threads < 1:
            raise InvalidInput("thread counts must be >= 1", field="threads")
        self._onnx_bytes = bytes(onnx_bytes)
        self._native_json = bytes(native_json) if native_json is not None else None
        self.native_min_rows = int(native_min_rows)
        self.onnx_threads = int(onnx_threads)
        self.native_threads = int(native_threads)
        self._load()

    def _load(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.onnx_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(self._onnx_bytes, opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated types
            raise RegistryError(f"cannot load ONNX model: {exc}", field="model.onnx") from None
        shape = self._session.get_inputs()[0].shape
        self.n_features = int(shape[1]) if isinstance(shape[1], int) else -1
        self.n_outputs = int(self._session.get_outputs()[0].shape[1])
        self._booster: Any = None
        if self._native_json is not None:
            import xgboost as xgb

            booster = xgb.Booster()
            try:
                booster.load_model(bytearray(self._native_json))
            except xgb.core.XGBoostError as exc:
                raise RegistryError(f"cannot load native booster: {exc}",
                                    field=NATIVE_FILE) from None
            booster.set_param({"nthread": self.native_threads})
            self._booster = booster

    @classmethod
    def from_dir(cls, path: str | Path, native_min_rows: int = 32, onnx_threads: int = 1,
                 native_threads: int = 2) -> "QuantilePredictor":
        """Load ``model.onnx`` (and ``model.xgb.json`` if present) from a registry version dir."""
        path = Path(path)
        native = path / NATIVE_FILE
        return cls((path / "model.onnx").read_bytes(),
                   native.read_bytes() if native.is_file() else None,
                   native_min_rows, onnx_threads, native_threads)

    @property
    def has_native(self) -> bool:
        """True when a native booster is loaded."""
        return self._booster is not None

    def engine_for(self, rows: int) -> str:
        """``"onnx"`` or ``"native"``: the engine a batch of ``rows`` rows is scored with."""
        return "native" if self._booster is not None and rows >= self.native_min_rows else "onnx"

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Quantiles for each row, float32 ``[N, Q]``.

        Raises
        ------
        InvalidInput
            ``features`` is not a 2-D numeric array with the model's column count.
        """
        x = np.asarray(features)
        if x.ndim != 2 or (self.n_features >= 0 and x.shape[1] != self.n_features):
            raise InvalidInput(f"features must be [N, {self.n_features}], got {list(x.shape)}",
                               field="features")
        if not np.issubdtype(x.dtype, np.number):
            raise InvalidInput(f"features must be numeric, got {x.dtype}", field="features")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 0:
            return np.empty((0, self.n_outputs), dtype=np.float32)
        if self.engine_for(len(x)) == "native":
            return np.asarray(self._booster.inplace_predict(x), dtype=np.float32).reshape(
                len(x), self.n_outputs)
        return self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def predict_onnx(self, features: np.ndarray) -> np.ndarray:
        """Score with onnxruntime regardless of batch size (for benchmarks and checks)."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def predict_native(self, features: np.ndarray) -> np.ndarray:
        """Score with the native booster regardless of batch size.

        Raises
        ------
        RegistryError
            No native booster was loaded.
        """
        if self._booster is None:
            raise RegistryError("no native booster loaded", field=NATIVE_FILE)
        x = np.ascontiguousarray(features, dtype=np.float32)
        return np.asarray(self._booster.inplace_predict(x), dtype=np.float32).reshape(
            len(x), self.n_outputs)

    # Sessions and boosters are native handles: pickle the bytes and rebuild (Ray moves this).
    def __getstate__(self) -> dict[str, Any]:
        return {"onnx_bytes": self._onnx_bytes, "native_json": self._native_json,
                "native_min_rows": self.native_min_rows, "onnx_threads": self.onnx_threads,
                "native_threads": self.native_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._onnx_bytes = state["onnx_bytes"]
        self._native_json = state["native_json"]
        self.native_min_rows = state["native_min_rows"]
        self.onnx_threads = state["onnx_threads"]
        self.native_threads = state["native_threads"]
        self._load()
