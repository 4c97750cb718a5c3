"""Where the registry keeps its bytes: a local directory or any fsspec URL, behind one interface.

The registry needs very little from storage, and the few things it needs are about readers
that run while the trainer writes:

* **whole objects only** — :meth:`Store.write_bytes` replaces an object atomically, so an
  inference service that reads while the trainer publishes sees the old bytes or the new ones,
  never a torn mix (a torn alias file would point nowhere; torn weights would fail their hash);
* **create-if-absent** — :meth:`Store.create_exclusive` is how a version is committed: its
  manifest is created only if it does not exist, so a version, once visible, is never rewritten;
* **names that cannot escape** — every path is checked (:func:`check_path`) before it reaches a
  filesystem, so a version or alias name taken from a command line or a message cannot walk out
  of the store with ``..``, an absolute path or a backslash; and on a local filesystem a path
  that *resolves* outside the store through a symlink is refused too (:class:`OutsideStoreError`):
  a version is only as trustworthy as the directory it lives in, and a link to somewhere else is
  somebody else's file that can change under the registry's feet.

:class:`LocalStore` is a directory on a POSIX filesystem (temporary file, fsync, ``os.replace``,
directory fsync: durable and atomic). :class:`FsspecStore` is anything fsspec can open — ``s3://``
(and S3-compatible stores such as MinIO), ``gs://``, ``memory://``, ``file://``: one PUT per
object, atomic on object stores. :func:`open_store` picks one from a location string.

>>> import tempfile
>>> store = open_store(tempfile.mkdtemp())
>>> store.write_bytes("aliases/a.json", b"{}")
>>> store.create_exclusive("aliases/a.json", b"[]"), store.read_bytes("aliases/a.json")
(False, b'{}')
>>> store.list("aliases")
['aliases/a.json']
>>> store.read_bytes("../etc/passwd")  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: store path '../etc/passwd': '..' is not allowed ...
>>> import shutil; shutil.rmtree(store.url)
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from streamcl.state import fsync_dir

_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")
_RULE = "relative names of [A-Za-z0-9._-] components only"


class OutsideStoreError(ValueError):
    """A store path that a symlink leads out of the store's directory: refused for reading,
    writing and deleting (a ``ValueError``, like any other bad name)."""


def check_path(path: str, *, allow_empty: bool = False) -> str:
    """``path`` if it is a safe store-relative name, else ``ValueError`` naming it.

    Safe means: ``/``-separated components matching ``[A-Za-z0-9._-]+``, none of them ``.`` or
    ``..`` and none starting with a dot (hidden names are reserved for temporary files, so an
    object can never collide with a write in progress). That rules out absolute paths, ``..``,
    backslashes, NUL bytes, empty components and URL syntax. ``allow_empty`` admits ``""``, the
    store's root, for :meth:`Store.list`.
    """
    if not isinstance(path, str):
        raise ValueError(f"store path {path!r}: must be a string")
    if path == "" and allow_empty:
        return path
    for bad, what in (("\x00", "a NUL byte"), ("\\", "a backslash")):
        if bad in path:
            raise ValueError(f"store path {path!r}: {what} is not allowed ({_RULE})")
    if path.startswith("/"):
        raise ValueError(f"store path {path!r}: absolute paths are not allowed ({_RULE})")
    for part in path.split("/"):
        if part in (".", ".."):
            raise ValueError(f"store path {path!r}: {part!r} is not allowed ({_RULE})")
        if not _COMPONENT.fullmatch(part):
            raise ValueError(f"store path {path!r}: component {part!r} is not allowed ({_RULE})")
        if part.startswith("."):
            raise ValueError(f"store path {path!r}: hidden component {part!r} is not allowed "
                             f"({_RULE}, not starting with a dot)")
    return path


@runtime_checkable
class Store(Protocol):
    """Storage as the registry sees it: whole objects under safe relative names.

    Missing objects raise ``FileNotFoundError`` from :meth:`read_bytes`; a bad name raises
    ``ValueError`` from every method.
    """

    @property
    def url(self) -> str:
        """Where the store is, in a form :func:`open_store` accepts (announced to watchers)."""
        ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Create or replace the object atomically: no reader ever sees a partial object."""
        ...

    def read_bytes(self, path: str) -> bytes:
        ...

    def exists(self, path: str) -> bool:
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Every object under the folder ``prefix``, as sorted store-relative paths."""
        ...

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write the object only if absent; ``False`` (and nothing written) if it existed."""
        ...

    def delete(self, path: str) -> None:
        """Remove the object if it exists (retention, and cleaning up a failed publication);
        folders left empty are removed with it."""
        ...


