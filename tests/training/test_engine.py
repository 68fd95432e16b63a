"""Compiled tree engine: parity with XGBoost/onnxruntime, missing values, layouts, fallbacks."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import xgboost as xgb
from onnx import TensorProto, helper

from tickcast.errors import InvalidInput, ParityError, RegistryError
from training.engine import (NODE_DTYPE, CompiledTrees, KernelUnavailable, QuantilePredictor,
                             TreeTables, _build_library)
from training.fit import booster_params
from training.onnx_export import INPUT_NAME, OUTPUT_NAME, booster_to_onnx

Q = (0.05, 0.5, 0.95)
F = 10


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Features where missingness carries signal, so XGBoost learns both default directions."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4000, F)).astype(np.float32)
    y = 1e-3 * np.tanh(x[:, 0]) + 5e-4 * np.exp(0.5 * x[:, 1]) * rng.standard_normal(4000)
    gone = rng.random(4000) < 0.2
    x[gone, 2] = np.nan
    y[gone] += 2e-3  # missing col 2 -> high outcome
    x[rng.random(4000) < 0.15, 3] = np.nan
    return x, y


@pytest.fixture(scope="module")
def model(data: tuple[np.ndarray, np.ndarray]) -> tuple[xgb.Booster, bytes]:
    x, y = data
    # One thread: OpenMP barriers on a loaded 2-core machine make nthread=2 fits 20x slower.
    params = booster_params({"max_depth": 5, "eta": 0.1, "min_child_weight": 2.0}, Q, nthread=1)
    booster = xgb.train(params, xgb.DMatrix(x[:3000], label=y[:3000]), 40)
    return booster, booster_to_onnx(booster, F, Q).SerializeToString()


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def test_compiled_matches_xgboost_at_every_batch_shape(
        model: tuple[xgb.Booster, bytes], data: tuple[np.ndarray, np.ndarray]) -> None:
    booster, onnx_bytes = model
    x = data[0][3000:].copy()
    x[::13, 0] = np.inf
    x[::17, 1] = -np.inf
    kernel = CompiledTrees(onnx_bytes)
    # Both default directions occur, so the missing-value slots are really exercised.
    tracks = onnx.load_from_string(onnx_bytes).graph.node[0].attribute
    miss = [helper.get_attribute_value(a) for a in tracks
            if a.name == "nodes_missing_value_tracks_true"][0]
    assert 0 < sum(miss) < len(miss)
    native = booster.inplace_predict(x)
    # Rows go in 64-row blocks, in groups of 16 interleaved per tree; the rest of a block row by
    # row with 8 trees interleaved (and single trees where fewer than 8 share a depth).
    for n in (1, 2, 7, 15, 16, 17, 31, 63, 64, 65, 1000):
        got = kernel.predict(x[:n])
        assert got.shape == (n, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, native[:n], atol=1e-6, rtol=0)
    probe = kernel.tables.probe_rows(300, seed=4)
    np.testing.assert_allclose(kernel.predict(probe), booster.inplace_predict(probe),
                               atol=1e-6, rtol=0)
    assert kernel.predict(x[:0]).shape == (0, 3)
    with pytest.raises(InvalidInput) as info:
        kernel.predict(x[:, :-1])
    assert info.value.field == "features"


def test_mixed_depths_stumps_and_odd_tree_counts(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    # gamma prunes: trees of every depth from 0 (a lone leaf) to 6, 39 trees (not a multiple of
    # the 8 interleaved walks), so the kernel's single-tree path runs too.
    params = booster_params({"max_depth": 6, "eta": 0.3, "min_child_weight": 50.0, "gamma": 1.0},
                            Q, nthread=1)
    booster = xgb.train(params, xgb.DMatrix(x[:3000], label=y[:3000]), 13)
    kernel = CompiledTrees(booster_to_onnx(booster, F, Q).SerializeToString())
    assert kernel.tables.n_trees == 39 and len(set(kernel.tables.depths.tolist())) >= 5
    assert kernel.tables.depths.min() == 0
    rows = x[3000:]
    native = booster.inplace_predict(rows)
    for n in (1, 5, 16, 33, 200):
        np.testing.assert_allclose(kernel.predict(rows[:n]), native[:n], atol=1e-6, rtol=0)


def test_tables_layout_and_pickle(model: tuple[xgb.Booster, bytes]) -> None:
    booster, onnx_bytes = model
    tables = TreeTables.from_onnx(onnx_bytes)
    assert tables.n_trees == 120 and tables.n_targets == 3 and tables.n_features == F
    assert np.all(np.diff(tables.depths) >= 0) and tables.depths.max() <= 5
    assert sorted(np.bincount(tables.targets).tolist()) == [40, 40, 40]
    assert tables.nodes.dtype == NODE_DTYPE
    # Leaves point to themselves and to the NaN slot; splits to a child pair further on.
    link = tables.nodes["link"].astype(np.int64)
    target, slot = link >> 10, link & 1023
    leaf = slot == 2 * F
    assert np.array_equal(target[leaf], np.flatnonzero(leaf))
    splits = np.flatnonzero(~leaf)
    assert np.all(target[splits] != splits) and np.all(target[splits] + 1 < len(link))
    assert np.all(slot[splits] < 2 * F)
    # Every node but the roots is the child of exactly one split.
    children = np.concatenate([target[splits], target[splits] + 1])
    assert sorted(children.tolist()) == list(range(tables.n_trees, len(link)))
    clone = pickle.loads(pickle.dumps(tables))
    assert np.array_equal(clone.nodes, tables.nodes) and clone.thresholds[0].size > 0
    kernel = CompiledTrees(onnx_bytes)
    copy = pickle.loads(pickle.dumps(kernel))
    probe = tables.probe_rows(50)
    np.testing.assert_array_equal(copy.predict(probe), kernel.predict(probe))


def _hand_model(mode: str, extra: list[onnx.NodeProto] | None = None) -> bytes:
    """Two trees on 2 features: a split with missing -> true, and a stump (root is a leaf)."""
    ens = helper.make_node(
        "TreeEnsembleRegressor", [INPUT_NAME], ["raw" if extra else OUTPUT_NAME],
        domain="ai.onnx.ml", n_targets=1, base_values=[0.25], post_transform="NONE",
        nodes_treeids=[0, 0, 0, 1], nodes_nodeids=[0, 1, 2, 0], nodes_featureids=[1, 0, 0, 0],
        nodes_values=[0.5, 0.0, 0.0, 0.0], nodes_modes=[mode, "LEAF", "LEAF", "LEAF"],
        nodes_truenodeids=[1, 0, 0, 0], nodes_falsenodeids=[2, 0, 0, 0],
        nodes_missing_value_tracks_true=[1, 0, 0, 0],
        target_treeids=[0, 0, 1], target_nodeids=[1, 2, 0], target_ids=[0, 0, 0],
        target_weights=[1.0, 2.0, 10.0])
    graph = helper.make_graph(
        [ens, *(extra or [])], "hand",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 1])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15),
                                                helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    return m.SerializeToString()


@pytest.mark.parametrize("mode", ["BRANCH_LT", "BRANCH_LEQ"])
def test_split_modes_ties_missing_and_stumps_follow_onnxruntime(mode: str) -> None:
    onnx_bytes = _hand_model(mode)
    t = np.float32(0.5)
    col = np.array([t, np.nextafter(t, np.float32(-1)), np.nextafter(t, np.float32(2)), np.nan,
                    np.inf, -np.inf], dtype=np.float32)
    x = np.stack([np.zeros_like(col), col], axis=1)
    ours = CompiledTrees(onnx_bytes).predict(x)
    theirs = _session(onnx_bytes).run(None, {INPUT_NAME: x})[0]
    np.testing.assert_array_equal(ours, theirs)
    # 0.25 base + 10 (stump) + 1 (true side) or 2: ties go true only with <=, NaN goes true.
    tie = 11.25 if mode == "BRANCH_LEQ" else 12.25
    assert ours[:, 0].tolist() == [tie, 11.25, 12.25, 11.25, 12.25, 11.25]


def test_unsupported_graph_falls_back_with_a_reason(model: tuple[xgb.Booster, bytes],
                                                    data: tuple[np.ndarray, np.ndarray]) -> None:
    booster, onnx_bytes = model
    gte = _hand_model("BRANCH_GTE")
    with pytest.raises(KernelUnavailable, match="split modes"):
        TreeTables.from_onnx(gte)
    extra = _hand_model("BRANCH_LT", extra=[helper.make_node("Abs", ["raw"], [OUTPUT_NAME])])
    with pytest.raises(KernelUnavailable, match="not tree ensembles joined"):
        TreeTables.from_onnx(extra)
    with pytest.raises(KernelUnavailable, match="not an ONNX model"):
        TreeTables.from_onnx(b"garbage")
    pred = QuantilePredictor(gte)
    assert not pred.has_compiled and "split modes" in (pred.compiled_error or "")
    assert pred.engine_summary == "onnx" and pred.engine_for(1) == "onnx"
    with pytest.raises(RegistryError) as info:
        pred.predict_compiled(np.zeros((1, 2), np.float32))
    assert info.value.field == "compiled"
    # Switched off by configuration: the previous split, ONNX below native_min_rows.
    off = QuantilePredictor(onnx_bytes, bytes(booster.save_raw("json")), native_min_rows=16,
                            native_threads=1, compiled=False)
    assert off.engine_summary == "onnx<16<=native" and off.compiled_error is None
    assert off.engine_for(15) == "onnx" and off.engine_for(16) == "native"
    x = data[0][3000:3100]
    np.testing.assert_allclose(off.predict(x), booster.inplace_predict(x), atol=1e-5, rtol=0)


def test_missing_compiler_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KernelUnavailable, match="no C compiler") as info:
        _build_library()
    assert info.value.field == "compiler"


def test_self_check_rejects_a_kernel_that_disagrees(model: tuple[xgb.Booster, bytes]) -> None:
    _, onnx_bytes = model
    pred = QuantilePredictor(onnx_bytes)
    assert pred.has_compiled and pred.compiled_parity_gap is not None
    assert pred.compiled_parity_gap <= 1e-5
    wrong = onnx.load_from_string(onnx_bytes)
    for attr in wrong.graph.node[1].attribute:  # shift every q=0.5 leaf by 1e-3
        if attr.name == "target_weights":
            shifted = [v + 1e-3 for v in attr.floats]
            del attr.floats[:]
            attr.floats.extend(shifted)
    with pytest.raises(ParityError, match=r"max \|compiled - onnx\| = 4\.0\d*e-02") as info:
        pred._self_check(CompiledTrees(wrong.SerializeToString()))
    assert info.value.field == "model.onnx"


def test_concurrent_calls_agree(model: tuple[xgb.Booster, bytes],
                                data: tuple[np.ndarray, np.ndarray]) -> None:
    _, onnx_bytes = model
    pred = QuantilePredictor(onnx_bytes)
    x = data[0][3000:3400]
    want = [pred.predict(x[i:i + 1 + i % 40]) for i in range(200)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: pred.predict(x[i:i + 1 + i % 40]), range(200)))
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
