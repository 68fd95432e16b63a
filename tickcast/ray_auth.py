"""Attach to a Ray cluster with token authentication the way Ray's own tools do.

Ray 2.60's ``ray start --head`` turns token authentication on whenever a token exists on the
machine (``~/.ray/auth_token``, which any local ``ray.init()`` creates), and ``ray.init()``
turns it on for the client only when it finds the cluster by itself (``address=None``). tickcast
connects with an explicit address (``RAY_ADDRESS``, or the one ``ray start`` recorded: see
:mod:`tickcast.ray_runtime`), for which Ray leaves the client in "disabled" mode, so the GCS
refused every call ("InvalidAuthToken") until ``RAY_AUTH_MODE=token`` was exported.

:func:`attach_token_auth` closes that gap with Ray's own rule for ``ray start`` and
``ray.init()``: when ``RAY_AUTH_MODE`` is unset and Ray's token loader finds a token, this
process (and every process it starts) uses token mode. The token is looked up where Ray looks,
in this order (:func:`token_source` names the one that applies):

1. ``RAY_AUTH_TOKEN`` (the token itself),
2. ``RAY_AUTH_TOKEN_PATH`` (a file holding it),
3. ``~/.ray/auth_token`` (what ``ray start`` / ``ray get-auth-token --generate`` use).

An explicit ``RAY_AUTH_MODE`` (``token`` or ``disabled``) is always respected. A client in token
mode attaches to a cluster without authentication too (the token is sent and ignored), so the
rule cannot lock a user out of an open cluster.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

log = logging.getLogger(__name__)


class TokenSource(enum.Enum):
    """Where Ray's token loader finds the cluster token (first match wins)."""

    ENV = TOKEN_ENV
    PATH_ENV = TOKEN_PATH_ENV
    DEFAULT_FILE = "~/.ray/auth_token"


class AuthMode(enum.Enum):
    """Ray's client authentication modes (``RAY_AUTH_MODE``)."""

    TOKEN = "token"
    DISABLED = "disabled"


@dataclass(frozen=True)
class AuthSetup:
    """What :func:`attach_token_auth` found and did.

    Attributes
    ----------
    mode
        The mode this process now uses.
    source
        Where the token comes from (None when there is none).
    explicit
        True when ``RAY_AUTH_MODE`` was set by the user (then nothing was changed).
    """

    mode: AuthMode
    source: TokenSource | None
    explicit: bool

    def describe(self) -> str:
        """One line for logs and error messages."""
        how = f"{AUTH_MODE_ENV} set" if self.explicit else "discovered"
        where = f", token from {self.source.value}" if self.source is not None else ", no token"
        return f"ray auth {self.mode.value} ({how}{where})"


def default_token_file(home: Path | None = None) -> Path:
    """``~/.ray/auth_token``: where ``ray start`` and ``ray get-auth-token --generate`` keep it."""
    return (home if home is not None else Path.home()) / ".ray" / "auth_token"


def _non_empty_file(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def token_source(environ: Mapping[str, str] | None = None, home: Path | None = None) -> TokenSource | None:
    """Where a token would be loaded from, in Ray's order, or None.

    A set ``RAY_AUTH_TOKEN_PATH`` is authoritative, as in Ray: an unreadable or empty file
    there means no token, even when ``~/.ray/auth_token`` exists.

    Examples
    --------
    >>> token_source({"RAY_AUTH_TOKEN": "abc"}, home=Path("/nonexistent"))
    <TokenSource.ENV: 'RAY_AUTH_TOKEN'>
    >>> token_source({"RAY_AUTH_TOKEN_PATH": "/nonexistent/t"}, home=Path("/nonexistent")) is None
    True
    >>> token_source({}, home=Path("/nonexistent")) is None
    True
    """
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV, "").strip():
        return TokenSource.ENV
    if env.get(TOKEN_PATH_ENV):
        return TokenSource.PATH_ENV if _non_empty_file(Path(env[TOKEN_PATH_ENV]).expanduser()) else None
    return TokenSource.DEFAULT_FILE if _non_empty_file(default_token_file(home)) else None


def _ray_has_token() -> bool:
    """Ray's own loader's answer (the authority; :func:`token_source` only names the place)."""
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the loader caches; the token may have been written since
    return bool(loader.has_token(ignore_auth_mode=True))


def _enable_token_mode() -> None:
    """Token mode for this process and its children (Ray caches its config: refresh it)."""
    from ray._raylet import Config  # type: ignore[attr-defined]

    os.environ[AUTH_MODE_ENV] = AuthMode.TOKEN.value
    Config.initialize("")


def attach_token_auth() -> AuthSetup:
    """Before connecting to an existing cluster: use token mode when Ray would find a token.

    Call it before ``ray.init(address=...)`` or before building a ``JobSubmissionClient``.
    Idempotent.

    Returns
    -------
    AuthSetup
        The mode in effect and where the token comes from.
    """
    source = token_source()
    explicit = os.environ.get(AUTH_MODE_ENV)
    if explicit is not None:
        mode = AuthMode.TOKEN if explicit.strip().lower() == "token" else AuthMode.DISABLED
        return AuthSetup(mode=mode, source=source, explicit=True)
    if not _ray_has_token():
        return AuthSetup(mode=AuthMode.DISABLED, source=None, explicit=False)
    _enable_token_mode()
    setup = AuthSetup(mode=AuthMode.TOKEN, source=source, explicit=False)
    log.info("%s", setup.describe())
    return setup


__all__ = ["AUTH_MODE_ENV", "TOKEN_ENV", "TOKEN_PATH_ENV", "AuthMode", "AuthSetup", "TokenSource",
           "attach_token_auth", "default_token_file", "token_source"]
