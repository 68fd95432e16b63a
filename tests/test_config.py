"""Config layering and rejection of bad values."""

from pathlib import Path

import pytest

from tickcast.config import load_settings
from tickcast.errors import ConfigError


def test_defaults_load_and_match_file() -> None:
    s = load_settings(env={})
    assert s.bars.freq_s == 60
    assert s.assets == ("BTC-USD", "ETH-USD")


def test_env_and_cli_overrides_layer_in_order() -> None:
    env = {"TICKCAST__BARS__ALLOWED_LATENESS_S": "30", "REDIS_URL": "redis://:pw@h:1/0"}
    s = load_settings(env=env, overrides=["bars.allowed_lateness_s=45"])
    assert s.bars.allowed_lateness_s == 45
    assert s.redis.url == "redis://:pw@h:1/0"


@pytest.mark.parametrize(
    "override, field",
    [("bars.freq_s=0", "bars.freq_s"), ("bars.nope=1", "bars.nope"), ("gaps.interp_max_minutes=1", "gaps")],
)
def test_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides=[override])
    assert info.value.field is not None and info.value.field.startswith(field)


def test_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("bars: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", env={})
