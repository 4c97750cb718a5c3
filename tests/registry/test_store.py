"""Stores: the same contract for a local directory, ``file://`` and ``memory://``.

Atomicity is tested the way it matters: a writer replaces and creates objects while reader
threads read them continuously, and every read must be a complete object (each object carries
the SHA-256 of its own body).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest

from streamcl.registry import FsspecStore, LocalStore, Store, check_path, open_store


def test_round_trip_list_and_exists(store: Store) -> None:
    assert store.list("versions") == [] and store.list() == []
    assert not store.exists("versions/000001/manifest.json")
    store.write_bytes("versions/000001/weights.safetensors", b"w1")
    store.write_bytes("versions/000001/manifest.json", b"m1")
    store.write_bytes("aliases/production.json", b"a")
    store.write_bytes("aliases/production.json", b"b")  # replace
    assert store.read_bytes("aliases/production.json") == b"b"
    assert store.exists("versions/000001/manifest.json")
    assert not store.exists("versions/000001")  # a folder is not an object
    assert store.list("versions") == ["versions/000001/manifest.json",
                                      "versions/000001/weights.safetensors"]
    assert store.list("versions/") == store.list("versions")
    assert store.list() == ["aliases/production.json", *store.list("versions")]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("versions/000002/manifest.json")


def test_create_exclusive_writes_only_once(store: Store) -> None:
    assert store.create_exclusive("versions/000003/manifest.json", b"first")
    assert not store.create_exclusive("versions/000003/manifest.json", b"second")
    assert store.read_bytes("versions/000003/manifest.json") == b"first"
    assert store.list("versions") == ["versions/000003/manifest.json"]  # no temporary left


BAD_PATHS = ["../escape", "versions/../../etc/passwd", "/etc/passwd", "a\\b", "a\x00b", "",
             "a//b", "a/./b", ".hidden", "versions/.tmp", "a b", "s3://bucket/key", "ü"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_paths_cannot_escape(store: Store, tmp_path: Path, path: str) -> None:
    for call in (lambda: store.write_bytes(path, b"x"), lambda: store.read_bytes(path),
                 lambda: store.exists(path), lambda: store.create_exclusive(path, b"x")):
        with pytest.raises(ValueError, match="store path") as info:
            call()
        assert repr(path) in str(info.value)  # the message names the path
    if path:  # list("") is the store root
        with pytest.raises(ValueError):
            store.list(path)
    assert store.list() == []  # nothing was written anywhere in the store...
    assert not (tmp_path / "escape").exists()  # ...or outside it


def test_check_path_accepts_registry_names() -> None:
    for ok in ("versions/000001/weights.safetensors", "aliases/production.json", "a-b_c.d"):
        assert check_path(ok) == ok


def test_open_store_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "r"), LocalStore)
    assert isinstance(open_store(str(tmp_path / "r")), LocalStore)
    assert isinstance(open_store("relative/registry"), LocalStore)
    assert isinstance(open_store((tmp_path / "r").as_uri()), FsspecStore)
    assert isinstance(open_store("memory://x/registry"), FsspecStore)
    local = open_store(tmp_path / "r")
    assert open_store(local) is local
    assert isinstance(open_store(local.url), LocalStore)  # url round-trips
    with pytest.raises(ValueError, match="nosuchproto"):
        open_store("nosuchproto://x")
    with pytest.raises(ValueError, match="empty"):
        open_store("  ")


def test_local_store_is_not_created_by_reading(tmp_path: Path) -> None:
    store = open_store(tmp_path / "typo")
    assert store.list() == [] and not store.exists("aliases/production.json")
    assert not (tmp_path / "typo").exists()


def _payload(i: int, rng: random.Random) -> bytes:
    # 64 KiB to 1 MiB: big enough that a non-atomic write is visibly torn
    body = f"object {i} ".encode() + rng.randbytes(rng.randint(1 << 16, 1 << 20))
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def _valid(data: bytes) -> bool:
    digest, _, body = data.partition(b"\n")
    return hashlib.sha256(body).hexdigest().encode() == digest


def test_readers_never_see_partial_objects(store: Store) -> None:
    """One writer replaces an alias-like object and creates version-like objects while three
    readers read both continuously; every one of at least 600 reads must be whole."""
    rng = random.Random(0)
    store.write_bytes("aliases/production.json", _payload(-1, rng))
    stop = threading.Event()
    reads: list[int] = [0, 0, 0]
    bad: list[str] = []

    def reader(k: int) -> None:
        while not stop.is_set():
            paths = ["aliases/production.json", *store.list("versions")[-2:]]
            for path in paths:
                data = store.read_bytes(path)
                if not _valid(data):
                    bad.append(f"{path}: {len(data)} bytes")
                reads[k] += 1

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    writes, deadline = 0, time.monotonic() + 30
    try:
        while (sum(reads) < 600 or writes < 40) and time.monotonic() < deadline and not bad:
            store.write_bytes("aliases/production.json", _payload(writes, rng))
            assert store.create_exclusive(f"versions/{writes:06d}/manifest.json",
                                          _payload(writes, rng))
            writes += 1
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not bad, bad[:5]
    assert sum(reads) >= 600 and writes >= 40
    assert len(store.list("versions")) == writes


def test_local_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "r")
    for i in range(5):
        store.write_bytes("aliases/production.json", str(i).encode())
        store.create_exclusive(f"versions/{i:06d}/manifest.json", b"m")
        store.create_exclusive(f"versions/{i:06d}/manifest.json", b"again")
    on_disk = sorted(str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").rglob("*")
                     if p.is_file())
    assert on_disk == ["aliases/production.json",
                       *(f"versions/{i:06d}/manifest.json" for i in range(5))]
    assert all(not name.startswith(".") for _, _, files in os.walk(tmp_path) for name in files)
