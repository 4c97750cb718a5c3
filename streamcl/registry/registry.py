"""The model registry: immutable numbered versions, movable aliases, verified loads.

Layout inside a :class:`~streamcl.registry.store.Store`::

    versions/000007/weights.safetensors   the inference weights (safetensors, never pickle)
    versions/000007/manifest.json         what they are; written last: the commit point
    aliases/production.json               {"alias", "version", "updated_at", "history", ...}

**A version exists once its manifest does.** :meth:`ModelRegistry.publish` writes the weights
first and then creates the manifest with :meth:`~streamcl.registry.store.Store.create_exclusive`;
a crash in between leaves a directory without a manifest, which every reader ignores and the
next publication of that number overwrites. The manifest records the weights' SHA-256 and size,
and :meth:`ModelRegistry.load` refuses weights that do not match (:class:`CorruptVersionError`),
so a damaged or clobbered file is never served. Nothing ever rewrites a committed version.

**Aliases are the only mutable thing.** An alias file names one version and keeps the versions
it pointed at before (``history``, newest last); it is replaced atomically, so a reader sees the
old pointer or the new one. :meth:`~ModelRegistry.rollback` moves an alias back to what it
pointed at before, skipping versions it was rolled back from (``rolled_back``), so rolling back
twice goes two steps back instead of toggling between two versions.

**One writer.** The registry is written by the trainer service (publications) and by an operator
(promote/rollback through ``streamcl registry``); two processes publishing at once is not a
supported setup. Version numbers come from the writer: the service journals the number it is
about to publish and, after a crash, publishes the same number again — an idempotent no-op if
that version was committed with the same weights (:meth:`~ModelRegistry.publish`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from streamcl.registry.model import InferenceModel
from streamcl.registry.store import Store, check_path, open_store

FORMAT = 1
PRODUCTION = "production"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
#: manifest fields the registry sets itself; ``manifest_fields`` may not override them
RESERVED = ("format", "version", "parent", "created_at", "sha256", "size_bytes")
#: manifest fields that always differ between versions and say nothing about the model
NOISE = ("version", "created_at", "sha256", "size_bytes")

_VERSION_DIR = re.compile(r"versions/(\d+)/manifest\.json")


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message names the version or alias."""


class UnknownVersionError(RegistryError):
    """No committed version of that number."""


class CorruptVersionError(RegistryError):
    """A version's weights are missing, unreadable or do not match the manifest's SHA-256."""


class VersionConflictError(RegistryError):
    """Publishing a version number that is already committed with different weights."""


class _Default:
    def __repr__(self) -> str:
        return "<current production>"


DEFAULT: Any = _Default()


def format_version(version: int) -> str:
    """``7`` -> ``"v7"``, the way versions are printed."""
    return f"v{version}"