# -- local directories ---------------------------------------------------------------------------
def _makedirs(directory: Path) -> None:
    """``mkdir -p`` that also makes each new directory's entry durable in its parent."""
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent writer made it: fine
            d.mkdir()
        fsync_dir(d.parent)


def _write_temp(target: Path, data: bytes) -> Path:
    """``data`` in a hidden temporary file next to ``target``, flushed to disk."""
    _makedirs(target.parent)
    # unique per process and thread: concurrent writers never share a temporary file
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}-"
                           f"{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _local_write(target: Path, data: bytes) -> None:
    tmp = _write_temp(target, data)
    try:
        os.replace(tmp, target)  # atomic: readers open the old inode or the new one
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def _local_create(target: Path, data: bytes) -> bool:
    tmp = _write_temp(target, data)
    try:
        # link(2) fails if the name exists, and makes a complete file visible in one step
        os.link(tmp, target)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    fsync_dir(target.parent)
    return True


def _contained(root: Path, target: Path, path: str) -> Path:
    """``target`` if it resolves inside ``root``, else :class:`OutsideStoreError`.

    Resolved with every symlink followed (a missing tail is fine: that is a write about to
    happen), so a version directory or file linked in from elsewhere is caught whatever it is.
    """
    real, base = os.path.realpath(target), os.path.realpath(root)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise OutsideStoreError(
            f"store path {path!r} resolves outside the store ({real}, through a symlink): "
            "links that leave the registry are refused; put the files themselves there")
    return target


def _local_list(root: Path, prefix: str) -> list[str]:
    base = root / prefix if prefix else root
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        names = [n for n in filenames if not n.startswith(".")]  # "." = writes in progress
        for d in dirnames:
            # os.walk does not enter symlinked folders (no loops); their own files are listed,
            # so that a linked-in version is seen -- and refused when it is read -- instead of
            # being invisible yet reachable by name
            link = Path(dirpath) / d
            if not d.startswith(".") and link.is_symlink():
                with contextlib.suppress(OSError):
                    names += [f"{d}/{e.name}" for e in os.scandir(link)
                              if not e.name.startswith(".") and e.is_file()]
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [name if rel_dir == "." else f"{rel_dir}/{name}" for name in names]
    return sorted(out)


def _local_delete(root: Path, target: Path) -> None:
    """Unlink ``target`` (a symlink itself, never what it points at) and prune the folders it
    leaves empty, up to ``root``."""
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    d = target.parent
    while d != root and root in d.parents:
        try:
            d.rmdir()  # only if empty
        except OSError:
            break
        d = d.parent
    fsync_dir(d)


