"""Model registry: layout, cards, aliases (atomic, locked), promote/rollback, compare, errors."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pandas as pd
import pytest

from tickcast.config import load_settings
from tickcast.errors import InvalidInput, NotFound
from training.registry import ALIASES, ModelRegistry, registry_root

ASSET = "BTC-USD"


def _card(mae: float, **extra: object) -> dict[str, object]:
    return {"feature_names": ["ret_1", "rv_short"], "schema_hash": "abc",
            "metrics": {"mae": mae, "pinball": mae / 2, "validation": {"nested": 1}}, **extra}


def _ref() -> pd.DataFrame:
    return pd.DataFrame({"ret_1": [0.1, 0.2], "rv_short": [0.01, 0.02]})


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


def test_register_writes_layout_and_completes_card(reg: ModelRegistry) -> None:
    v = reg.register(ASSET, b"onnx-bytes", _card(2.0), _ref(), extra_files={"model.xgb.json": b"{}"})
    d = reg.path(ASSET, v)
    assert sorted(p.name for p in d.iterdir()) == ["card.json", "model.onnx", "model.xgb.json",
                                                     "reference.parquet"]
    card = reg.card(ASSET, v)
    assert card["asset"] == ASSET and card["version"] == v
    assert card["created"].endswith("+00:00") and card["code_version"]
    assert reg.model_bytes(ASSET, v) == b"onnx-bytes"
    pd.testing.assert_frame_equal(reg.reference(ASSET, v), _ref())
    # No staging directory is left behind and no alias was set.
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".staging")]
    assert reg.aliases(ASSET) == {}


def test_versions_sort_by_creation(reg: ModelRegistry) -> None:
    versions = [reg.register(ASSET, b"m", _card(float(i)), _ref()) for i in range(3)]
    assert reg.list(ASSET) == versions
    assert reg.assets() == [ASSET]
    assert reg.list("ETH-USD") == []


def test_alias_resolution_promote_and_rollback(reg: ModelRegistry) -> None:
    v1 = reg.register(ASSET, b"m1", _card(2.0), _ref(), alias=reg.default_alias(ASSET))
    assert reg.aliases(ASSET) == {"champion": v1}
    v2 = reg.register(ASSET, b"m2", _card(1.5), _ref(), alias=reg.default_alias(ASSET))
    assert reg.aliases(ASSET) == {"champion": v1, "challenger": v2}
    assert reg.resolve(ASSET, "challenger") == v2

    after = reg.promote(ASSET, "challenger")
    assert after == {"champion": v2, "previous": v1}
    assert reg.promote(ASSET, v2) == after  # promoting the champion changes nothing

    assert reg.rollback(ASSET) == {"champion": v1}
    with pytest.raises(NotFound, match="'previous' is not set"):
        reg.rollback(ASSET)
    history = (reg.root / ASSET / "alias_history.jsonl").read_text().splitlines()
    assert [json.loads(h)["reason"].split()[0] for h in history] == [
        "set", "set", "promote", "rollback"]


def test_set_alias_removal_and_unknown_names(reg: ModelRegistry) -> None:
    v = reg.register(ASSET, b"m", _card(1.0), _ref(), alias="challenger")
    assert reg.set_alias(ASSET, "challenger", None) == {}
    with pytest.raises(NotFound, match="alias 'champion' is not set"):
        reg.resolve(ASSET, "champion")
    with pytest.raises(NotFound, match="unknown alias 'best'"):
        reg.set_alias(ASSET, "best", v)
    with pytest.raises(NotFound, match="version '20990101T000000Z-abcdef' of BTC-USD not found"):
        reg.set_alias(ASSET, "champion", "20990101T000000Z-abcdef")
    with pytest.raises(NotFound, match="neither an alias"):
        reg.card(ASSET, "latest")
    with pytest.raises(InvalidInput) as info:
        reg.aliases("../etc")
    assert info.value.field == "asset"


def test_register_rejects_bad_input(reg: ModelRegistry) -> None:
    with pytest.raises(InvalidInput) as info:
        reg.register(ASSET, b"", _card(1.0), _ref())
    assert info.value.field == "onnx_bytes"
    with pytest.raises(InvalidInput) as info:
        reg.register(ASSET, b"m", {"metrics": {}}, _ref())
    assert info.value.field == "card.feature_names"
    with pytest.raises(InvalidInput) as info:
        reg.register(ASSET, b"m", _card(1.0), _ref(), alias="best")
    assert info.value.field == "alias"
    with pytest.raises(InvalidInput) as info:
        reg.register(ASSET, b"m", _card(1.0), _ref(), extra_files={"../x": b""})
    assert info.value.field == "extra_files"
    assert reg.list(ASSET) == []


def test_compare_reports_numeric_metric_diffs(reg: ModelRegistry) -> None:
    a = reg.register(ASSET, b"m", _card(2.0), _ref(), alias="champion")
    b = reg.register(ASSET, b"m", _card(1.5), _ref(), alias="challenger")
    diff = reg.compare(ASSET, "champion", b)
    assert diff["mae"] == {"a": 2.0, "b": 1.5, "diff": -0.5}
    assert diff["pinball"]["diff"] == pytest.approx(-0.25)
    assert "validation" not in diff  # nested dicts are not numbers
    assert reg.resolve(ASSET, "champion") == a


def test_non_finite_card_values_become_null(reg: ModelRegistry) -> None:
    v = reg.register(ASSET, b"m", _card(float("nan"), extra=float("inf")), _ref())
    text = (reg.path(ASSET, v) / "card.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert reg.card(ASSET, v)["metrics"]["mae"] is None


def test_concurrent_alias_writers_lose_no_update(reg: ModelRegistry) -> None:
    versions = [reg.register(ASSET, b"m", _card(float(i)), _ref()) for i in range(3)]
    errors: list[BaseException] = []

    def writer(alias: str, rounds: int) -> None:
        try:
            for i in range(rounds):
                reg.set_alias(ASSET, alias, versions[i % len(versions)])
                json.loads((reg.root / ASSET / "aliases.json").read_text())  # always whole
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(a, 30)) for a in ALIASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Every writer's last write survived: none overwrote another alias with a stale copy.
    assert reg.aliases(ASSET) == {a: versions[29 % 3] for a in ALIASES}
    lines = (reg.root / ASSET / "alias_history.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 30


def test_registry_pickles_and_root_follows_settings(reg: ModelRegistry, tmp_path: Path) -> None:
    v = reg.register(ASSET, b"m", _card(1.0), _ref(), alias="champion")
    clone = pickle.loads(pickle.dumps(reg))
    assert clone.resolve(ASSET, "champion") == v
    s = load_settings(env={}, overrides=[f"data_dir={tmp_path}"])
    assert registry_root(s) == tmp_path / "registry"
    s_abs = load_settings(env={}, overrides=[f"model.registry_dir={tmp_path / 'abs'}"])
    assert registry_root(s_abs) == tmp_path / "abs"


def test_share_registers_one_model_for_many_assets(reg: ModelRegistry) -> None:
    v = reg.register("BTC-USD", b"onnx-bytes", _card(1.0), _ref(), alias="champion",
                     extra_files={"model.ubj": b"native"})
    before = reg.changed_ns()
    assert reg.share("BTC-USD", v, ["BTC-USD", "ETH-USD", "SOL-USD"]) == 2
    for asset in ("ETH-USD", "SOL-USD"):
        assert reg.aliases(asset) == {"champion": v}
        card = reg.card(asset, v)
        assert card["asset"] == asset and card["shared_from"] == f"BTC-USD/{v}"
        assert reg.model_bytes(asset, v) == b"onnx-bytes"
        # Hard links: one copy of the model on disk, whatever the number of assets.
        assert (reg.path(asset, v) / "model.onnx").stat().st_ino == \
            (reg.path("BTC-USD", v) / "model.onnx").stat().st_ino
    assert reg.changed_ns() >= before > 0  # watchers see the alias moves
    assert reg.share("BTC-USD", v, ["ETH-USD"]) == 0  # already there: left as it is
    with pytest.raises(NotFound):
        reg.share("BTC-USD", "nope", ["ETH-USD"])
