"""The routing state's single source of truth (Redis) and the admin operations on it.

:class:`RoutingStore` keeps the :class:`~serve_app.routing.RoutingTable` in one Redis hash
(``<serve.redis_prefix>routing``: fields ``rev`` and ``doc``). Every change is an optimistic
compare-and-set (``WATCH`` / ``MULTI``) that bumps ``rev``, so concurrent writers (two replicas
handling admin calls, a reconcile pass, the closed-loop controller) never lose an update, and a
replica polls one small field to notice a change.

:class:`TrafficControl` is what the admin endpoints (and the closed-loop controller, without
HTTP) call: set weights and shadow mode, promote, roll back, and reconcile routes with the
model registry's aliases. Registry aliases change first (the registry's file lock orders them);
the routing table follows. Should the table write fail after the alias moved, the next
reconcile pass applies the same change (:func:`~serve_app.routing.reconcile`), so the two
converge.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import redis

from serve_app.routing import AssetRoute, RoutingTable, apply_traffic, reconcile
from tickcast.errors import (InvalidInput, NotFound, ServiceUnavailable, TickcastError,
                             UnknownAsset)
from training.registry import ALIASES_FILE, ModelRegistry


class Conflict(TickcastError):
    """The request is well formed but the current state forbids it (HTTP 409)."""

    status = 409
    code = "conflict"


class RoutingStore:
    """Versioned routing table in a Redis hash, changed only by compare-and-set.

    Parameters
    ----------
    client
        Redis client (bytes responses).
    prefix
        Key prefix (``serve.redis_prefix``); the table lives at ``<prefix>routing``.
    """

    def __init__(self, client: redis.Redis, prefix: str = "serve:") -> None:
        self.client = client
        self.key = f"{prefix}routing"

    def rev(self) -> int:
        """Current revision (0 when no table was ever written)."""
        raw = self.client.hget(self.key, "rev")
        return int(raw) if raw is not None else 0

    def load(self) -> RoutingTable:
        """The current table (an empty one at revision 0 when none exists).

        Raises
        ------
        ServiceUnavailable
            The stored document is unreadable.
        """
        rev, doc = self.client.hmget(self.key, ["rev", "doc"])
        return self._parse(rev, doc)

    def _parse(self, rev: bytes | None, doc: bytes | None) -> RoutingTable:
        if doc is None:
            return RoutingTable(rev=0, routes={})
        try:
            table = RoutingTable.from_json(doc)
        except InvalidInput as exc:
            raise ServiceUnavailable(f"routing table at {self.key} is unreadable: {exc.message}") from None
        return table.with_rev(int(rev or 0))

    def update(self, change: Callable[[RoutingTable], RoutingTable], retries: int = 100) -> RoutingTable:
        """Apply ``change`` atomically; returns the committed table (unchanged: no write).

        ``change`` may run several times (once per lost race) and must be a pure function of
        the table it is given. Exceptions it raises propagate (nothing is written).

        Raises
        ------
        ServiceUnavailable
            Still losing races after ``retries`` attempts.
        """
        for _ in range(retries):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.key)
                    rev, doc = pipe.hmget(self.key, ["rev", "doc"])
                    current = self._parse(rev, doc)
                    new = change(current)
                    if dict(new.routes) == dict(current.routes):
                        pipe.unwatch()
                        return current
                    committed = new.with_rev(current.rev + 1)
                    pipe.multi()
                    pipe.hset(self.key, mapping={"rev": committed.rev, "doc": committed.to_json()})
                    pipe.execute()
                    return committed
                except redis.WatchError:
                    continue  # another writer committed first: re-read and re-apply
        raise ServiceUnavailable(f"routing table {self.key}: too much write contention")


@dataclass(frozen=True)
class Change:
    """One asset's route before and after an admin action."""

    asset: str
    before: AssetRoute | None
    after: AssetRoute | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"asset": self.asset,
                "before": self.before.to_dict() if self.before else None,
                "after": self.after.to_dict() if self.after else None}


