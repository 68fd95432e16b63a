"""Traffic routing between the blue and green model slots (pure: no Ray, no Redis).

Every asset has two model slots, ``blue`` and ``green``, each holding a registry version (or
nothing). An :class:`AssetRoute` says which version each slot holds, which share of requests
goes to green (``green_weight``; the rest goes to blue) and whether shadow mode mirrors every
request to the other slot. A :class:`RoutingTable` is the versioned set of routes of all
assets; it is immutable, so a serving replica swaps a whole table in one reference assignment.

Stickiness
----------
A client that sends a request key (``X-Request-Key``) always lands in the same group: the key
is hashed to a fixed point ``u`` in ``[0, 1)`` (:func:`sticky_unit`) and the request goes to
green when ``u < green_weight``. This is consistent hashing onto two arcs of the unit circle:
raising the green weight from 0.1 to 0.2 moves only the keys in ``[0.1, 0.2)`` to green, and
no key ever flips from green back to blue while the weight only grows, so A/B groups stay
stable through a ramp. Requests without a key draw ``u`` at random.

Champion and idle slot
----------------------
The *champion* slot is the one that takes the majority of the traffic (green when
``green_weight > 0.5``, blue otherwise); the other one is *idle* (it may still take a canary
share or shadow traffic). A promotion routes all traffic to the promoted version, loading it
into the idle slot first when neither slot holds it; the demoted champion stays loaded in the
other slot, so a rollback is a weight flip with no model load.

Examples
--------
>>> route = AssetRoute(blue="v1", green="v2", green_weight=0.25)
>>> route.champion_slot, route.idle_slot
('blue', 'green')
>>> [route.choose(u) for u in (0.1, 0.3)]
['green', 'blue']
>>> promoted = route.promote("v2")
>>> promoted.green_weight, promoted.champion_slot, promoted.version("blue")
(1.0, 'green', 'v1')
>>> round(sticky_unit("client-42"), 6)  # the same on every replica and host
0.542881
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from tickcast.errors import InvalidInput

SLOTS: tuple[str, str] = ("blue", "green")
_TWO_64 = float(2**64)


def other_slot(slot: str) -> str:
    """The slot that is not ``slot``.

    Raises
    ------
    InvalidInput
        ``slot`` is neither ``blue`` nor ``green``.
    """
    if slot == "blue":
        return "green"
    if slot == "green":
        return "blue"
    raise InvalidInput(f"slot must be 'blue' or 'green', got {slot!r}", field="slot")


def sticky_unit(key: str | bytes, salt: str = "") -> float:
    """Map a request key to a fixed point in ``[0, 1)`` (64-bit BLAKE2b, salted).

    The same key and salt always give the same point, on every replica and every host
    (unlike Python's ``hash``, which is randomized per process).

    Examples
    --------
    >>> sticky_unit("client-42") == sticky_unit(b"client-42")
    True
    >>> 0.0 <= sticky_unit("anything", salt="exp-7") < 1.0
    True
    """
    raw = key.encode() if isinstance(key, str) else bytes(key)
    digest = hashlib.blake2b(raw, digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / _TWO_64


def _check_weight(value: Any, name: str = "green_weight") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{name} must be a number in [0, 1], got {value!r}", field=name)
    w = float(value)
    if not math.isfinite(w) or not 0.0 <= w <= 1.0:
        raise InvalidInput(f"{name} must be in [0, 1], got {value!r}", field=name)
    return w


def _check_version(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 128:
        raise InvalidInput(f"{name} must be a version string or null, got {value!r}", field=name)
    return value


@dataclass(frozen=True)
class AssetRoute:
    """The two slots of one asset and how traffic is split between them.

    Parameters
    ----------
    blue, green
        Registry version held by each slot (None: empty slot).
    green_weight
        Share of requests served by green, in ``[0, 1]``.
    shadow
        Mirror every request to the other slot (its prediction is logged, never returned).
    registry_champion
        The registry's champion alias when serving last followed it. Only a *change* of the
        alias moves traffic (see :func:`reconcile`), so weights an operator set by hand are
        never overridden by an alias that did not change.

    Raises
    ------
    InvalidInput
        A weight outside ``[0, 1]`` or a malformed version, naming the field.
    """

    blue: str | None = None
    green: str | None = None
    green_weight: float = 0.0
    shadow: bool = False
    registry_champion: str | None = None

    def __post_init__(self) -> None:
        _check_version(self.blue, "blue")
        _check_version(self.green, "green")
        _check_version(self.registry_champion, "registry_champion")
        object.__setattr__(self, "green_weight", _check_weight(self.green_weight))
        if not isinstance(self.shadow, bool):
            raise InvalidInput(f"shadow must be true or false, got {self.shadow!r}", field="shadow")

    # ------------------------------------------------------------------ reading
    def version(self, slot: str) -> str | None:
        """Version held by ``slot``."""
        other_slot(slot)  # validates the name
        return self.blue if slot == "blue" else self.green

    def slot_of(self, version: str) -> str | None:
        """The slot holding ``version`` (blue first when both do), or None."""
        if self.blue == version:
            return "blue"
        if self.green == version:
            return "green"
        return None

    @property
    def versions(self) -> tuple[str, ...]:
        """Distinct versions held by the slots."""
        return tuple(dict.fromkeys(v for v in (self.blue, self.green) if v is not None))

    @property
    def servable(self) -> bool:
        """True when at least one slot holds a version."""
        return self.blue is not None or self.green is not None

    @property
    def champion_slot(self) -> str:
        """The slot taking the majority of traffic (an empty slot never is the champion)."""
        slot = "green" if self.green_weight > 0.5 else "blue"
        if self.version(slot) is None and self.version(other_slot(slot)) is not None:
            return other_slot(slot)
        return slot

    @property
    def idle_slot(self) -> str:
        """The slot that is not the champion."""
        return other_slot(self.champion_slot)

    @property
    def champion(self) -> str | None:
        """Version of the champion slot."""
        return self.version(self.champion_slot)

    def choose(self, u: float) -> str:
        """Slot serving a request whose hash point is ``u`` in ``[0, 1)``.

        Green when ``u < green_weight``; an empty slot hands its share to the other one.
        """
        slot = "green" if u < self.green_weight else "blue"
        if self.version(slot) is None:
            return other_slot(slot)
        return slot

    def shadow_of(self, served: str) -> str | None:
        """Slot to mirror a request served by ``served`` to, or None.

        None when shadow mode is off, the other slot is empty, or it holds the very same
        version (the mirrored prediction would be identical).
        """
        if not self.shadow:
            return None
        other = other_slot(served)
        v = self.version(other)
        if v is None or v == self.version(served):
            return None
        return other

    # ------------------------------------------------------------------ changing
    def with_traffic(self, green_weight: float | None = None, shadow: bool | None = None) -> "AssetRoute":
        """A copy with a new green weight and/or shadow flag (None keeps the current one)."""
        return replace(
            self,
            green_weight=self.green_weight if green_weight is None else _check_weight(green_weight),
            shadow=self.shadow if shadow is None else shadow,
        )

    def all_to(self, slot: str) -> "AssetRoute":
        """A copy routing every request to ``slot``."""
        if self.version(slot) is None:
            raise InvalidInput(f"slot {slot} holds no model", field="slot")
        return replace(self, green_weight=1.0 if slot == "green" else 0.0)

    def load_idle(self, version: str, *, make_champion: bool) -> "AssetRoute":
        """Put ``version`` into the idle slot.

        With ``make_champion`` all traffic moves to it; otherwise it takes no traffic (it only
        sees shadow traffic until the weights change), whatever share the idle slot had.
        """
        _check_version(version, "version")
        idle = self.idle_slot
        if self.blue is None and self.green is None:
            idle = "blue"  # an empty route fills blue first
        loaded = replace(self, **{idle: version})
        if make_champion:
            return loaded.all_to(idle)
        return replace(loaded, green_weight=0.0 if idle == "green" else 1.0)

    def promote(self, version: str) -> "AssetRoute":
        """Route all traffic to ``version``, loading it into the idle slot when no slot holds it."""
        slot = self.slot_of(version)
        if slot is not None:
            return self.all_to(slot)
        return self.load_idle(version, make_champion=True)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"blue": self.blue, "green": self.green, "green_weight": self.green_weight,
                "shadow": self.shadow, "registry_champion": self.registry_champion}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "route") -> "AssetRoute":
        """Parse :meth:`to_dict` output.

        Raises
        ------
        InvalidInput
            Missing/extra keys or bad values, naming ``where.<key>``.
        """
        if not isinstance(data, Mapping):
            raise InvalidInput(f"{where} must be an object", field=where)
        extra = set(data) - {"blue", "green", "green_weight", "shadow", "registry_champion"}
        if extra:
            raise InvalidInput(f"{where} has unknown keys {sorted(extra)}", field=where)
        try:
            return cls(blue=data.get("blue"), green=data.get("green"),
                       green_weight=data.get("green_weight", 0.0),
                       shadow=data.get("shadow", False),
                       registry_champion=data.get("registry_champion"))
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: {exc.message}", field=f"{where}.{exc.field}") from None


def reconcile(route: AssetRoute | None, aliases: Mapping[str, str], versions: Sequence[str],
              shadow_default: bool = False) -> AssetRoute | None:
    """Bring an asset's route in line with its registry aliases (deterministic).

    Every replica may run this; all reach the same answer, so concurrent writers agree.

    Rules, in order:

    1. No route yet: blue takes the champion (else the newest version), green the challenger
       (else the previous champion, else the same version as blue); all traffic on blue.
    2. The champion alias changed since serving last followed it (``registry_champion``):
       route everything to it, loading it into the idle slot when no slot holds it. This is how
       a promotion or rollback made directly in the registry reaches serving. An alias that did
       not change moves nothing, so hand-set weights (a canary above 50 %) stay as they are.
    3. The challenger alias names a version held by no slot: load it into the idle slot with no
       traffic (shadow mode, when on, starts mirroring to it at once).

    Parameters
    ----------
    route
        Current route (None when the asset has none).
    aliases
        Registry aliases of the asset (``champion``, ``challenger``, ``previous``).
    versions
        All registered versions, oldest first.
    shadow_default
        Shadow flag of a newly created route.

    Returns
    -------
    AssetRoute or None
        The reconciled route; None when the asset has no model at all.

    Examples
    --------
    >>> r = reconcile(None, {"champion": "v1"}, ["v1"])
    >>> (r.blue, r.green, r.green_weight)
    ('v1', 'v1', 0.0)
    >>> r = reconcile(r, {"champion": "v1", "challenger": "v2"}, ["v1", "v2"])
    >>> (r.blue, r.green, r.green_weight)
    ('v1', 'v2', 0.0)
    >>> r = reconcile(r, {"champion": "v2", "previous": "v1"}, ["v1", "v2"])
    >>> (r.champion_slot, r.champion)
    ('green', 'v2')
    """
    champion = aliases.get("champion")
    challenger = aliases.get("challenger")
    if route is None or not route.servable:
        first = champion or (versions[-1] if versions else None)
        if first is None:
            return None
        second = challenger if challenger not in (None, first) else aliases.get("previous") or first
        return AssetRoute(blue=first, green=second, green_weight=0.0, shadow=shadow_default,
                          registry_champion=champion)
    if champion is not None and champion != route.registry_champion:
        route = replace(route.promote(champion), registry_champion=champion)
    if challenger is not None and challenger != route.champion and route.slot_of(challenger) is None:
        route = route.load_idle(challenger, make_champion=False)
    return route


@dataclass(frozen=True)
class RoutingTable:
    """All assets' routes at one revision (immutable; replaced whole on every change).

    Parameters
    ----------
    rev
        Revision number, incremented by every committed change.
    routes
        Asset → :class:`AssetRoute`.
    """

    rev: int = 0
    routes: Mapping[str, AssetRoute] = field(default_factory=dict)

    def get(self, asset: str) -> AssetRoute | None:
        """Route of ``asset`` or None."""
        return self.routes.get(asset)

    @property
    def assets(self) -> tuple[str, ...]:
        """Routed assets, sorted."""
        return tuple(sorted(self.routes))

    def required_versions(self) -> set[tuple[str, str]]:
        """Every ``(asset, version)`` a replica must hold loaded to serve this table."""
        return {(a, v) for a, r in self.routes.items() for v in r.versions}

    def with_routes(self, updates: Mapping[str, AssetRoute | None]) -> "RoutingTable":
        """A copy with routes replaced (None removes an asset); the revision is unchanged."""
        routes = dict(self.routes)
        for asset, route in updates.items():
            if route is None:
                routes.pop(asset, None)
            else:
                routes[asset] = route
        return RoutingTable(rev=self.rev, routes=routes)

    def with_rev(self, rev: int) -> "RoutingTable":
        """A copy at revision ``rev``."""
        return RoutingTable(rev=int(rev), routes=dict(self.routes))

    def to_json(self) -> str:
        """Compact JSON (sorted keys, so equal tables serialize identically)."""
        return json.dumps({"rev": self.rev, "routes": {a: r.to_dict() for a, r in self.routes.items()}},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "RoutingTable":
        """Parse :meth:`to_json` output.

        Raises
        ------
        InvalidInput
            Not JSON, or a route with bad values (the message names the asset and key).
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"routing table is not JSON: {exc}", field="routing") from None
        if not isinstance(data, dict) or not isinstance(data.get("routes"), dict):
            raise InvalidInput("routing table must be an object with 'routes'", field="routing")
        rev = data.get("rev", 0)
        if isinstance(rev, bool) or not isinstance(rev, int) or rev < 0:
            raise InvalidInput(f"routing rev must be a non-negative integer, got {rev!r}",
                               field="routing.rev")
        routes = {str(a): AssetRoute.from_dict(r, where=f"routes.{a}") for a, r in data["routes"].items()}
        return cls(rev=rev, routes=routes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTable):
            return NotImplemented
        return self.rev == other.rev and dict(self.routes) == dict(other.routes)

    def __hash__(self) -> int:
        return hash((self.rev, tuple(sorted(self.routes.items()))))


def apply_traffic(table: RoutingTable, assets: Iterable[str], green_weight: float | None,
                  shadow: bool | None) -> RoutingTable:
    """Set the green weight and/or shadow flag of ``assets`` (routes must exist).

    Raises
    ------
    InvalidInput
        A weight outside ``[0, 1]``, or a green weight > 0 for an asset whose green slot is
        empty (its traffic would silently stay on blue).
    """
    updates: dict[str, AssetRoute] = {}
    for asset in assets:
        route = table.routes[asset]
        if green_weight is not None and _check_weight(green_weight) > 0 and route.green is None:
            raise InvalidInput(f"{asset}: the green slot holds no model", field="green_weight")
        if green_weight is not None and green_weight < 1 and route.blue is None:
            raise InvalidInput(f"{asset}: the blue slot holds no model", field="green_weight")
        updates[asset] = route.with_traffic(green_weight, shadow)
    return table.with_routes(updates)
