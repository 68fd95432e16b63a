"""File-system model registry: versions, cards and aliases per asset.

Layout (``root`` is ``model.registry_dir``, relative paths resolved under ``data_dir``; on a
cluster it is a shared file system)::

    <root>/<asset>/<version>/model.onnx         the served model (see training.onnx_export)
    <root>/<asset>/<version>/card.json          what the model is and how it scored
    <root>/<asset>/<version>/reference.parquet  feature sample the drift monitor compares with
    <root>/<asset>/<version>/<extra files>      e.g. model.xgb.json (native engine, optional)
    <root>/<asset>/aliases.json                 {"champion": v, "challenger": v, "previous": v}
    <root>/<asset>/alias_history.jsonl          one line per alias change (audit trail)

Versions look like ``20261127T060102Z-3fa9c1`` (UTC creation second + random suffix), so they
sort by creation time. A version directory is written under a temporary name and renamed into
place, so a reader never sees half a version. Alias changes are read-modify-write under an
exclusive ``fcntl`` lock on ``<asset>/.aliases.lock`` and land by ``os.replace`` of a temporary
file, so concurrent writers (retrain job, controller, CLI) never lose an update and a reader
always sees a complete ``aliases.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import re
import secrets
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from tickcast.config import Settings
from tickcast.errors import InvalidInput, NotFound, RegistryError

ALIASES: tuple[str, ...] = ("champion", "challenger", "previous")
MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
REFERENCE_FILE = "reference.parquet"
ALIASES_FILE = "aliases.json"
CHANGED_FILE = ".aliases_changed"  # touched on every alias write (watchers stat one file)
HISTORY_FILE = "alias_history.jsonl"

_ASSET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
_EXTRA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REQUIRED_CARD_FIELDS: tuple[str, ...] = ("feature_names",)


def registry_root(settings: Settings) -> Path:
    """The registry directory for ``settings``: ``model.registry_dir``, under ``data_dir`` if relative."""
    root = Path(settings.model.registry_dir)
    return root if root.is_absolute() else Path(settings.data_dir) / root


def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, else the installed package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
            text=True, timeout=5, check=True,
        )
        if out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass  # not a checkout (e.g. shipped by ray job submit without .git): fall back
    try:
        from importlib.metadata import version

        return f"tickcast=={version('tickcast')}"
    except Exception:  # noqa: BLE001 - metadata missing is not an error worth failing a training
        return "unknown"


def new_version(now: datetime | None = None) -> str:
    """A fresh, time-sortable version id ``YYYYMMDDTHHMMSSZ-<6 hex>``."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def _json_safe(obj: Any) -> Any:
    """Card values as strict JSON: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy scalar
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return _json_safe(obj.tolist())  # numpy array
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ModelRegistry:
    """Versions, cards and aliases of the forecasting models, per asset.

    Parameters
    ----------
    root
        Registry directory (created on first write).

    Examples
    --------
    >>> import tempfile, pandas as pd
    >>> reg = ModelRegistry(tempfile.mkdtemp())
    >>> v = reg.register("BTC-USD", b"onnx", {"feature_names": ["r1"], "metrics": {"mae": 2.0}},
    ...                  pd.DataFrame({"r1": [0.1]}), alias="champion")
    >>> reg.resolve("BTC-USD", "champion") == v
    True
    >>> reg.card("BTC-USD", v)["metrics"]
    {'mae': 2.0}
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- names and paths
    def _asset_dir(self, asset: str) -> Path:
        if not isinstance(asset, str) or not _ASSET_RE.match(asset):
            raise InvalidInput(f"asset name {asset!r} is not a valid registry name", field="asset")
        return self.root / asset

    def path(self, asset: str, version: str) -> Path:
        """Directory of ``version`` (an alias is resolved first).

        Raises
        ------
        NotFound
            Unknown asset, version or unset alias, naming it.
        """
        version = self.resolve(asset, version)
        return self._asset_dir(asset) / version

    def resolve(self, asset: str, alias_or_version: str) -> str:
        """The version an alias points at, or ``alias_or_version`` itself if it is a version.

        Raises
        ------
        NotFound
            The alias is not set, or the version does not exist (message names which).
        """
        adir = self._asset_dir(asset)
        if alias_or_version in ALIASES:
            version = self.aliases(asset).get(alias_or_version)
            if version is None:
                raise NotFound(f"alias '{alias_or_version}' is not set for {asset}", field="model")
            if not (adir / version / CARD_FILE).is_file():
                raise NotFound(f"alias '{alias_or_version}' of {asset} points at missing version "
                               f"'{version}'", field="model")
            return version
        if not isinstance(alias_or_version, str) or not _VERSION_RE.match(alias_or_version):
            raise NotFound(f"'{alias_or_version}' is neither an alias ({', '.join(ALIASES)}) nor a "
                           f"version id of {asset}", field="model")
        if not (adir / alias_or_version / CARD_FILE).is_file():
            raise NotFound(f"version '{alias_or_version}' of {asset} not found", field="model")
        return alias_or_version

    # ----------------------------------------------------------------- writing
    def register(
        self,
        asset: str,
        onnx_bytes: bytes,
        card: dict[str, Any],
        reference: pd.DataFrame,
        alias: str | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> str:
        """Store a new model version and optionally point ``alias`` at it.

        The card is completed with ``asset``, ``version``, ``created`` (ISO UTC) and
        ``code_version`` when absent. The version directory appears atomically.

        Parameters
        ----------
        asset
            Asset name, e.g. ``"BTC-USD"``.
        onnx_bytes
            Serialized ONNX model.
        card
            Model card; must hold ``feature_names``.
        reference
            Feature sample the drift monitor compares live features with.
        alias
            ``champion``, ``challenger`` or ``previous`` to set right away (None: no alias).
        extra_files
            More files to store beside the model (name → bytes), e.g. the native booster.

        Returns
        -------
        str
            The new version id.

        Raises
        ------
        InvalidInput
            Empty model, card without ``feature_names``, bad alias or file name.
        """
        adir = self._asset_dir(asset)
        if not isinstance(onnx_bytes, (bytes, bytearray)) or len(onnx_bytes) == 0:
            raise InvalidInput("onnx_bytes is empty", field="onnx_bytes")
        if not isinstance(card, dict):
            raise InvalidInput("card must be a dict", field="card")
        for key in REQUIRED_CARD_FIELDS:
            if key not in card:
                raise InvalidInput(f"card lacks '{key}'", field=f"card.{key}")
        if not isinstance(reference, pd.DataFrame):
            raise InvalidInput("reference must be a pandas DataFrame", field="reference")
        if alias is not None and alias not in ALIASES:
            raise InvalidInput(f"unknown alias '{alias}' (use one of {', '.join(ALIASES)})",
                               field="alias")
        extras = dict(extra_files or {})
        reserved = {MODEL_FILE, CARD_FILE, REFERENCE_FILE}
        for name in extras:
            if not _EXTRA_RE.match(name) or name in reserved:
                raise InvalidInput(f"extra file name {name!r} not allowed", field="extra_files")

        adir.mkdir(parents=True, exist_ok=True)
        version = new_version()
        while (adir / version).exists():  # same second and same 24 random bits: draw again
            version = new_version()
        full = dict(card)
        full.setdefault("asset", asset)
        full["version"] = version
        full.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="microseconds"))
        full.setdefault("code_version", code_version())

        staging = adir / f".staging-{version}"
        staging.mkdir()
        try:
            (staging / MODEL_FILE).write_bytes(bytes(onnx_bytes))
            buf = io.BytesIO()
            reference.reset_index(drop=True).to_parquet(buf, index=False)
            (staging / REFERENCE_FILE).write_bytes(buf.getvalue())
            for name, data in extras.items():
                (staging / name).write_bytes(bytes(data))
            (staging / CARD_FILE).write_text(json.dumps(_json_safe(full), indent=2, sort_keys=True))
            os.replace(staging, adir / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if alias is not None:
            self.set_alias(asset, alias, version)
        return version

    def share(self, source_asset: str, version: str, assets: list[str] | tuple[str, ...],
              alias: str | None = "champion") -> int:
        """Register ``source_asset``'s ``version`` for other assets too (one pooled model).

        A desk following many similar symbols may serve one model trained on one (or pooled)
        history. The files are hard-linked (copied across filesystems), the card names the
        new asset and says where it came from (``shared_from``). The version id is kept, so
        a loader sharing predictors by file digest loads the model once. Returns how many
        assets received it (those that already have the version are left as they are).

        Raises
        ------
        NotFound
            Unknown source version.
        """
        src = self.path(source_asset, version)
        card = self.card(source_asset, version)
        done = 0
        for asset in assets:
            if asset == source_asset:
                continue
            adir = self._asset_dir(asset)
            target = adir / version
            if not target.exists():
                adir.mkdir(parents=True, exist_ok=True)
                staging = adir / f".staging-{version}"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                for f in src.iterdir():
                    if f.name == CARD_FILE or not f.is_file():
                        continue
                    try:
                        os.link(f, staging / f.name)
                    except OSError:
                        shutil.copy2(f, staging / f.name)
                own = {**card, "asset": asset, "shared_from": f"{source_asset}/{version}"}
                (staging / CARD_FILE).write_text(json.dumps(_json_safe(own), indent=2, sort_keys=True))
                os.replace(staging, target)
                done += 1
            if alias is not None:
                self.set_alias(asset, alias, version)
        return done

    @contextlib.contextmanager
    def _locked(self, asset: str) -> Iterator[Path]:
        adir = self._asset_dir(asset)
        adir.mkdir(parents=True, exist_ok=True)
        with open(adir / ".aliases.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield adir
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write_aliases(self, asset: str, adir: Path, old: dict[str, str], new: dict[str, str],
                       reason: str) -> None:
        _atomic_write(adir / ALIASES_FILE, json.dumps(new, indent=2, sort_keys=True).encode())
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                 "reason": reason, "before": old, "after": new}
        with open(adir / HISTORY_FILE, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self._mark_changed()

    def _mark_changed(self) -> None:
        """Bump the registry-wide change marker (one stat tells watchers that aliases moved)."""
        marker = self.root / CHANGED_FILE
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "a"):
            pass
        os.utime(marker)

    def changed_ns(self) -> int:
        """When any alias of any asset last moved (mtime of the marker, UNIX ns; 0: never)."""
        try:
            return (self.root / CHANGED_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _check_alias(self, alias: str) -> None:
        if alias not in ALIASES:
            raise NotFound(f"unknown alias '{alias}' (use one of {', '.join(ALIASES)})", field="alias")

    def set_alias(self, asset: str, alias: str, version: str | None) -> dict[str, str]:
        """Point ``alias`` at ``version`` (None removes the alias); returns the new aliases.

        Raises
        ------
        NotFound
            Unknown alias name or version.
        """
        self._check_alias(alias)
        with self._locked(asset) as adir:
            old = self.aliases(asset)
            new = dict(old)
            if version is None:
                new.pop(alias, None)
            else:
                new[alias] = self.resolve(asset, version)
            if new != old:
                self._write_aliases(asset, adir, old, new, f"set {alias}")
            return new

    def promote(self, asset: str, version: str) -> dict[str, str]:
        """Make ``version`` the champion; the old champion becomes ``previous``.

        A promoted challenger stops being the challenger. Promoting the current champion
        changes nothing. Returns the new aliases.
        """
        with self._locked(asset) as adir:
            target = self.resolve(asset, version)
            old = self.aliases(asset)
            new = dict(old)
            champion = old.get("champion")
            if champion == target:
                return old
            if champion is not None:
                new["previous"] = champion
            new["champion"] = target
            if new.get("challenger") == target:
                del new["challenger"]
            self._write_aliases(asset, adir, old, new, f"promote {target}")
            return new

    def rollback(self, asset: str) -> dict[str, str]:
        """Make ``previous`` the champion again; ``previous`` is cleared. Returns the new aliases.

        Raises
        ------
        NotFound
            No ``previous`` alias to roll back to.
        """
        with self._locked(asset) as adir:
            old = self.aliases(asset)
            target = old.get("previous")
            if target is None:
                raise NotFound(f"alias 'previous' is not set for {asset}: nothing to roll back to",
                               field="previous")
            self.resolve(asset, target)
            new = dict(old)
            new["champion"] = target
            del new["previous"]
            self._write_aliases(asset, adir, old, new, f"rollback {old.get('champion')} -> {target}")
            return new

    # ----------------------------------------------------------------- reading
    def aliases(self, asset: str) -> dict[str, str]:
        """Current aliases of ``asset`` (empty dict when none are set)."""
        path = self._asset_dir(asset) / ALIASES_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RegistryError(f"aliases of {asset} unreadable: {exc}", field="aliases") from None
        return {k: v for k, v in data.items() if k in ALIASES and isinstance(v, str)}

    def list(self, asset: str) -> list[str]:
        """All versions of ``asset``, oldest first (empty if none)."""
        adir = self._asset_dir(asset)
        if not adir.is_dir():
            return []
        found = [p.name for p in adir.iterdir()
                 if _VERSION_RE.match(p.name) and (p / CARD_FILE).is_file()]

        def key(v: str) -> tuple[str, str]:
            # Two versions of the same second are ordered by the card's microsecond timestamp.
            try:
                created = str(json.loads((adir / v / CARD_FILE).read_text()).get("created", ""))
            except (OSError, ValueError):
                created = ""
            return (v[:16], created)

        return sorted(found, key=key)

    def assets(self) -> list[str]:
        """Assets that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _ASSET_RE.match(p.name)
                      and self.list(p.name))

    def card(self, asset: str, version: str) -> dict[str, Any]:
        """The card of ``version`` (alias allowed)."""
        path = self.path(asset, version) / CARD_FILE
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"card of {asset}/{path.parent.name} unreadable: {exc}",
                                field="card") from None

    def model_bytes(self, asset: str, version: str) -> bytes:
        """The ONNX model of ``version`` (alias allowed)."""
        return (self.path(asset, version) / MODEL_FILE).read_bytes()

    def reference(self, asset: str, version: str) -> pd.DataFrame:
        """The stored reference feature sample of ``version`` (alias allowed)."""
        return pd.read_parquet(self.path(asset, version) / REFERENCE_FILE)

    def compare(self, asset: str, v1: str, v2: str) -> dict[str, dict[str, float | None]]:
        """Metric differences between two versions (aliases allowed).

        Returns
        -------
        dict
            ``{metric: {"a": value_v1, "b": value_v2, "diff": b - a}}`` for every numeric
            metric present in either card (``None`` where one side lacks it).
        """
        m1 = self.card(asset, v1).get("metrics", {}) or {}
        m2 = self.card(asset, v2).get("metrics", {}) or {}
        out: dict[str, dict[str, float | None]] = {}
        for name in sorted(set(m1) | set(m2)):
            a, b = m1.get(name), m2.get(name)
            num_a = float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None
            num_b = float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) else None
            if num_a is None and num_b is None:
                continue  # nested or textual metric: not comparable as a number
            diff = num_b - num_a if num_a is not None and num_b is not None else None
            out[name] = {"a": num_a, "b": num_b, "diff": diff}
        return out

    def default_alias(self, asset: str) -> str:
        """Alias a freshly trained model gets: ``champion`` if there is none yet, else ``challenger``."""
        return "challenger" if "champion" in self.aliases(asset) else "champion"

