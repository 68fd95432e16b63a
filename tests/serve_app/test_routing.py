"""Routing between blue and green: stickiness, consistent growth of groups, reconcile rules
(pure: no Ray, no Redis)."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys

import pytest

from serve_app.routing import (AssetRoute, RoutingTable, apply_traffic, other_slot, reconcile,
                               sticky_unit)
from tickcast.errors import InvalidInput


def test_sticky_unit_is_stable_across_processes() -> None:
    keys = [f"client-{i}" for i in range(20)]
    here = [sticky_unit(k, "salt-1") for k in keys]
    code = ("from serve_app.routing import sticky_unit; "
            f"print([sticky_unit(k, 'salt-1') for k in {keys!r}])")
    there = eval(subprocess.check_output([sys.executable, "-c", code], text=True))
    assert here == there  # unlike hash(), the same on every replica and host
    assert all(0.0 <= u < 1.0 for u in here)
    assert sticky_unit("client-1", "salt-1") != sticky_unit("client-1", "salt-2")


def test_same_key_same_slot_and_split_follows_weight() -> None:
    route = AssetRoute(blue="v1", green="v2", green_weight=0.3)
    keys = [f"user-{i}" for i in range(20_000)]
    slots = [route.choose(sticky_unit(k)) for k in keys]
    assert slots == [route.choose(sticky_unit(k)) for k in keys]
    share = slots.count("green") / len(slots)
    assert share == pytest.approx(0.3, abs=0.015)


def test_groups_only_grow_while_the_weight_grows() -> None:
    keys = [f"user-{i}" for i in range(5_000)]
    previous: set[str] = set()
    for w in (0.0, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0):
        route = AssetRoute(blue="v1", green="v2", green_weight=w)
        green = {k for k in keys if route.choose(sticky_unit(k)) == "green"}
        assert previous <= green  # nobody already in the canary group leaves it
        previous = green
    assert previous == set(keys)


def test_empty_slot_hands_its_share_to_the_other() -> None:
    route = AssetRoute(blue="v1", green=None, green_weight=0.0)
    assert {route.choose(u) for u in (0.0, 0.5, 0.99)} == {"blue"}
    assert route.champion_slot == "blue" and route.shadow_of("blue") is None


def test_shadow_targets_the_other_slot_only_when_it_differs() -> None:
    route = AssetRoute(blue="v1", green="v2", shadow=True)
    assert route.shadow_of("blue") == "green" and route.shadow_of("green") == "blue"
    assert AssetRoute(blue="v1", green="v1", shadow=True).shadow_of("blue") is None
    assert AssetRoute(blue="v1", green="v2", shadow=False).shadow_of("blue") is None


def test_promote_keeps_old_champion_warm_for_rollback() -> None:
    route = AssetRoute(blue="v1", green="v2", green_weight=0.1)
    promoted = route.promote("v2")
    assert promoted.champion == "v2" and promoted.version("blue") == "v1"
    back = promoted.promote("v1")
    assert back.champion == "v1" and back.green_weight == 0.0
    # A version held by no slot goes into the idle one, which becomes champion.
    third = back.promote("v3")
    assert third.champion == "v3" and third.champion_slot == "green" and third.blue == "v1"


def test_reconcile_follows_alias_changes_only() -> None:
    r = reconcile(None, {"champion": "v1", "challenger": "v2"}, ["v1", "v2"])
    assert (r.blue, r.green, r.green_weight, r.registry_champion) == ("v1", "v2", 0.0, "v1")
    # An operator's canary above 50 % stays while the champion alias does not move.
    canary = r.with_traffic(green_weight=0.7)
    assert reconcile(canary, {"champion": "v1", "challenger": "v2"}, []) == canary
    # A champion moved in the registry is followed (loading it when no slot holds it).
    moved = reconcile(canary, {"champion": "v3", "previous": "v1"}, [])
    assert moved.champion == "v3" and moved.registry_champion == "v3"
    # A new challenger lands in the idle slot with no traffic.
    chal = reconcile(moved, {"champion": "v3", "challenger": "v4"}, [])
    assert chal.champion == "v3" and chal.version(chal.idle_slot) == "v4"
    assert chal.choose(0.0) == chal.champion_slot and chal.choose(0.999) == chal.champion_slot
    # No champion alias: the newest version.
    assert reconcile(None, {}, ["v1", "v2"]).blue == "v2"
    assert reconcile(None, {}, []) is None


def test_validation_names_the_field() -> None:
    with pytest.raises(InvalidInput) as exc:
        AssetRoute(blue="v1", green_weight=1.5)
    assert exc.value.field == "green_weight"
    with pytest.raises(InvalidInput) as exc:
        AssetRoute(blue="v1", shadow="yes")  # type: ignore[arg-type]
    assert exc.value.field == "shadow"
    with pytest.raises(InvalidInput):
        other_slot("red")
    table = RoutingTable(rev=3, routes={"A": AssetRoute(blue="v1")})
    with pytest.raises(InvalidInput) as exc:
        apply_traffic(table, ["A"], 0.5, None)  # green slot empty
    assert exc.value.field == "green_weight"
    with pytest.raises(InvalidInput) as exc:
        RoutingTable.from_json('{"rev": 1, "routes": {"A": {"blue": "v1", "green_weight": -1}}}')
    assert exc.value.field == "routes.A.green_weight"
    with pytest.raises(InvalidInput):
        RoutingTable.from_json("not json")


def test_table_json_and_pickle_round_trip() -> None:
    rng = random.Random(5)
    routes = {f"A{i}": AssetRoute(blue=f"v{i}", green=f"w{i}", green_weight=round(rng.random(), 3),
                                  shadow=bool(i % 2), registry_champion=f"v{i}") for i in range(20)}
    table = RoutingTable(rev=7, routes=routes)
    assert RoutingTable.from_json(table.to_json()) == table
    assert pickle.loads(pickle.dumps(table)) == table
    route = routes["A3"]
    assert pickle.loads(pickle.dumps(route)) == route
    assert table.required_versions() >= {("A3", "v3"), ("A3", "w3")}
