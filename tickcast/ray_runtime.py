"""Connect to Ray the same way on a laptop, in a test session and on a cluster.

Three situations, one call (:func:`connect_ray`):

* **Already connected** (a test session, a Ray job's driver that called ``ray.init`` itself,
  the demo): nothing to do.
* **A cluster is up**: ``RAY_ADDRESS`` is set (``ray job submit`` sets it for the job's driver)
  or this node ran ``ray start``. We connect to it. Inside a submitted job the job's
  ``runtime_env`` (``--working-dir .``) is inherited, so we add none; from outside a job we ship
  the project directory as ``working_dir`` so that every node imports the same code.
* **Nothing running**: a local Ray instance for this process, ended by :func:`disconnect_ray`.

We deliberately never pass ``address="auto"``: on a shared machine Ray's legacy "auto" attaches
to *any* running Ray process (another user's test session). Ray's own default discovery
(``RAY_ADDRESS``, then the address ``ray start`` recorded) is the "cluster is up" test we want.
``ingest.ray_address`` overrides it: ``"local"`` forces a private instance, anything else is an
explicit address.

Every named actor of the project lives in the :data:`NAMESPACE` namespace; helpers pass it
explicitly so they work whatever namespace the driver was started with.

A cluster that cannot be reached or refuses authentication, and a private instance that cannot
start, raise :class:`~tickcast.errors.RayUnavailable` naming the address, where it came from
and what to do (:func:`require_reachable`, :func:`init_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tickcast.config import Settings
from tickcast.errors import RayUnavailable
from tickcast.ray_auth import attach_token_auth
from tickcast.signals import Interrupted

NAMESPACE = "tickcast"
ROOT = Path(__file__).resolve().parent.parent

# Never shipped to cluster nodes with working_dir: environments, local state, caches.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".venv", ".git", "data", "registry", "reports", "**/__pycache__", ".pytest_cache",
    "*.egg-info", ".tickcast",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConnection:
    """How this process is attached to Ray.

    Attributes
    ----------
    started
        True when :func:`connect_ray` started a private local instance (so it must end it).
    address
        The cluster address connected to (``"local"`` for a private instance, ``""`` when the
        process was already connected).
    """

    started: bool
    address: str


def in_ray_job() -> bool:
    """True when this process is the driver of a ``ray job submit`` job."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_JOB_ID"))


def _cluster_address(settings: Settings | None) -> str | None:
    """The address to join, or None when no cluster is up (start a private instance)."""
    configured = settings.ingest.ray_address if settings is not None else None
    if configured:
        return None if configured == "local" else configured
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private.services import find_bootstrap_address  # the address `ray start` wrote

    try:
        return find_bootstrap_address(None)
    except OSError:
        return None


def will_start_private(settings: Settings | None = None) -> bool:
    """True when :func:`connect_ray` would start a private local instance (no cluster is up
    and this process is not attached yet)."""
    import ray

    return not ray.is_initialized() and _cluster_address(settings) is None


def connect_ray(settings: Settings | None = None, *, num_cpus: int | None = None,
                log_to_driver: bool = False) -> RayConnection:
    """Attach this process to Ray (see the module docstring for the policy).

    Parameters
    ----------
    settings
        Reads ``ingest.ray_address`` (None: discover; ``"local"``: private instance; else an
        address).
    num_cpus
        CPUs of a private local instance (default: all of this machine's).
    log_to_driver
        Forward actor logs to this process's terminal. Off by default: commands promise a JSON
        last line on stdout, and asynchronous worker logs would interleave with it.

    Returns
    -------
    RayConnection
        ``started`` tells the caller whether to call :func:`disconnect_ray` at the end.
    """
    import ray

    if ray.is_initialized():
        return RayConnection(started=False, address="")
    address = _cluster_address(settings)
    if address is not None:
        attach_token_auth()  # a cluster from `ray start --head` may want its token (tickcast.ray_auth)
        kwargs: dict[str, object] = {"address": address, "namespace": NAMESPACE,
                                     "log_to_driver": log_to_driver}
        if not in_ray_job():
            kwargs["runtime_env"] = {"working_dir": str(ROOT),
                                     "excludes": list(WORKING_DIR_EXCLUDES)}
        require_reachable(address, settings)
        with init_errors(address, settings):
            ray.init(**kwargs)  # type: ignore[arg-type]
        log.info("connected to Ray cluster at %s", address)
        return RayConnection(started=False, address=address)
    # A private instance on this machine: workers import the editable install; PYTHONPATH makes
    # the top-level packages (actors/, training/) importable even from a plain checkout.
    with init_errors("local", settings):
        ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=log_to_driver,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    return RayConnection(started=True, address="local")


def disconnect_ray(conn: RayConnection) -> None:
    """End the private instance :func:`connect_ray` started; leave shared ones alone."""
    import ray

    if conn.started and ray.is_initialized():
        ray.shutdown()


