"""Which market shard owns which asset: rendezvous hashing (pure, no Ray).

A node runs many assets, each one small (a bar a minute, a few ticks a second), so assets are
partitioned over a few *market shard* actors instead of costing a process each. Each asset goes
to the shard with the highest score ``hash(asset, shard)`` (rendezvous, or highest-random-weight
hashing). The mapping depends only on the asset and the shard names, so every process computes
the same one without talking to the others, and growing from ``n`` to ``n + 1`` shards moves
only the assets whose new top score is the new shard: about ``1 / (n + 1)`` of them, where a
``hash % n`` mapping would move almost all. Design notes: ``docs/shards.md``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

SHARD_PREFIX = "shard:"


def shard_name(index: int) -> str:
    """Ray name of market shard ``index`` (``shard:0``, ``shard:1`` ...).

    >>> shard_name(3)
    'shard:3'
    """
    return f"{SHARD_PREFIX}{index}"


def shard_count(configured: int | None, cluster_cpus: float) -> int:
    """How many shards to run: the configured count, else one per CPU of the cluster (≥ 1).

    >>> shard_count(None, 2.0), shard_count(None, 0.0), shard_count(5, 2.0)
    (2, 1, 5)
    """
    if configured is not None:
        return max(1, int(configured))
    return max(1, int(math.floor(cluster_cpus)))


def _score(asset: str, shard: str) -> int:
    # blake2b is fast, stable across processes and Python versions (unlike hash()).
    digest = hashlib.blake2b(f"{shard}\x00{asset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(asset: str, shards: Sequence[str]) -> str:
    """The shard (of ``shards``) that owns ``asset``.

    >>> owner("BTC-USD", ["shard:0"])
    'shard:0'
    """
    if not shards:
        raise ValueError("no shard to own an asset")
    return max(shards, key=lambda s: (_score(asset, s), s))


def assign(assets: Iterable[str], n_shards: int) -> dict[str, str]:
    """``asset -> shard name`` for ``n_shards`` shards named by :func:`shard_name`."""
    names = [shard_name(i) for i in range(max(1, int(n_shards)))]
    return {a: owner(a, names) for a in assets}


def partition(assets: Iterable[str], n_shards: int) -> dict[str, tuple[str, ...]]:
    """``shard name -> its assets`` (every shard listed, in order; assets in input order)."""
    names = [shard_name(i) for i in range(max(1, int(n_shards)))]
    out: dict[str, list[str]] = {n: [] for n in names}
    for asset in assets:
        out[owner(asset, names)].append(asset)
    return {n: tuple(a) for n, a in out.items()}
