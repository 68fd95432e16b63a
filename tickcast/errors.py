"""One error hierarchy for the whole system, each error carrying an HTTP status.

The serving API maps these to responses; the CLI prints them as ``error: <reason>`` with exit
code 2. Errors name the field or asset at fault so a client can fix its input.
"""

from __future__ import annotations

from enum import IntEnum


class TickcastError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"error": self.code, "detail": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class ConfigError(TickcastError):
    status = 500
    code = "config"


class InvalidInput(TickcastError):
    """A client's input is malformed (HTTP 422)."""

    status = 422
    code = "invalid_input"


class UnknownAsset(TickcastError):
    status = 404
    code = "unknown_asset"


class NotFound(TickcastError):
    status = 404
    code = "not_found"


class Unauthorized(TickcastError):
    status = 401
    code = "unauthorized"


class Forbidden(TickcastError):
    status = 403
    code = "forbidden"


class ServiceUnavailable(TickcastError):
    """No model loaded, features too stale, dependency down (HTTP 503)."""

    status = 503
    code = "unavailable"


class CircuitOpen(ServiceUnavailable):
    code = "circuit_open"


class RayUnavailable(ServiceUnavailable):
    """Ray cannot be reached, refuses this process's credentials, or cannot start here."""

    code = "ray_unavailable"


class RedisUnavailable(ServiceUnavailable):
    """The configured Redis does not answer, or refuses the credentials in its URL."""

    code = "redis_unavailable"


class PortInUse(ServiceUnavailable):
    """A port this command must listen on is taken by another process."""

    code = "port_in_use"


class NotWritable(ConfigError):
    """A directory the command must write to (the data dir) cannot be written."""

    code = "not_writable"


class NotRunning(NotFound):
    """No server runs for the data dir a command names (``tickcast down``)."""

    code = "not_running"


class RegistryError(TickcastError):
    code = "registry"


class ParityError(RegistryError):
    """An exported model disagrees with its source model beyond tolerance."""

    code = "parity"


class TickStatus(IntEnum):
    """Per-tick outcome, stored as ``uint8`` alongside a :class:`~tickcast.ticks.TickBatch`.

    Values 1-6 are rejections (reason codes); 7+ are ticks that were well formed but not used
    for consensus (counted separately). ``OK`` ticks are accepted.
    """

    OK = 0
    NULL = 1
    NON_FINITE = 2
    NON_POSITIVE = 3
    CROSSED = 4
    UNKNOWN_ASSET = 5
    MALFORMED = 6
    DUPLICATE = 7
    OUTLIER = 8
    LATE = 9
    FROZEN = 10

    @property
    def is_rejection(self) -> bool:
        return 1 <= self.value <= 6


REJECTION_REASONS: tuple[str, ...] = tuple(
    s.name.lower() for s in TickStatus if s.is_rejection
)
