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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tickcast.config import Settings
from tickcast.ray_auth import attach_token_auth

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
        ray.init(**kwargs)  # type: ignore[arg-type]
        log.info("connected to Ray cluster at %s", address)
        return RayConnection(started=False, address=address)
    # A private instance on this machine: workers import the editable install; PYTHONPATH makes
    # the top-level packages (actors/, training/) importable even from a plain checkout.
    ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=log_to_driver,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    return RayConnection(started=True, address="local")


def disconnect_ray(conn: RayConnection) -> None:
    """End the private instance :func:`connect_ray` started; leave shared ones alone."""
    import ray

    if conn.started and ray.is_initialized():
        ray.shutdown()
