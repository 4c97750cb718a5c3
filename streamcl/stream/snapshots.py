"""The snapshot store: the learner's full state every so often, verified before it is trusted.

A snapshot is the trainer's ``state_dict()`` after journal entry ``covers_seq`` took effect
(:mod:`streamcl.stream.journal`: recovery loads it and replays the entries after it), with the
input offsets to continue from. In the store's directory it is two files:

* ``snapshot-<covers_seq:012d>.safetensors``: the state (:func:`streamcl.state.dump_state`:
  tensors and a JSON skeleton, no pickle, nothing executes on load);
* ``snapshot-<covers_seq:012d>.json``, the sidecar: ``covers_seq``, ``offsets`` (next input
  offset per partition, string keys), ``sha256`` and ``size`` of the state file's bytes,
  ``created_at`` (ISO 8601, UTC), ``file`` and ``format``.

Each is written to a temporary name (a dot file), fsynced, renamed into place, and the directory
is fsynced, so neither ever exists half-written under its final name. The state file goes
first; **the sidecar is the commit point**: a state file without a valid sidecar is an
incomplete snapshot (a crash between the two renames) and is never loaded. A snapshot is valid
when its sidecar parses, names its own ``covers_seq``, and the state file has the sidecar's size
and SHA-256 and loads. :meth:`SnapshotStore.latest_valid` returns the newest valid one and
records why it passed over any newer one (:attr:`SnapshotStore.skipped`, also logged as
warnings): bit rot, a truncated copy, a lost or garbled sidecar all fall back to the previous
snapshot, and the journal replays the difference.

Retention keeps the newest ``keep`` valid snapshots; whatever else matches the naming (older
snapshots, incomplete or corrupt ones, leftover temporary files of interrupted writes) is
deleted after each save. One writer per directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamcl.state import dump_state, fsync_dir, load_state

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
_NAME = re.compile(r"^snapshot-(\d{12})\.(safetensors|json)$")
_TEMP = re.compile(r"^\.+snapshot-\d{12}\.")  # temporary files of an interrupted write


@dataclass(frozen=True)
class SnapshotInfo:
    """A committed snapshot, as its sidecar describes it."""

    covers_seq: int
    offsets: dict[int, int]
    sha256: str
    size: int
    created_at: str
    path: Path      # the state file
    sidecar: Path

    def to_json(self) -> dict[str, Any]:
        """The sidecar's content."""
        return {"format": SIDECAR_FORMAT, "covers_seq": self.covers_seq,
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "sha256": self.sha256, "size": self.size, "created_at": self.created_at,
                "file": self.path.name}


@dataclass(frozen=True)
class Skipped:
    """A snapshot :meth:`SnapshotStore.latest_valid` passed over, and why."""

    covers_seq: int
    path: Path
    reason: str


class SnapshotError(ValueError):
    """A snapshot is incomplete or damaged (the message says how)."""


class SnapshotWriteError(SnapshotError):
    """A snapshot could not be written (a read-only or full volume): nothing of it is left
    behind and the earlier snapshots are intact; the message names the directory and the fix."""


def _unwritable(directory: Path, exc: OSError, what: str) -> SnapshotWriteError:
    return SnapshotWriteError(
        f"snapshots.dir {directory}: cannot write {what} ({exc.strerror or exc}); the earlier "
        "snapshots are intact: free space there or point snapshots.dir at a writable volume")


