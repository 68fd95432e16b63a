"""Token discovery (``tickcast.ray_auth``) agrees with Ray's own token loader.

Each case runs in a fresh interpreter: Ray's loader and config are process-wide singletons, and
switching this test process to token mode would change every later Ray test of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tickcast.ray_auth import TokenSource, token_source

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os
from tickcast.ray_auth import attach_token_auth, token_source
from ray._raylet import AuthenticationTokenLoader
from ray._private.authentication.authentication_utils import is_token_auth_enabled
try:
    ray_has = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
except Exception as exc:
    ray_has = type(exc).__name__
src = token_source()
setup = attach_token_auth()
print(json.dumps({"ray_has": ray_has, "source": src.name if src else None,
                  "mode": setup.mode.value, "explicit": setup.explicit,
                  "env_mode": os.environ.get("RAY_AUTH_MODE"), "ray_token_mode": is_token_auth_enabled()}))
"""


def _probe(home: Path, **env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(home), **env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=base, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path, Path]:
    with_token, without = tmp_path / "with", tmp_path / "without"
    (with_token / ".ray").mkdir(parents=True)
    (with_token / ".ray" / "auth_token").write_text("f" * 64 + "\n")
    without.mkdir()
    token_file = tmp_path / "elsewhere.token"
    token_file.write_text("e" * 64)
    return with_token, without, token_file


def test_token_source_order_is_rays(homes: tuple[Path, Path, Path]) -> None:
    with_token, without, token_file = homes
    assert token_source({}, home=with_token) is TokenSource.DEFAULT_FILE
    assert token_source({}, home=without) is None
    assert token_source({"RAY_AUTH_TOKEN": "x"}, home=without) is TokenSource.ENV
    assert token_source({"RAY_AUTH_TOKEN": " "}, home=without) is None
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home=without) is TokenSource.PATH_ENV
    # A set RAY_AUTH_TOKEN_PATH wins even when it is unreadable (Ray then has no token).
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(without / "nope")}, home=with_token) is None


@pytest.mark.parametrize("case", ["default_file", "none", "env", "path_env"])
def test_attach_matches_rays_loader_and_turns_token_mode_on(homes: tuple[Path, Path, Path],
                                                            case: str) -> None:
    with_token, without, token_file = homes
    home, env = {"default_file": (with_token, {}), "none": (without, {}),
                 "env": (without, {"RAY_AUTH_TOKEN": "d" * 64}),
                 "path_env": (without, {"RAY_AUTH_TOKEN_PATH": str(token_file)})}[case]
    got = _probe(home, **env)
    assert got["ray_has"] is (case != "none")
    assert (got["source"] is not None) is got["ray_has"]
    assert got["explicit"] is False
    if got["ray_has"]:
        # This process and its children now authenticate, as Ray's `ray.init()` would.
        assert got["mode"] == "token" and got["env_mode"] == "token" and got["ray_token_mode"] is True
    else:
        assert got["mode"] == "disabled" and got["env_mode"] is None and got["ray_token_mode"] is False


def test_an_explicit_mode_is_respected(homes: tuple[Path, Path, Path]) -> None:
    with_token, _without, _file = homes
    got = _probe(with_token, RAY_AUTH_MODE="disabled")
    assert got["explicit"] is True and got["mode"] == "disabled" and got["ray_token_mode"] is False
