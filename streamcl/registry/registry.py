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

**Verify before acting.** An alias is only ever moved by an operator to a version that
:meth:`~ModelRegistry.verify` accepts (manifest parses, weights match its SHA-256), because a
pointer to a broken version is an outage that shows up later, at the next service start. The
operator's views degrade instead of failing: :meth:`~ModelRegistry.check` reports each version
as usable or why not, :meth:`~ModelRegistry.scan_aliases` reports a damaged alias file beside the
readable ones, a plain rollback skips versions that no longer verify, and a damaged alias file is
rewritten (fresh history) by the next promote or ``rollback --to``.

**Writes fail whole.** A write the storage refuses (read-only, full, no permission) raises
:class:`RegistryWriteError` — one line with the path, the OS's reason and the fix — after the
half-written version is removed, so the previous state is what remains and a restart does not
find a growing pile of partial directories.

**Retention.** :meth:`~ModelRegistry.gc` removes all but the newest ``keep`` versions, never one
an alias points at or (by default) ever pointed at: those are what a rollback or an audit needs.
A version is removed manifest first, so a crash half way leaves an uncommitted directory that
every reader already ignores.

**One writer.** The registry is written by the trainer service (publications) and by an operator
(promote/rollback through ``streamcl registry``); two processes publishing at once is not a
supported setup. Version numbers come from the writer: the service journals the number it is
about to publish and, after a crash, publishes the same number again — an idempotent no-op if
that version was committed with the same weights (:meth:`~ModelRegistry.publish`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from streamcl.registry.model import InferenceModel
from streamcl.registry.store import OutsideStoreError, Store, check_path, open_store

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


class DamagedAliasError(RegistryError):
    """An alias file that is not a readable alias record (its history is lost with it)."""


class RegistryWriteError(RegistryError):
    """The storage refused a write (read-only, full, no permission); nothing half-written is
    left behind, and the message names the path, the reason and the fix."""


#: what an operator can do about a refused write, by errno
_WRITE_FIXES = {
    errno.EROFS: "the registry's filesystem is read-only: mount it read-write or point "
                 "publication.registry at a writable location",
    errno.ENOSPC: "the disk is full: free space (e.g. `streamcl registry gc --keep N`)",
    errno.EDQUOT: "the disk quota is used up: free space (e.g. `streamcl registry gc --keep N`)",
    errno.EACCES: "permission denied: let this user write to the registry directory",
    errno.EPERM: "permission denied: let this user write to the registry directory",
}


class VersionCheck(NamedTuple):
    """One version as :meth:`ModelRegistry.check` found it: ``problem`` is ``None`` when it
    verifies, else why not (``manifest`` is ``None`` when that could not be read either)."""

    version: int
    manifest: dict[str, Any] | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class Retention:
    """What :meth:`ModelRegistry.gc` did (or, with ``dry_run``, would do)."""

    removed: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    #: versions it may not remove, with why (a version directory linked from outside)
    refused: dict[int, str] = field(default_factory=dict)


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
        except (OSError, OutsideStoreError) as exc:
            raise CorruptVersionError(f"{format_version(version)}: cannot read its manifest "
                                      f"({_reason(exc)})") from None
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
                    self.set_alias(name, version, reason="publish", verify=False)
                return existing
        if parent is DEFAULT:
            try:
                parent = self.alias(PRODUCTION)
            except DamagedAliasError:  # publishing rewrites it; a lost parent is no reason to stop
                parent = None
        if parent is not None:
            parent = parse_version(parent)
        while True:
            number = version if version is not None else (self.latest() or 0) + 1
            vdir = _version_dir(number)
            committed = None
            try:
                if self._put_weights(vdir, data):
                    manifest = {**dict(manifest_fields), "format": FORMAT, "version": number,
                                "parent": parent, "created_at": time.time(), "sha256": sha,
                                "size_bytes": len(data)}
                    body = _dumps(manifest)
                    if self.store.create_exclusive(f"{vdir}/{MANIFEST}", body):
                        committed = json.loads(body)
            except (OSError, OutsideStoreError) as exc:
                self._discard(vdir)
                raise self._write_error(f"publishing {format_version(number)}", vdir, exc
                                        ) from None
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
            self.set_alias(name, number, reason="publish", verify=False)
        return json.loads(json.dumps(committed))

    def _discard(self, vdir: str) -> None:
        """Remove what a failed publication left in ``vdir`` unless it got committed: a
        restart that fails the same way must not pile up partial directories."""
        with contextlib.suppress(OSError, ValueError):
            if self.store.exists(f"{vdir}/{MANIFEST}"):
                return
            for path in {*self.store.list(vdir), f"{vdir}/{WEIGHTS}"}:
                self.store.delete(path)

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
        except (OSError, OutsideStoreError) as exc:
            raise CorruptVersionError(f"{name}: cannot read its weights ({_reason(exc)})"
                                      ) from None
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

    def verify(self, version: int) -> dict[str, Any]:
        """The manifest of ``version`` once its weights are read and match its SHA-256 (what
        :meth:`load` checks); :class:`CorruptVersionError` or :class:`UnknownVersionError` if
        not. Nothing cached is trusted: a file can be damaged, or the version pruned by another
        process, after it was first read."""
        self._manifests.pop(parse_version(version), None)
        return self.load(version)[1]

    def check(self) -> list[VersionCheck]:
        """Every committed version, verified (weights read and hashed), ascending.

        A broken version is reported, not raised, so that one bad manifest does not hide the
        rest of the registry from the operator who has to fix it.
        """
        out = []
        for v in self.versions():
            try:
                out.append(VersionCheck(v, self.verify(v), None))
            except RegistryError as exc:
                manifest = None
                with contextlib.suppress(RegistryError):
                    manifest = self.manifest(v)
                out.append(VersionCheck(v, manifest, _why(v, exc)))
        return out

    # -- aliases --------------------------------------------------------------------------------
    def alias_record(self, name: str) -> dict[str, Any] | None:
        """The alias file's content, or ``None`` if the alias was never set."""
        path = f"aliases/{_check_alias(name)}.json"
        try:
            raw = self.store.read_bytes(path)
        except FileNotFoundError:
            return None
        except (OSError, OutsideStoreError) as exc:
            raise DamagedAliasError(self._damaged(name, f"cannot read it: {_reason(exc)}")
                                    ) from None
        try:
            record = json.loads(raw)
        except ValueError:
            raise DamagedAliasError(self._damaged(name, "not JSON")) from None
        try:
            parse_version(record["version"])
            for key in ("history", "rolled_back"):
                if not isinstance(record.get(key, []), list):
                    raise TypeError
                for v in record.get(key, []):
                    parse_version(v)
        except (ValueError, KeyError, TypeError):
            raise DamagedAliasError(self._damaged(name, "not an alias record")) from None
        return record

    def _damaged(self, name: str, why: str) -> str:
        return (f"alias {name!r}: its file aliases/{name}.json in {self.url} is damaged ({why}); "
                f"`streamcl registry promote vN --alias {name}` rewrites it (its history is lost)")

    def scan_aliases(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every alias's record, and apart from them every damaged alias file with why: the
        operator's view, which must show the rest when one file is broken."""
        records, damaged = {}, {}
        for path in self.store.list("aliases"):
            name = path.removeprefix("aliases/")
            if "/" in name or not name.endswith(".json"):
                continue
            name = name.removesuffix(".json")
            try:
                record = self.alias_record(name)
            except RegistryError as exc:  # DamagedAliasError, or a name that is not an alias
                damaged[name] = str(exc)
                continue
            if record is not None:
                records[name] = record
        return dict(sorted(records.items())), dict(sorted(damaged.items()))

    def alias(self, name: str = PRODUCTION) -> int | None:
        """The version ``name`` points at, or ``None``."""
        record = self.alias_record(name)
        return None if record is None else int(record["version"])

    def aliases(self) -> dict[str, int]:
        """Every alias and the version it points at (:class:`DamagedAliasError` if a file is
        damaged; :meth:`scan_aliases` reports it instead)."""
        out = {}
        for path in self.store.list("aliases"):
            name = path.removeprefix("aliases/")
            if "/" in name or not name.endswith(".json"):
                continue
            version = self.alias(name.removesuffix(".json"))
            if version is not None:
                out[name.removesuffix(".json")] = version
        return dict(sorted(out.items()))

    def set_alias(self, name: str, version: int, reason: str = "set", *,
                  verify: bool = True) -> dict[str, Any]:
        """Point ``name`` at ``version`` (which must be committed and, with ``verify``, pass
        :meth:`verify`); return the new record.

        Setting an alias to the version it already names changes nothing. Otherwise the old
        version is appended to ``history``, and the file is replaced atomically. A damaged
        alias file is replaced by a fresh record (its history cannot be read back).
        """
        _check_alias(name)
        version = parse_version(version)
        try:
            old = self.alias_record(name)
        except DamagedAliasError:
            old = None
        if verify:
            try:
                self.verify(version)
            except CorruptVersionError as exc:
                now = ("" if old is None else
                       f"; it still points at {format_version(int(old['version']))}")
                raise CorruptVersionError(
                    f"not moving alias {name!r} to {format_version(version)}: "
                    f"{_why(version, exc)}{now} (`streamcl registry list` shows which versions "
                    "verify)") from None
        elif not self.exists(version):
            raise UnknownVersionError(self._unknown(version))
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
        path = f"aliases/{name}.json"
        try:
            self.store.write_bytes(path, _dumps(record))
        except (OSError, OutsideStoreError) as exc:
            raise self._write_error(f"moving alias {name!r} to {format_version(version)}",
                                    path, exc) from None
        return record

    def _write_error(self, what: str, path: str, exc: OSError | ValueError) -> RegistryWriteError:
        fix = _WRITE_FIXES.get(getattr(exc, "errno", None) or -1,
                               "check the registry's storage and retry")
        if isinstance(exc, OutsideStoreError):
            return RegistryWriteError(f"{what}: {exc}")
        return RegistryWriteError(f"{what}: cannot write {path} in the registry at {self.url} "
                                  f"({_reason(exc)}); {fix}; nothing was changed")

    def promote(self, version: int, alias: str = PRODUCTION) -> dict[str, Any]:
        """Point ``alias`` (default ``production``) at ``version``, which must verify."""
        return self.set_alias(alias, version, reason="promote")

    def rollback(self, alias: str = PRODUCTION, to: int | None = None, *,
                 on_skip: Callable[[int, str], None] | None = None) -> int:
        """Move ``alias`` back; return the version it now points at.

        Without ``to``: to the newest version in its history that is neither the current one
        nor one it was rolled back from, and that verifies — versions that are gone or broken
        are skipped (``on_skip(version, why)`` hears of each), because a rollback happens when
        things are already wrong and must not stop at the first missing file. With ``to``: to
        that version, which must verify (and this also repairs a damaged alias file).
        """
        try:
            record = self.alias_record(alias)
        except DamagedAliasError as exc:
            if to is None:
                raise DamagedAliasError(f"{exc}; a plain rollback needs that history: name the "
                                        "version with `rollback --to vN`") from None
            record = None
        if record is None and to is None:
            raise RegistryError(f"alias {alias!r} is not set in {self.url}: nothing to roll back")
        current = None if record is None else int(record["version"])
        if to is not None:
            target = parse_version(to)
            if target == current:
                raise RegistryError(f"alias {alias!r} already points at {format_version(target)}")
            self.set_alias(alias, target, reason="rollback")
            return target
        assert record is not None and current is not None
        skip = {current, *map(int, record.get("rolled_back", []))}
        candidates = list(dict.fromkeys(int(v) for v in reversed(record.get("history", []))
                                        if int(v) not in skip))
        skipped = []
        for target in candidates:
            try:
                self.verify(target)
            except RegistryError as exc:
                why = _why(target, exc)
                skipped.append(f"{format_version(target)} (" + (
                    "missing" if isinstance(exc, UnknownVersionError) else "fails verification")
                    + ")")
                if on_skip is not None:
                    on_skip(target, why)
                continue
            self.set_alias(alias, target, reason="rollback", verify=False)
            return target
        tried = f"; skipped {', '.join(skipped)}" if skipped else ""
        raise RegistryError(
            f"alias {alias!r} has nothing to roll back to: it points at "
            f"{format_version(current)} and has no earlier usable version that was not rolled "
            f"back from{tried} (give one with --to)")

    # -- retention ----------------------------------------------------------------------------
    def protected(self, keep_history: int | None = None) -> set[int]:
        """Versions retention never removes: every alias's current one and, per alias, the
        last ``keep_history`` distinct versions it pointed at before (``None``: all of them).

        Raises :class:`DamagedAliasError` if an alias file cannot be read: its history is what
        says which versions a rollback may still need, so without it nothing can be pruned.
        """
        records, damaged = self.scan_aliases()
        if damaged:
            why = next(iter(damaged.values()))
            raise DamagedAliasError(f"retention needs every alias's history: {why}")
        keep: set[int] = set()
        for record in records.values():
            keep.add(int(record["version"]))
            before = list(dict.fromkeys(int(v) for v in reversed(record.get("history", []))))
            keep.update(before if keep_history is None else before[:keep_history])
        return keep

    def gc(self, keep: int, *, keep_history: int | None = None,
           dry_run: bool = False) -> Retention:
        """Remove every committed version except the newest ``keep`` and the
        :meth:`protected` ones; with ``dry_run`` only say which.

        Each version goes manifest first (it is uncommitted from then on, so a crash leaves a
        directory readers ignore), then its other files. A version directory that links out of
        the registry is not touched (``refused``): what it points at is not the registry's to
        delete; remove the link by hand.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep {keep!r}: keep at least the newest version (1 or more)")
        if keep_history is not None and (isinstance(keep_history, bool) or keep_history < 0):
            raise ValueError(f"keep_history {keep_history!r}: give 0 or more (or none: all)")
        versions = self.versions()
        protect = self.protected(keep_history) | set(versions[-keep:])
        result = Retention(kept=[v for v in versions if v in protect])
        for v in versions:
            if v in protect:
                continue
            if dry_run:
                result.removed.append(v)
                continue
            vdir = _version_dir(v)
            try:
                paths = [f"{vdir}/{MANIFEST}",
                         *(p for p in self.store.list(vdir) if p != f"{vdir}/{MANIFEST}")]
                for path in paths:
                    self.store.delete(path)
            except OutsideStoreError as exc:
                result.refused[v] = str(exc)
                continue
            except OSError as exc:
                done = (f" (removed {', '.join(map(format_version, result.removed))} before)"
                        if result.removed else "")
                raise self._write_error(f"removing {format_version(v)}{done}", vdir, exc
                                        ) from None
            self._manifests.pop(v, None)
            result.removed.append(v)
        return result

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


def _reason(exc: BaseException) -> str:
    """The OS's words for ``exc`` without the path (the caller names the path)."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or \
        type(exc).__name__


def _why(version: int, exc: BaseException) -> str:
    """``exc``'s message without the leading ``"v7: "`` (the caller shows the version)."""
    return str(exc).removeprefix(f"{format_version(version)}: ")


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