class TrafficControl:
    """Admin operations on the routing table, kept in step with the registry's aliases.

    Parameters
    ----------
    store
        The routing table.
    registry
        The model registry (aliases champion / challenger / previous).
    shadow_default
        Shadow flag of routes created for newly discovered assets.
    """

    def __init__(self, store: RoutingStore, registry: ModelRegistry, shadow_default: bool = False) -> None:
        self.store = store
        self.registry = registry
        self.shadow_default = shadow_default
        self._alias_stamp: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ helpers
    def _targets(self, table: RoutingTable, assets: Iterable[str] | None) -> list[str]:
        if assets is None:
            if not table.routes:
                raise ServiceUnavailable("no asset has a model loaded yet")
            return list(table.assets)
        out = list(dict.fromkeys(assets))
        for asset in out:
            if asset not in table.routes:
                raise UnknownAsset(f"no model route for asset '{asset}'", field="asset")
        return out

    @staticmethod
    def _changes(before: RoutingTable, after: RoutingTable, assets: Iterable[str]) -> list[Change]:
        return [Change(a, before.get(a), after.get(a)) for a in assets]

    # ------------------------------------------------------------------ operations
    def set_traffic(self, green_weight: float | None, shadow: bool | None,
                    assets: Iterable[str] | None = None) -> tuple[RoutingTable, list[Change]]:
        """Set the green weight and/or shadow flag of ``assets`` (default: all routed).

        Raises
        ------
        UnknownAsset
            An asset without a route.
        InvalidInput
            A weight out of range, or weight on an empty slot.
        """
        before = self.store.load()
        targets = self._targets(before, assets)
        after = self.store.update(lambda t: apply_traffic(t, self._targets(t, targets), green_weight, shadow))
        return after, self._changes(before, after, targets)

    def promote(self, asset: str | None = None, version: str | None = None
                ) -> tuple[RoutingTable, list[Change]]:
        """Make ``version`` (default: the idle slot's version) the champion of ``asset``.

        Without ``asset``, every routed asset whose idle slot holds another version than its
        champion is promoted (assets with nothing to promote are skipped; if none has, 409).
        The registry's aliases move first (``champion`` ← target, ``previous`` ← old
        champion), then all traffic moves to the target's slot, loading it into the idle slot
        when neither slot holds it.

        Raises
        ------
        UnknownAsset
            ``asset`` has no route.
        NotFound
            ``version`` is not a registered version or alias of ``asset``.
        Conflict
            Nothing to promote (the idle slot is empty or holds the champion).
        """
        before = self.store.load()
        if asset is None:
            plan = {}
            for a in self._targets(before, None):
                route = before.routes[a]
                candidate = route.version(route.idle_slot)
                if candidate is not None and candidate != route.champion:
                    plan[a] = candidate
            if not plan:
                raise Conflict("nothing to promote: no asset has another version in its idle slot",
                               field="asset")
        else:
            route = before.get(asset)
            if route is None:
                raise UnknownAsset(f"no model route for asset '{asset}'", field="asset")
            if version is None:
                target = route.version(route.idle_slot)
                if target is None or target == route.champion:
                    raise Conflict(f"nothing to promote for {asset}: its idle slot holds "
                                   f"{'no model' if target is None else 'the champion'}", field="version")
            else:
                target = self.registry.resolve(asset, version)
            plan = {asset: target}
        for a, target in plan.items():
            self.registry.promote(a, target)
        return self._route_to_champions(before, plan)

    def rollback(self, asset: str | None = None) -> tuple[RoutingTable, list[Change]]:
        """Make the registry's ``previous`` version champion again and route all traffic to it.

        Without ``asset``, every routed asset that has a ``previous`` alias is rolled back
        (409 when none has).

        Raises
        ------
        UnknownAsset
            ``asset`` has no route.
        Conflict
            No ``previous`` version to roll back to.
        """
        before = self.store.load()
        targets = self._targets(before, None if asset is None else [asset])
        plan: dict[str, str] = {}
        for a in targets:
            if "previous" not in self.registry.aliases(a):
                if asset is not None:
                    raise Conflict(f"nothing to roll back to for {a}: no previous champion",
                                   field="asset")
                continue
            try:
                plan[a] = self.registry.rollback(a)["champion"]
            except NotFound as exc:  # another writer rolled back first
                if asset is not None:
                    raise Conflict(exc.message, field="asset") from None
        if not plan:
            raise Conflict("nothing to roll back to: no asset has a previous champion", field="asset")
        return self._route_to_champions(before, plan)

    def _route_to_champions(self, before: RoutingTable, plan: dict[str, str]
                            ) -> tuple[RoutingTable, list[Change]]:
        """All traffic of each planned asset to its new champion (one compare-and-set)."""
        def change(t: RoutingTable) -> RoutingTable:
            updates = {}
            for a, target in plan.items():
                cur = t.get(a) or AssetRoute()
                updates[a] = replace(cur.promote(target), registry_champion=target)
            return t.with_routes(updates)

        after = self.store.update(change)
        return after, self._changes(before, after, plan)

    # ------------------------------------------------------------------ reconcile
    def _alias_changed(self, asset: str) -> bool:
        """Whether ``aliases.json`` of ``asset`` changed since the last look (stat only)."""
        try:
            st = os.stat(Path(self.registry.root) / asset / ALIASES_FILE)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0)
        if self._alias_stamp.get(asset) == stamp:
            return False
        self._alias_stamp[asset] = stamp
        return True

    def registry_assets(self) -> list[str]:
        """Asset directories of the registry (cheap: names only, versions not checked)."""
        root = Path(self.registry.root)
        if not root.is_dir():
            return []
        out = []
        for p in root.iterdir():
            if p.is_dir() and not p.name.startswith("."):
                out.append(p.name)
        return sorted(out)

    def reconcile(self, force: bool = False) -> RoutingTable:
        """Create routes for new assets and follow alias changes of known ones.

        Only assets whose ``aliases.json`` changed since the previous pass (or all, with
        ``force``) are re-read, so a pass over a thousand assets costs a thousand ``stat``
        calls. Safe to run from every replica at once: the outcome is deterministic and the
        write is a compare-and-set.
        """
        table = self.store.load()
        plans: dict[str, tuple[dict[str, str], list[str]]] = {}
        for asset in self.registry_assets():
            changed = self._alias_changed(asset)
            if not (force or changed or asset not in table.routes):
                continue
            try:
                aliases = self.registry.aliases(asset)
                versions = [] if "champion" in aliases else self.registry.list(asset)
            except TickcastError:
                continue  # not a valid asset directory, or unreadable right now: next pass
            if not aliases and not versions:
                continue
            plans[asset] = (aliases, versions)
        if not plans:
            return table

        def change(t: RoutingTable) -> RoutingTable:
            updates = {}
            for a, (aliases, versions) in plans.items():
                route = reconcile(t.get(a), aliases, versions, self.shadow_default)
                if route is not None and route != t.get(a):
                    updates[a] = route
            return t.with_routes(updates) if updates else t

        try:
            return self.store.update(change)
        except BaseException:
            # The table was not written: look at these assets again on the next pass.
            for a in plans:
                self._alias_stamp.pop(a, None)
            raise


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` elapses; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
