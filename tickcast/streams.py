"""Names of the Redis keys the planes share (one place, so producers and readers agree).

Per asset
    ``ticks:<ASSET>`` (ingress, :func:`tickcast.sources.stream.stream_key`),
    ``features:<ASSET>`` / ``features_log:<ASSET>`` (online features,
    :mod:`tickcast.storage.online_store`), ``safety:<ASSET>`` (regime and halt),
    ``predictions:<ASSET>`` (every served prediction of that asset, both slots).

Shared
    ``changes:online``: one small entry per write of a feature row or a safety hash
    (``asset``, ``kind``). Serving replicas follow it to refresh only what changed, so a
    refresh costs in proportion to the changes, not to the number of assets.
    ``tickcast:shards``: hash asset -> name of the market shard actor that owns it.
"""

from __future__ import annotations

from enum import Enum

CHANGES_STREAM = "changes:online"
CHANGES_MAXLEN = 100_000
SHARD_MAP_KEY = "tickcast:shards"
SAFETY_PREFIX = "safety:"


class ChangeKind(str, Enum):
    """What a ``changes:online`` entry says was rewritten."""

    FEATURES = "features"
    SAFETY = "safety"


def prediction_stream_key(prefix: str, asset: str) -> str:
    """The prediction stream of ``asset`` (``serve.prediction_stream`` is the prefix).

    >>> prediction_stream_key("predictions", "BTC-USD")
    'predictions:BTC-USD'
    """
    return f"{prefix}:{asset}"


def safety_key(asset: str) -> str:
    """The ``safety:<ASSET>`` hash the serving app returns with every prediction."""
    return f"{SAFETY_PREFIX}{asset}"