class SnapshotStore:
    """Snapshots of a learner's state in ``directory`` (created if missing), newest ``keep``."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.directory, exc, "the directory") from None
        self.keep = keep
        #: what the last :meth:`latest_valid` call passed over, newest first
        self.skipped: list[Skipped] = []
        # files this process wrote or verified: (name, size, mtime_ns) -> sha256
        self._verified: dict[tuple[str, int, int], str] = {}

    # -- names ----------------------------------------------------------------------------
    def state_path(self, covers_seq: int) -> Path:
        return self.directory / f"snapshot-{covers_seq:012d}.safetensors"

    def sidecar_path(self, covers_seq: int) -> Path:
        return self.directory / f"snapshot-{covers_seq:012d}.json"

    def _seqs(self) -> list[int]:
        """Every covers_seq with a state file or a sidecar under its final name, newest first."""
        seqs = {int(m.group(1)) for name in os.listdir(self.directory)
                if (m := _NAME.match(name))}
        return sorted(seqs, reverse=True)

    # -- writing --------------------------------------------------------------------------
    def save(self, state: Any, *, covers_seq: int,
             offsets: Mapping[int, int]) -> SnapshotInfo:
        """Commit ``state`` as the snapshot after journal entry ``covers_seq``; prune old ones.

        Returns once both files and the directory entry are on disk. Saving the same
        ``covers_seq`` again replaces that snapshot (its old sidecar is removed first, so the
        pair is never mismatched under a valid sidecar).
        """
        if isinstance(covers_seq, bool) or not isinstance(covers_seq, int) or covers_seq < 0:
            raise ValueError(f"covers_seq must be an int >= 0, got {covers_seq!r}")
        offsets = {int(p): int(o) for p, o in offsets.items()}
        if any(p < 0 or o < 0 for p, o in offsets.items()):
            raise ValueError(f"offsets must be partition -> offset, both >= 0, got {offsets}")
        path, sidecar = self.state_path(covers_seq), self.sidecar_path(covers_seq)
        if sidecar.exists():
            sidecar.unlink()
            fsync_dir(self.directory)
        data = dump_state(state)
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        try:
            _write_atomic(path, data, self._temp(path))
            stat = path.stat()
            info = SnapshotInfo(covers_seq=covers_seq, offsets=offsets, sha256=digest,
                                size=size, path=path, sidecar=sidecar,
                                created_at=datetime.now(UTC).isoformat(timespec="milliseconds"))
            _write_atomic(sidecar, (json.dumps(info.to_json(), indent=1) + "\n").encode(),
                          self._temp(sidecar))
        except OSError as exc:
            # a state file without its sidecar is no snapshot: remove it, so that a service
            # restarted on a full disk does not pile up partial files
            with contextlib.suppress(OSError):
                path.unlink()
            raise _unwritable(self.directory, exc, f"snapshot {covers_seq}") from None
        self._verified[(path.name, stat.st_size, stat.st_mtime_ns)] = digest
        self._prune(covers_seq)
        return info

    def check_writable(self) -> None:
        """Raise :class:`SnapshotWriteError` now, at start-up, if the directory cannot take a
        file (a read-only volume), rather than after a recovery at the first snapshot."""
        probe = self._temp(self.directory / "write-check")
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise _unwritable(self.directory, exc, "files") from None

    def _temp(self, final: Path) -> Path:
        return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")

    def _prune(self, just_saved: int) -> None:
        kept = 0
        for seq in self._seqs():
            if seq == just_saved:
                kept += 1
                continue
            if kept < self.keep:
                why = self._problem(seq)
                if why is None:
                    kept += 1
                    continue
            else:
                why = "retention"
            for p in (self.sidecar_path(seq), self.state_path(seq)):  # sidecar first: uncommit
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            log.info("snapshot %d in %s removed (%s)", seq, self.directory, why)
        for name in os.listdir(self.directory):
            if _TEMP.match(name):  # an interrupted write's leftovers (one writer per directory)
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()
        fsync_dir(self.directory)

    # -- reading --------------------------------------------------------------------------
    def list(self) -> list[SnapshotInfo]:
        """Committed snapshots (their sidecar parses), newest first; contents not verified."""
        out = []
        for seq in self._seqs():
            with contextlib.suppress(SnapshotError):
                out.append(self._info(seq))
        return out

    def latest_valid(self) -> tuple[SnapshotInfo, dict[str, Any]] | None:
        """The newest valid snapshot and its loaded state, or ``None`` if there is none.

        Every newer snapshot passed over is in :attr:`skipped` with the reason, and logged.
        """
        self.skipped = []
        for seq in self._seqs():
            try:
                info = self._info(seq)
                self._verify(info)
                state = load_state(info.path)
                if not isinstance(state, dict):
                    raise SnapshotError(f"state is a {type(state).__name__}, not a dict")
            except SnapshotError as exc:
                self._skip(seq, str(exc))
            except Exception as exc:  # a verified file that does not load: still skip it
                self._skip(seq, f"does not load: {type(exc).__name__}: {exc}")
            else:
                return info, state
        return None

    def load(self, covers_seq: int) -> tuple[SnapshotInfo, dict[str, Any]]:
        """The snapshot of ``covers_seq``, verified; raises :class:`SnapshotError` if invalid."""
        info = self._info(covers_seq)
        self._verify(info)
        try:
            return info, load_state(info.path)
        except Exception as exc:
            raise SnapshotError(f"snapshot {covers_seq} does not load: "
                                f"{type(exc).__name__}: {exc}") from exc

    # -- checks ---------------------------------------------------------------------------
    def _skip(self, seq: int, reason: str) -> None:
        self.skipped.append(Skipped(seq, self.state_path(seq), reason))
        log.warning("snapshot %d in %s skipped: %s", seq, self.directory, reason)

    def _problem(self, seq: int) -> str | None:
        try:
            self._verify(self._info(seq), cached=True)
        except SnapshotError as exc:
            return str(exc)
        return None

    def _info(self, seq: int) -> SnapshotInfo:
        """Parse and check the sidecar of ``seq`` (raises :class:`SnapshotError`)."""
        sidecar = self.sidecar_path(seq)
        try:
            raw = sidecar.read_bytes()
        except FileNotFoundError:
            raise SnapshotError("incomplete: no sidecar") from None
        except OSError as exc:
            raise SnapshotError(f"sidecar unreadable: {exc}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SnapshotError(f"sidecar is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SnapshotError("sidecar is not a JSON object")
        if data.get("format") != SIDECAR_FORMAT:
            raise SnapshotError(f"sidecar format {data.get('format')!r} unknown")
        if data.get("covers_seq") != seq or not _is_int(data.get("covers_seq")):
            raise SnapshotError(f"sidecar says covers_seq {data.get('covers_seq')!r}, its name "
                                f"{seq}")
        sha, size, created = data.get("sha256"), data.get("size"), data.get("created_at")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise SnapshotError(f"sidecar sha256 {sha!r} is not a SHA-256 hex digest")
        if not _is_int(size) or size < 0:
            raise SnapshotError(f"sidecar size {size!r} is not a byte count")
        if not isinstance(created, str):
            raise SnapshotError(f"sidecar created_at {created!r} is not a string")
        raw_offsets = data.get("offsets")
        if not isinstance(raw_offsets, dict):
            raise SnapshotError("sidecar offsets is not an object")
        offsets = {}
        for p, o in raw_offsets.items():
            if not (isinstance(p, str) and p.isdigit() and _is_int(o) and o >= 0):
                raise SnapshotError(f"sidecar offsets entry {p!r}: {o!r} is not "
                                    "partition: offset")
            offsets[int(p)] = o
        return SnapshotInfo(covers_seq=seq, offsets=dict(sorted(offsets.items())), sha256=sha,
                            size=size, created_at=created, path=self.state_path(seq),
                            sidecar=sidecar)

    def _verify(self, info: SnapshotInfo, *, cached: bool = False) -> None:
        """Check the state file's size and SHA-256 against the sidecar.

        With ``cached``, a file this process wrote or hashed before, unchanged in name, size and
        mtime, is not read again (retention's check; loading always reads the bytes, since bit
        rot changes no metadata).
        """
        try:
            stat = info.path.stat()
        except FileNotFoundError:
            raise SnapshotError("state file missing") from None
        if stat.st_size != info.size:
            raise SnapshotError(f"state file has {stat.st_size} bytes, the sidecar says "
                                f"{info.size} (truncated or replaced)")
        key = (info.path.name, stat.st_size, stat.st_mtime_ns)
        digest = self._verified.get(key) if cached else None
        if digest is None:
            try:
                digest, _ = _digest(info.path)
            except OSError as exc:
                raise SnapshotError(f"state file unreadable: {exc}") from None
        if digest != info.sha256:
            self._verified.pop(key, None)
            raise SnapshotError(f"state file SHA-256 {digest[:12]}... does not match the "
                                f"sidecar's {info.sha256[:12]}... (damaged)")
        self._verified[key] = digest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _digest(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file's bytes."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        return digest.hexdigest(), fh.tell()


def _write_atomic(path: Path, data: bytes, tmp: Path) -> None:
    """``data`` to ``path`` via ``tmp``: write, fsync, rename, fsync the directory."""
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
