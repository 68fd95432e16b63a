"""The audit trail of the closed loop: one Redis Stream of events, each a JSON object.

Every decision and every state transition of the loop is an event: drift level changes and
change-detector alarms (source ``drift``), regime changes, halts and P&L resets (``safety``),
retraining, shadow evaluation, promotion, rejection, watch and rollback (``controller``).
An event carries the figures it was decided on, so the trail can be audited without the
state that produced it.

Entry layout: stream ``controller.events_stream`` (default ``events``), one field ``event``
holding the JSON object. Common keys: ``id`` (unique; a replay after a crash re-emits the same
id, see :func:`make_event`), ``ts`` (UNIX ns, wall clock when emitted), ``source``, ``asset``
(None for loop-wide events), ``type``; the rest is the evidence.

:class:`EventLog` takes any client with ``xadd`` / ``xrevrange`` / ``xrange`` (redis-py), so
this module needs neither Redis nor Ray to be imported.

Examples
--------
>>> ev = make_event("controller", "BTC-USD", "rejected", seq=7, ts_ns=1, reason="not better",
...                 dm_p=0.4, dm_stat=float("nan"))
>>> ev["id"], ev["type"], ev["dm_stat"]
('controller:BTC-USD:7', 'rejected', None)
>>> decode_entry(b"1-0", encode_event(ev))["reason"]
'not better'
"""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any, Iterable, Mapping, Protocol, Sequence

EVENT_FIELD = "event"