def parse_version(text: str | int) -> int:
    """``"7"``, ``"v7"`` or ``7`` -> 7; anything else raises ``ValueError``.

    >>> parse_version("v7"), parse_version("12"), format_version(3)
    (7, 12, 'v3')
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"[vV]?(\d+)", str(text).strip())
        if not m:
            raise ValueError(f"version {text!r}: give a version number like 7 or v7")
        value = int(m.group(1))
    if value < 1:
        raise ValueError(f"version {text!r}: versions are numbered from 1")
    return value


def _version_dir(version: int) -> str:
    return f"versions/{version:06d}"


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats (an undefined metric) become null, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return _json_safe(value.item())  # a numpy scalar (a metric computed with numpy)
    return value


def _dumps(obj: Any) -> bytes:
    return json.dumps(_json_safe(obj), indent=2, sort_keys=True, allow_nan=False).encode()


def weights_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors bytes the registry stores for ``tensors`` (deterministic: equal tensors
    give equal bytes, which is what makes re-publishing a version comparable by hash)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


class ModelRegistry:
    """Versions and aliases in a store (a directory, or any fsspec URL: see :func:`open_store`).

    Manifests are cached once read: committed versions never change.
    """

    def __init__(self, store: Store | str | os.PathLike[str]) -> None:
        self.store: Store = open_store(store)
        self._manifests: dict[int, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        return self.store.url

    def __repr__(self) -> str:
        return f"ModelRegistry({self.url!r})"

    # -- versions -------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Committed versions (those with a manifest), ascending."""
        out = []
        for path in self.store.list("versions"):
            m = _VERSION_DIR.fullmatch(path)
            if m and f"{int(m.group(1)):06d}" == m.group(1) and int(m.group(1)) >= 1:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int | None:
        found = self.versions()
        return found[-1] if found else None

    def exists(self, version: int) -> bool:
        return version in self._manifests or self.store.exists(
            f"{_version_dir(parse_version(version))}/{MANIFEST}")

    def manifest(self, version: int) -> dict[str, Any]:
        """The manifest of a committed version (:class:`UnknownVersionError` if there is none)."""
        version = parse_version(version)
        cached = self._manifests.get(version)
        if cached is not None:
            return json.loads(json.dumps(cached))  # callers may modify their copy
        try:
            raw = self.store.read_bytes(f"{_version_dir(version)}/{MANIFEST}")
        except FileNotFoundError:
            raise UnknownVersionError(self._unknown(version)) from None
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise CorruptVersionError(f"{format_version(version)}: manifest is not JSON "
                                      f"({self.url})") from None
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt != FORMAT:
            raise CorruptVersionError(f"{format_version(version)}: manifest format {fmt!r} is "
                                      f"not {FORMAT} ({self.url})")
        if manifest.get("version") != version:
            raise CorruptVersionError(f"{format_version(version)}: the manifest says version "
                                      f"{manifest.get('version')!r}")
        self._manifests[version] = manifest
        return json.loads(json.dumps(manifest))

    def _unknown(self, version: int) -> str:
        known = self.versions()
        have = (f"versions {format_version(known[0])}..{format_version(known[-1])}" if known
                else "no versions")
        return f"no version {format_version(version)} in the registry at {self.url} ({have})"

    def publish(self, tensors: Mapping[str, torch.Tensor], manifest_fields: Mapping[str, Any],
                *, version: int | None = None, parent: int | None = DEFAULT,
                aliases: Sequence[str] = ()) -> dict[str, Any]:
        """Commit ``tensors`` as a new version; return its manifest.

        ``version``: the number to publish under (the service journals it first), or ``None``
        for the next free one. Publishing a number that is already committed returns the
        existing manifest when the weights are the same (a retry after a crash; the aliases are
        still moved) and raises :class:`VersionConflictError` when they differ.

        ``manifest_fields`` goes into the manifest beside the registry's own fields
        (:data:`RESERVED`: ``format``, ``version``, ``parent`` — by default the version
        ``production`` pointed at —, ``created_at``, ``sha256``, ``size_bytes``). The trainer
        service passes ``model`` (:func:`~streamcl.registry.model.export_model`'s section,
        required by :meth:`load_model`), ``strategy``, ``params``, ``config_hash``,
        ``trainer_config``, ``journal_seq``, ``offsets``, ``position``,
        ``newest_sample_ts_ms``, ``metrics`` and ``trigger``; none is checked here. Values
        must be JSON; non-finite floats are stored as ``null``.

        ``aliases`` are moved to the new version once it is committed.
        """
        clash = sorted(set(manifest_fields) & set(RESERVED))
        if clash:
            raise ValueError(f"manifest_fields may not set {clash}: the registry sets them")
        for name in aliases:
            _check_alias(name)
        _dumps(manifest_fields)  # not JSON: fail now, before anything is written
        data = weights_bytes(tensors)
        sha = hashlib.sha256(data).hexdigest()
        if version is not None:
            version = parse_version(version)
            if self.exists(version):
                existing = self.manifest(version)
                if existing.get("sha256") != sha:
                    raise VersionConflictError(
                        f"{format_version(version)} is already published with different weights "
                        f"(sha256 {existing.get('sha256', '?')[:12]}..., these "
                        f"{sha[:12]}...); versions are immutable")
                for name in aliases:
                    self.set_alias(name, version, reason="publish")
                return existing
        if parent is DEFAULT:
            parent = self.alias(PRODUCTION)
        if parent is not None:
            parent = parse_version(parent)
        while True:
            number = version if version is not None else (self.latest() or 0) + 1
            vdir = _version_dir(number)
            committed = None
            if self._put_weights(vdir, data):
                manifest = {**dict(manifest_fields), "format": FORMAT, "version": number,
                            "parent": parent, "created_at": time.time(), "sha256": sha,
                            "size_bytes": len(data)}
                body = _dumps(manifest)
                if self.store.create_exclusive(f"{vdir}/{MANIFEST}", body):
                    committed = json.loads(body)
            if committed is not None:
                break
            # another writer committed this number after our check (not a supported setup,
            # but it must not lose a version): the same weights are a success, else retry
            # with the next number or, for a number the caller chose, fail
            existing = self.manifest(number)
            if existing.get("sha256") == sha:
                committed = existing
                break
            if version is not None:
                raise VersionConflictError(f"{format_version(version)} was published "
                                           "concurrently with different weights")
        self._manifests[number] = committed
        for name in aliases:
            self.set_alias(name, number, reason="publish")
        return json.loads(json.dumps(committed))

    def _put_weights(self, vdir: str, data: bytes) -> bool:
        """Write a version's weights; ``False`` if the version turned out to be committed.

        Created exclusively, so a committed version's weights are never overwritten; weights
        without a manifest are a crashed attempt's leftovers (one writer) and are replaced.
        """
        path = f"{vdir}/{WEIGHTS}"
        if self.store.create_exclusive(path, data):
            return True
        if self.store.exists(f"{vdir}/{MANIFEST}"):
            return False
        self.store.write_bytes(path, data)
        return True

    def load(self, version: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights and manifest of ``version``, the weights checked against the manifest's
        SHA-256 (:class:`CorruptVersionError` if they differ or cannot be read). The weights
        are parsed by safetensors from bytes: nothing is unpickled."""
        manifest = self.manifest(version)
        name = format_version(manifest["version"])
        try:
            data = self.store.read_bytes(f"{_version_dir(manifest['version'])}/{WEIGHTS}")
        except FileNotFoundError:
            raise CorruptVersionError(f"{name}: weights file is missing ({self.url})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.get("sha256"):
            raise CorruptVersionError(
                f"{name}: weights SHA-256 {digest[:12]}... does not match the manifest's "
                f"{str(manifest.get('sha256'))[:12]}... ({len(data)} bytes, manifest says "
                f"{manifest.get('size_bytes')}): refusing to load it")
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError) as exc:
            raise CorruptVersionError(f"{name}: weights are not a safetensors file ({exc})"
                                      ) from None
        return tensors, manifest

    def load_model(self, version: int) -> InferenceModel:
        """``version`` rebuilt for inference (verified like :meth:`load`)."""
        tensors, manifest = self.load(version)
        if not isinstance(manifest.get("model"), Mapping):
            raise CorruptVersionError(f"{format_version(manifest['version'])}: the manifest "
                                      "has no 'model' section; it cannot be rebuilt")
        return InferenceModel(tensors, manifest)

    # -- aliases --------------------------------------------------------------------------------
    def alias_record(self, name: str) -> dict[str, Any] | None:
        """The alias file's content, or ``None`` if the alias was never set."""
        try:
            raw = self.store.read_bytes(f"aliases/{_check_alias(name)}.json")
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
            int(record["version"])
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"alias {name!r}: its file in {self.url} is damaged") from None
        return record

    def alias(self, name: str = PRODUCTION) -> int | None:
        """The version ``name`` points at, or ``None``."""
        record = self.alias_record(name)
        return None if record is None else int(record["version"])

    def aliases(self) -> dict[str, int]:
        """Every alias and the version it points at."""
        out = {}
        for path in self.store.list("aliases"):
            name = path.removeprefix("aliases/")
            if "/" in name or not name.endswith(".json"):
                continue
            version = self.alias(name.removesuffix(".json"))
            if version is not None:
                out[name.removesuffix(".json")] = version
        return dict(sorted(out.items()))

    def set_alias(self, name: str, version: int, reason: str = "set") -> dict[str, Any]:
        """Point ``name`` at ``version`` (which must be committed); return the new record.

        Setting an alias to the version it already names changes nothing. Otherwise the old
        version is appended to ``history``, and the file is replaced atomically.
        """
        _check_alias(name)
        version = parse_version(version)
        if not self.exists(version):
            raise UnknownVersionError(self._unknown(version))
        old = self.alias_record(name)
        if old is not None and int(old["version"]) == version:
            return old
        history = list(old.get("history", [])) if old else []
        rolled_back = list(old.get("rolled_back", [])) if old else []
        if old is not None:
            history.append(int(old["version"]))
            if reason == "rollback" and int(old["version"]) not in rolled_back:
                rolled_back.append(int(old["version"]))
        if reason != "rollback":  # promoting a version again vouches for it
            rolled_back = [v for v in rolled_back if v != version]
        record = {"alias": name, "version": version, "updated_at": time.time(),
                  "history": history, "rolled_back": rolled_back, "reason": reason}
        self.store.write_bytes(f"aliases/{name}.json", _dumps(record))
        return record

    def promote(self, version: int, alias: str = PRODUCTION) -> dict[str, Any]:
        """Point ``alias`` (default ``production``) at ``version``."""
        return self.set_alias(alias, version, reason="promote")

    def rollback(self, alias: str = PRODUCTION, to: int | None = None) -> int:
        """Move ``alias`` back; return the version it now points at.

        Without ``to``: to the newest version in its history that is neither the current one
        nor one it was rolled back from. With ``to``: to that version.
        """
        record = self.alias_record(alias)
        if record is None:
            raise RegistryError(f"alias {alias!r} is not set in {self.url}: nothing to roll back")
        current = int(record["version"])
        if to is not None:
            target = parse_version(to)
            if target == current:
                raise RegistryError(f"alias {alias!r} already points at {format_version(target)}")
        else:
            skip = {current, *record.get("rolled_back", [])}
            candidates = [int(v) for v in reversed(record.get("history", [])) if int(v) not in skip]
            if not candidates:
                raise RegistryError(
                    f"alias {alias!r} has nothing to roll back to: it points at "
                    f"{format_version(current)} and has no earlier version that was not rolled "
                    "back from (give one with --to)")
            target = candidates[0]
        self.set_alias(alias, target, reason="rollback")
        return target

    # -- comparing --------------------------------------------------------------------------
    def diff(self, a: int, b: int) -> dict[str, Any]:
        """How version ``b`` differs from ``a``.

        ``fields``: manifest fields that differ, ``{"a", "b"}`` each (``metrics`` and the
        per-version :data:`NOISE` excluded); ``noise``: those noise fields; ``metrics``: every
        metric side by side (nested dicts flattened with dots, ``delta`` = b - a for numbers);
        ``tensors``: per weight tensor the shapes, whether the shape changed, and the L2
        distance (over the common leading rows when the head grew; ``None`` for a tensor only
        one side has).
        """
        ta, ma = self.load(a)
        tb, mb = self.load(b)
        fields = {}
        for key in sorted(set(ma) | set(mb)):
            if key in NOISE or key == "metrics":
                continue
            if ma.get(key) != mb.get(key):
                fields[key] = {"a": ma.get(key), "b": mb.get(key)}
        noise = {key: {"a": ma.get(key), "b": mb.get(key)} for key in NOISE}
        fa, fb = _flatten(ma.get("metrics") or {}), _flatten(mb.get("metrics") or {})
        metrics = {}
        for key in sorted(set(fa) | set(fb)):
            va, vb = fa.get(key), fb.get(key)
            delta = (vb - va if _is_number(va) and _is_number(vb) else None)
            metrics[key] = {"a": va, "b": vb, "delta": delta}
        tensors = {}
        for key in sorted(set(ta) | set(tb)):
            xa, xb = ta.get(key), tb.get(key)
            entry: dict[str, Any] = {
                "shape_a": list(xa.shape) if xa is not None else None,
                "shape_b": list(xb.shape) if xb is not None else None}
            entry["shape_changed"] = entry["shape_a"] != entry["shape_b"]
            entry["l2"] = _l2(xa, xb)
            tensors[key] = entry
        return {"a": ma["version"], "b": mb["version"], "fields": fields, "noise": noise,
                "metrics": metrics, "tensors": tensors}


def _check_alias(name: str) -> str:
    if not isinstance(name, str) or "/" in name or not name:
        raise ValueError(f"alias {name!r}: use letters, digits, '.', '_' and '-'")
    check_path(name)
    return name


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _l2(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """L2 distance; over the common leading slice when only dim 0 differs (head growth)."""
    if a is None or b is None or a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
        return None
    if not (a.is_floating_point() or b.is_floating_point()):
        a, b = a.double(), b.double()
    n = min(a.shape[0], b.shape[0]) if a.dim() else None
    if n is not None:
        a, b = a[:n], b[:n]
    return float(torch.linalg.vector_norm((b.double() - a.double()).reshape(-1)))