class LocalStore:
    """A directory: atomic, durable writes with POSIX rename and link semantics.

    The directory is created on the first write, not on construction, so opening a mistyped
    location to read from it does not leave an empty registry behind.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def url(self) -> str:
        return str(self.root)

    def _path(self, path: str) -> Path:
        return _contained(self.root, self.root / check_path(path), path)

    def write_bytes(self, path: str, data: bytes) -> None:
        _local_write(self._path(path), data)

    def read_bytes(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def delete(self, path: str) -> None:
        # the link itself may point outside (that is what gets removed); its folder may not
        target = self.root / check_path(path)
        _contained(self.root, target.parent, path)
        _local_delete(self.root, target)

    def exists(self, path: str) -> bool:
        # not checked for symlinks: the name is taken either way; reading it is what is refused
        return (self.root / check_path(path)).is_file()

    def list(self, prefix: str = "") -> list[str]:
        return _local_list(self.root, check_path(prefix.rstrip("/"), allow_empty=True))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        return _local_create(self._path(path), data)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"


# -- fsspec URLs ---------------------------------------------------------------------------------
class FsspecStore:
    """Any fsspec URL: ``s3://bucket/registry``, ``memory://registry``, ``file:///srv/registry``.

    Each object is written with one ``pipe_file`` — a single PUT, which object stores (S3 and
    compatibles, GCS, Azure) make visible atomically, and which ``memory://`` swaps in whole.
    ``file://`` URLs are written like :class:`LocalStore` (temporary file and rename), because
    fsspec's local ``pipe_file`` writes in place.

    :meth:`create_exclusive` asks fsspec for a create-only write (``mode="create"``), which
    recent fsspec backends implement atomically (s3fs with a conditional ``If-None-Match`` PUT);
    a backend without it falls back to check-then-write, which two concurrent writers could
    race. The registry relies on it only to catch a second publisher by mistake: by design it
    has a single writer, the trainer service (see :mod:`streamcl.registry.registry`).

    Listings are re-read on every :meth:`list` (fsspec's directory cache is dropped first), so a
    poller sees new versions on a remote store.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self._url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)

    @property
    def url(self) -> str:
        return self._url

    def _full(self, path: str) -> str:
        full = f"{self.root}/{check_path(path)}"
        if self._local:
            _contained(Path(self.root), Path(full), path)
        return full

    def write_bytes(self, path: str, data: bytes) -> None:
        full = self._full(path)
        if self._local:
            _local_write(Path(full), data)
        else:
            self.fs.pipe_file(full, data)

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(self._full(path)))

    def exists(self, path: str) -> bool:
        full = f"{self.root}/{check_path(path)}"
        self.fs.invalidate_cache(full)
        return bool(self.fs.isfile(full))

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_path(prefix.rstrip("/"), allow_empty=True)
        base = f"{self.root}/{prefix}" if prefix else self.root
        if self._local:
            return _local_list(Path(self.root), prefix)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base, withdirs=False)
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/")
        out = []
        for p in found:
            p = self.fs._strip_protocol(p)
            rel = p[len(root) + 1:] if p.startswith(root + "/") else None
            if rel and not any(part.startswith(".") for part in rel.split("/")):
                out.append(rel)
        return sorted(out)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        full = self._full(path)
        if self._local:
            return _local_create(Path(full), data)
        self.fs.invalidate_cache(full)
        if self.fs.exists(full):  # cheap answer for the common case, and for old fsspec
            return False
        try:
            self.fs.pipe_file(full, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a backend whose pipe_file has no create mode: best effort
            self.fs.pipe_file(full, data)
        return True

    def delete(self, path: str) -> None:
        if self._local:
            target = Path(f"{self.root}/{check_path(path)}")
            _contained(Path(self.root), target.parent, path)
            _local_delete(Path(self.root), target)
            return
        full = self._full(path)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(full)
        self.fs.invalidate_cache(full)

    def __repr__(self) -> str:
        return f"FsspecStore({self._url!r})"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def open_store(location: str | os.PathLike[str] | Store) -> Store:
    """A :class:`Store` for ``location``: a ``scheme://`` URL -> :class:`FsspecStore`, a plain
    path -> :class:`LocalStore`; a store is returned as it is."""
    if isinstance(location, LocalStore | FsspecStore):
        return location
    if isinstance(location, os.PathLike):
        return LocalStore(location)
    if not isinstance(location, str):
        if isinstance(location, Store):
            return location
        raise ValueError(f"registry location {location!r}: give a path or a URL")
    if not location.strip():
        raise ValueError("registry location is empty: give a path or a URL")
    if _SCHEME.match(location):
        try:
            return FsspecStore(location)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"registry location {location!r}: {exc}") from None
    return LocalStore(location)
