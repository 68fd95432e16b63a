"""ONNX export of the multi-quantile booster: contract, parity, parity failure, engine choice."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import pytest
import xgboost as xgb

from tickcast.errors import InvalidInput, ParityError, RegistryError
from training.engine import QuantilePredictor
from training.fit import booster_params
from training.onnx_export import (INPUT_NAME, OUTPUT_NAME, booster_to_onnx, check_parity,
                                  export_quantile_model, onnx_predict, tree_targets)

Q = (0.05, 0.5, 0.95)
F = 12


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, F)).astype(np.float32)
    x[::11, 4] = np.nan  # missing values follow XGBoost's default directions in both engines
    y = 1e-3 * np.tanh(x[:, 0]) + 5e-4 * np.exp(0.5 * x[:, 1]) * rng.standard_normal(3000)
    return x, y


@pytest.fixture(scope="module")
def booster(data: tuple[np.ndarray, np.ndarray]) -> xgb.Booster:
    x, y = data
    names = [f"feat_{i}" for i in range(F)]  # named features, as in training
    # One thread: OpenMP barriers on a loaded 2-core machine make nthread=2 fits 20x slower.
    params = booster_params({"max_depth": 5, "eta": 0.1, "subsample": 0.8}, Q, nthread=1)
    return xgb.train(params, xgb.DMatrix(x[:2000], label=y[:2000], feature_names=names), 60)


def _corrupt_leaves(onnx_bytes: bytes, delta: float, node_index: int) -> bytes:
    """Shift every leaf of one quantile's tree node by ``delta`` (a wrong export)."""
    model = onnx.load_from_string(onnx_bytes)
    for attr in model.graph.node[node_index].attribute:
        if attr.name == "target_weights":
            values = [v + delta for v in attr.floats]
            del attr.floats[:]
            attr.floats.extend(values)
    return model.SerializeToString()


def test_export_meets_the_contract_and_parity(booster: xgb.Booster,
                                               data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    onnx_bytes, gap = export_quantile_model(booster, x[2000:], Q, tol=1e-5,
                                            metadata={"schema_hash": "h"})
    assert gap <= 1e-5
    model = onnx.load_from_string(onnx_bytes)
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[1].dim_value == 3
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["quantiles"]) == list(Q) and props["schema_hash"] == "h"
    pred = onnx_predict(onnx_bytes, x[2000:])
    assert pred.dtype == np.float32 and pred.shape == (1000, 3)
    native = booster.inplace_predict(x[2000:])
    np.testing.assert_allclose(pred, native, atol=1e-5, rtol=0)
    # The three columns are three different quantiles (the tree->target split is right).
    assert np.mean(pred[:, 0] < pred[:, 1]) > 0.95 and np.mean(pred[:, 1] < pred[:, 2]) > 0.95
    # One tree per quantile per round, assigned round-robin by XGBoost.
    assert tree_targets(booster)[:6] == [0, 1, 2, 0, 1, 2]


def test_corrupted_leaf_fails_parity_with_the_figure(booster: xgb.Booster,
                                                     data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    good = booster_to_onnx(booster, F, Q).SerializeToString()
    bad = _corrupt_leaves(good, 1e-3, node_index=2)  # the q=0.95 trees
    with pytest.raises(ParityError) as info:
        check_parity(bad, booster, x[2000:], tol=1e-5)
    msg = info.value.message
    assert "max |onnx - xgboost|" in msg and "tolerance 1.0e-05" in msg
    # Each row lands in one leaf of each of the 60 q95 trees: the gap is 60 x 1e-3.
    figure = float(msg.split("= ")[1].split(" ")[0])
    assert figure == pytest.approx(0.06, rel=1e-3)
    assert info.value.field == "onnx"


def test_wrong_quantile_count_and_empty_validation_are_rejected(
        booster: xgb.Booster, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    with pytest.raises(InvalidInput, match="3 outputs, expected 2"):
        booster_to_onnx(booster, F, (0.1, 0.9))
    onnx_bytes = booster_to_onnx(booster, F, Q).SerializeToString()
    with pytest.raises(InvalidInput) as info:
        check_parity(onnx_bytes, booster, x[:0], tol=1e-5)
    assert info.value.field == "features"


def test_predictor_picks_engine_by_batch_size_and_pickles(
        booster: xgb.Booster, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    onnx_bytes = booster_to_onnx(booster, F, Q).SerializeToString()
    # With the compiled tree engine every batch size goes to it, and it agrees with XGBoost.
    fast = QuantilePredictor(onnx_bytes, bytes(booster.save_raw("json")), native_min_rows=16,
                             native_threads=1)
    assert fast.has_compiled and fast.engine_summary == "compiled"
    assert fast.engine_for(1) == "compiled" and fast.engine_for(10_000) == "compiled"
    np.testing.assert_allclose(fast.predict(x[:500]), booster.inplace_predict(x[:500]),
                               atol=1e-5, rtol=0)
    assert pickle.loads(pickle.dumps(fast)).engine_summary == "compiled"
    # Without it: ONNX below native_min_rows, native from there on.
    pred = QuantilePredictor(onnx_bytes, bytes(booster.save_raw("json")), native_min_rows=16,
                             native_threads=1, compiled=False)
    assert pred.engine_for(1) == "onnx" and pred.engine_for(16) == "native"
    small, big = pred.predict(x[:3]), pred.predict(x[:500])
    assert small.shape == (3, 3) and big.shape == (500, 3) and big.dtype == np.float32
    np.testing.assert_allclose(big, pred.predict_onnx(x[:500]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(small, pred.predict_native(x[:3]), atol=1e-5, rtol=0)
    assert pred.predict(x[:0]).shape == (0, 3)

    clone = pickle.loads(pickle.dumps(pred))
    np.testing.assert_array_equal(clone.predict(x[:500]), big)
    assert clone.native_min_rows == 16 and clone.has_native and not clone.has_compiled

    onnx_only = QuantilePredictor(onnx_bytes, compiled=False)
    assert onnx_only.engine_for(10_000) == "onnx" and not onnx_only.has_native
    with pytest.raises(RegistryError):
        onnx_only.predict_native(x[:2])


def test_predictor_rejects_bad_input(booster: xgb.Booster) -> None:
    onnx_bytes = booster_to_onnx(booster, F, Q).SerializeToString()
    pred = QuantilePredictor(onnx_bytes)
    with pytest.raises(InvalidInput) as info:
        pred.predict(np.zeros((2, F + 1), dtype=np.float32))
    assert info.value.field == "features" and f"[N, {F}]" in info.value.message
    with pytest.raises(InvalidInput):
        pred.predict(np.array([["a"] * F]))
    with pytest.raises(InvalidInput):
        QuantilePredictor(onnx_bytes, native_min_rows=0)
    with pytest.raises(RegistryError) as info:
        QuantilePredictor(b"not an onnx model")
    assert info.value.field == "model.onnx"