class StreamClient(Protocol):
    """The part of a Redis client the event log uses."""

    def xadd(self, name: str, fields: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any: ...

    def xrevrange(self, name: str, max: str = "+", min: str = "-", count: int | None = None) -> Any: ...

    def xrange(self, name: str, min: str = "-", max: str = "+", count: int | None = None) -> Any: ...


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON: numpy scalars/arrays to Python, NaN and inf to None.

    Examples
    --------
    >>> import numpy as np
    >>> json_safe({"a": np.float64(1.5), "b": [np.int64(2), float("inf")], "c": (1, None)})
    {'a': 1.5, 'b': [2, None], 'c': [1, None]}
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy scalar
    elif hasattr(obj, "tolist") and callable(obj.tolist):
        return json_safe(obj.tolist())  # numpy array
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def make_event(source: str, asset: str | None, kind: str, *, seq: int | None = None,
               ts_ns: int | None = None, **evidence: Any) -> dict[str, Any]:
    """Build an event.

    Parameters
    ----------
    source
        Who emits it: ``drift``, ``safety``, ``controller``, ``drill``...
    asset
        The asset concerned (None: loop-wide).
    kind
        Event type, e.g. ``drift_level``, ``regime``, ``promoted``.
    seq
        The emitter's event counter. With it the id is ``<source>:<asset>:<seq>``, so an
        actor that replays its input after a restart re-emits events with the same ids and a
        reader can drop the copies; without it the id is random.
    ts_ns
        Emission time (default: now).
    **evidence
        The figures behind the event (made JSON-safe).

    Raises
    ------
    ValueError
        Empty ``source`` or ``kind``.
    """
    if not source or not kind:
        raise ValueError("source and kind must be non-empty")
    tail = str(seq) if seq is not None else f"r{secrets.token_hex(6)}"
    eid = f"{source}:{asset or '-'}:{tail}"
    body = json_safe(evidence)
    for reserved in RESERVED:
        body.pop(reserved, None)
    return {"id": eid, "ts": int(time.time_ns() if ts_ns is None else ts_ns), "source": source,
            "asset": asset, "type": kind, **body}


RESERVED: tuple[str, ...] = ("id", "ts", "source", "asset", "type")


def event_from(source: str, asset: str | None, raw: Mapping[str, Any], *, seq: int | None = None,
               **extra: Any) -> dict[str, Any]:
    """An event from a dict produced by a monitor (its ``type`` key names the event).

    Keys of ``raw`` that the event itself defines (``id``, ``ts``, ``source``, ``asset``) are
    dropped from the evidence; ``extra`` fills keys ``raw`` lacks.

    Examples
    --------
    >>> ev = event_from("drift", "X", {"type": "drift_level", "asset": "X", "to": "WARNING"},
    ...                 seq=3, champion="v1")
    >>> ev["id"], ev["type"], ev["to"], ev["champion"]
    ('drift:X:3', 'drift_level', 'WARNING', 'v1')
    """
    body = {k: v for k, v in raw.items() if k not in RESERVED}
    for k, v in extra.items():
        body.setdefault(k, v)
    return make_event(source, asset, str(raw.get("type", source)), seq=seq, **body)


def encode_event(event: Mapping[str, Any]) -> dict[str, str]:
    """Stream fields of one event."""
    return {EVENT_FIELD: json.dumps(json_safe(event), separators=(",", ":"), allow_nan=False)}


def decode_entry(entry_id: bytes | str, fields: Mapping[Any, Any]) -> dict[str, Any] | None:
    """The event of one stream entry, with ``stream_id``; None when the entry is not an event."""
    raw = fields.get(EVENT_FIELD.encode()) if EVENT_FIELD.encode() in fields else fields.get(EVENT_FIELD)
    if raw is None:
        return None
    try:
        event = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(event, dict):
        return None
    event["stream_id"] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return event


class EventLog:
    """Append and read the events stream.

    Parameters
    ----------
    client
        A Redis client (bytes or str responses).
    stream
        Stream key (``controller.events_stream``).
    maxlen
        Approximate cap of the stream (``controller.events_maxlen``).
    """

    def __init__(self, client: StreamClient, stream: str = "events", maxlen: int = 100_000) -> None:
        if not stream:
            raise ValueError("stream must be a non-empty key")
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.client = client
        self.stream = stream
        self.maxlen = int(maxlen)

    def append(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Append events in order (one pipelined round trip when the client pipelines)."""
        if not events:
            return []
        pipeline = getattr(self.client, "pipeline", None)
        if pipeline is None:
            return [str(self.client.xadd(self.stream, encode_event(e), maxlen=self.maxlen,
                                         approximate=True)) for e in events]
        pipe = pipeline(transaction=False)
        for e in events:
            pipe.xadd(self.stream, encode_event(e), maxlen=self.maxlen, approximate=True)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in pipe.execute()]

    def read(self, asset: str | None = None, last: int | None = None,
             types: Iterable[str] | None = None, after: str | None = None,
             scan_limit: int = 1_000_000) -> list[dict[str, Any]]:
        """Events, oldest first, without replayed copies (same ``id``).

        Parameters
        ----------
        asset
            Only this asset's events.
        last
            Only the newest ``last`` matching events.
        types
            Only these event types.
        after
            Only entries after this stream id.
        scan_limit
            Most entries examined (newest first).
        """
        wanted = set(types) if types is not None else None
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        upper = "+"
        chunk = 1000
        scanned = 0
        lower = f"({after}" if after else "-"
        while scanned < scan_limit:
            entries = self.client.xrevrange(self.stream, max=upper, min=lower, count=chunk)
            if not entries:
                break
            for entry_id, fields in entries:
                scanned += 1
                ev = decode_entry(entry_id, fields)
                if ev is None:
                    continue
                if asset is not None and ev.get("asset") != asset:
                    continue
                if wanted is not None and ev.get("type") not in wanted:
                    continue
                out.append(ev)
            if last is not None and len(out) >= 2 * last + 16:
                break  # enough candidates even if some are replayed copies
            oldest = entries[-1][0]
            oldest = oldest.decode() if isinstance(oldest, bytes) else str(oldest)
            upper = f"({oldest}"
            if len(entries) < chunk:
                break
        out.reverse()
        unique = []
        for ev in out:
            key = str(ev.get("id"))
            if key in seen:
                continue
            seen.add(key)
            unique.append(ev)
        return unique[-last:] if last is not None else unique
