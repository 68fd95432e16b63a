"""Ray's failures as one line that says what to do (tickcast/ray_runtime.py), without a cluster:
the explanations of the exceptions ``ray.init`` raises, the reachability check against real
ports of this machine, and the stderr and SIGTERM-handler care around ``ray.init``."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tickcast.config import load_settings
from tickcast.errors import RayUnavailable
from tickcast.net import free_port
from tickcast.ray_runtime import (
    _stderr_captured,
    address_source,
    explain_init_failure,
    init_errors,
    require_reachable,
)

# What ray.init raised on this machine when a token cluster refused a client (Ray 2.60).
AUTH_CAUSE = ("Failed to connect to GCS. Last connection error: Traceback ...\n"
              "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication "
              "token is missing or incorrect.")


def _failed_init(cause: str) -> ConnectionError:
    try:
        try:
            raise RuntimeError(cause)
        except RuntimeError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from inner
    except ConnectionError as exc:
        return exc


@pytest.fixture
def no_ray_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token


def test_refused_authentication_without_a_token(no_ray_env: None, tmp_path) -> None:
    err = explain_init_failure(_failed_init(AUTH_CAUSE), "", "127.0.0.1:6379", None)
    assert isinstance(err, RayUnavailable) and err.field == "ingest.ray_address"
    assert err.message.startswith(f"the Ray cluster at 127.0.0.1:6379 (recorded by `ray start` in "
                                  f"{tmp_path}")
    assert "refused authentication" in err.message and "this shell has no token" in err.message
    assert "export RAY_AUTH_MODE=token" in err.message and "--set ingest.ray_address=local" in err.message
    assert "\n" not in err.message


def test_refused_authentication_with_a_wrong_token(no_ray_env: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
    # Only Ray's own warnings (captured stderr) name the cause: still recognised.
    err = explain_init_failure(_failed_init("Failed to connect to GCS."),
                               "gcs_client.cc:210: Unauthenticated: RPC error", "10.0.0.5:6379", None)
    assert "10.0.0.5:6379 (RAY_ADDRESS) refused authentication" in err.message
    assert "is not the cluster's" in err.message


def test_other_failures_name_the_last_cause_and_a_private_start_is_told_apart(no_ray_env: None) -> None:
    settings = load_settings(overrides=["ingest.ray_address=10.1.1.1:6379"])
    err = explain_init_failure(_failed_init("Timed out while waiting for GCS to become available."),
                               "", "10.1.1.1:6379", settings)
    assert err.message.startswith("could not connect to the Ray cluster at 10.1.1.1:6379 "
                                  "(ingest.ray_address): Timed out while waiting for GCS")
    local = explain_init_failure(OSError("No space left on device"), "", "local", None)
    assert local.message == "could not start a private Ray instance: No space left on device"


def test_address_source(no_ray_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert address_source(load_settings(overrides=["ingest.ray_address=h:1"])) == "ingest.ray_address"
    assert address_source(None) == f"recorded by `ray start` in {tmp_path / 'ray' / 'ray_current_cluster'}"
    monkeypatch.setenv("RAY_ADDRESS", "h:1")
    assert address_source(None) == "RAY_ADDRESS"


def test_require_reachable_answers_within_its_timeout(no_ray_env: None) -> None:
    port = free_port()
    settings = load_settings(overrides=[f"ingest.ray_address=127.0.0.1:{port}",
                                        "ingest.ray_connect_timeout_s=0.5"])
    with pytest.raises(RayUnavailable, match=f"the Ray cluster at 127.0.0.1:{port} "
                                             r"\(ingest.ray_address\) is not reachable: "
                                             r"Connection refused for 0.5 s"):
        require_reachable(f"127.0.0.1:{port}", settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        require_reachable(f"ray://127.0.0.1:{s.getsockname()[1]}", settings)  # no error
    require_reachable("head-node", settings)  # no port to check: ray.init judges it


def test_ray_init_output_is_held_and_replayed_only_on_success(capfd: pytest.CaptureFixture[str]) -> None:
    with _stderr_captured() as out:
        os.write(2, b"Connected to Ray cluster.\n")
    assert out == ["Connected to Ray cluster.\n"]
    assert capfd.readouterr().err == "Connected to Ray cluster.\n"
    with pytest.raises(ValueError), _stderr_captured() as out:
        os.write(2, b"W gcs_client.cc: retrying\n")
        raise ValueError
    assert out == ["W gcs_client.cc: retrying\n"] and capfd.readouterr().err == ""


def test_init_errors_keeps_the_callers_sigterm_handler() -> None:
    def ours(*_: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        with init_errors("local", None):
            signal.signal(signal.SIGTERM, lambda *_: None)  # as ray.init does
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