# -- failures, as one line that says what to do ----------------------------------------------------
# Ray retries a cluster it cannot reach for minutes (20 attempts of up to 40 s each on this
# machine) and writes a warning line per attempt; an authentication failure takes 20 s of
# retries. The checks below answer at once where they can, and turn whatever ``ray.init``
# raises into a :class:`~tickcast.errors.RayUnavailable` naming the address, where it came
# from, and the fix.

_AUTH_MARKERS: tuple[str, ...] = ("InvalidAuthToken", "Unauthenticated", "AuthenticationError",
                                  "Authentication token")
_PRIVATE_HINT = "or run on a private Ray instance with --set ingest.ray_address=local"


def address_source(settings: Settings | None) -> str:
    """Where the cluster address came from, as a user would change it."""
    if settings is not None and settings.ingest.ray_address:
        return "ingest.ray_address"
    if os.environ.get("RAY_ADDRESS"):
        return "RAY_ADDRESS"
    try:
        from ray._common.utils import get_ray_address_file

        recorded = get_ray_address_file(None)
    except Exception:  # noqa: BLE001 - a Ray without this helper: name the convention
        recorded = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    return f"recorded by `ray start` in {recorded}"


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a cluster address (``ray://`` and ``[v6]`` forms too), None if it has none.

    >>> _host_port("ray://10.0.0.5:10001"), _host_port("[::1]:6379"), _host_port("head")
    (('10.0.0.5', 10001), ('::1', 6379), None)
    """
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def require_reachable(address: str, settings: Settings | None) -> None:
    """Raise :class:`RayUnavailable` unless the cluster's port accepts a TCP connection within
    ``ingest.ray_connect_timeout_s`` (retried meanwhile: a head may be restarting)."""
    target = _host_port(address)
    if target is None:
        return  # an address form we do not parse: ray.init judges it
    timeout_s = settings.ingest.ray_connect_timeout_s if settings is not None else 10.0
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(target, timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise RayUnavailable(
        f"the Ray cluster at {address} ({address_source(settings)}) is not reachable: "
        f"{reason} for {timeout_s:g} s; start it, or point RAY_ADDRESS at a running one, "
        f"{_PRIVATE_HINT}", field="ingest.ray_address")


def _token_configured() -> bool:
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.exists(token_file)


def explain_init_failure(exc: BaseException, ray_output: str, address: str,
                         settings: Settings | None) -> RayUnavailable:
    """The :class:`RayUnavailable` for a failed ``ray.init`` (``address`` ``"local"``: a private
    instance that did not start). ``ray_output`` is what Ray wrote to stderr meanwhile."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = "\n".join([ray_output, *(f"{type(e).__name__}: {e}" for e in chain)])
    last = str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__]
    reason = last[-1][:300]
    if address == "local":
        return RayUnavailable(f"could not start a private Ray instance: {reason}",
                              field="ingest.ray_address")
    where = f"the Ray cluster at {address} ({address_source(settings)})"
    if any(marker in text for marker in _AUTH_MARKERS):
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or not _token_configured():
            have = "this shell has no token for it (RAY_AUTH_MODE=token and a token are not set)"
        else:
            have = ("the token this shell has (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                    "~/.ray/auth_token) is not the cluster's")
        return RayUnavailable(
            f"{where} refused authentication: it uses token authentication and {have}; export "
            f"RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or a file in "
            f"RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head node prints it), "
            f"{_PRIVATE_HINT}", field="ingest.ray_address")
    return RayUnavailable(f"could not connect to {where}: {reason}; check that it runs and "
                          f"that this Ray ({_ray_version()}) matches its version, {_PRIVATE_HINT}",
                          field="ingest.ray_address")


def _ray_version() -> str:
    import ray

    return f"Ray {ray.__version__}"


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Hold what is written to file descriptor 2 in the block (Ray's C++ core writes there);
    yields a list that receives the text. Replayed to stderr unless the block raised."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        ok = False
        try:
            yield out
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            data = buf.read()
            out.append(data.decode(errors="replace"))
            if ok and data:
                os.write(2, data)


@contextlib.contextmanager
def init_errors(address: str, settings: Settings | None) -> Iterator[None]:
    """Around ``ray.init``: its failure becomes a :class:`RayUnavailable` (after ending whatever
    it had started), its retry warnings stay off the terminal, and the caller's SIGTERM handler
    survives (``ray.init`` installs its own, which exits without the caller's clean-up)."""
    import ray

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    output: list[str] = []
    try:
        if address == "local":
            yield  # a private instance's processes inherit descriptor 2: leave it alone
        else:
            with _stderr_captured() as output:
                yield
    except BaseException as exc:  # an interrupt too: end what a half-done init started
        with contextlib.suppress(Exception):
            ray.shutdown()
        if isinstance(exc, Exception):
            raise explain_init_failure(exc, "".join(output), address, settings) from exc
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            # ray.init's own SIGTERM handler (active while it runs) exits with the number.
            raise Interrupted(signal.SIGTERM) from None
        raise
    finally:
        if main and callable(previous):
            signal.signal(signal.SIGTERM, previous)
