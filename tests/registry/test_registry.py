"""The registry on every store kind: publish, verified load, aliases, rollback, diff."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from streamcl.registry import (
    CorruptVersionError,
    InferenceModel,
    ModelRegistry,
    RegistryError,
    UnknownVersionError,
    VersionConflictError,
    parse_version,
)

Publish = Callable[..., dict[str, Any]]


def _flip_byte(registry: ModelRegistry, version: int, at: int = -100) -> None:
    path = f"versions/{version:06d}/weights.safetensors"
    data = bytearray(registry.store.read_bytes(path))
    data[at] ^= 0x01
    registry.store.write_bytes(path, bytes(data))


def test_publish_load_round_trip(registry: ModelRegistry, publish: Publish,
                                 exports: list[Any]) -> None:
    before = time.time()
    m1 = publish(registry, 0)
    assert registry.versions() == [1] and registry.latest() == 1
    assert m1["format"] == 1 and m1["version"] == 1 and m1["parent"] is None
    assert before <= m1["created_at"] <= time.time()
    raw = registry.store.read_bytes("versions/000001/weights.safetensors")
    assert m1["sha256"] == hashlib.sha256(raw).hexdigest() and m1["size_bytes"] == len(raw)
    assert m1["model"] == exports[0][1] and m1["position"] == 128
    assert json.loads(registry.store.read_bytes("versions/000001/manifest.json")) == m1
    tensors, manifest = registry.load(1)
    assert manifest == m1 and tensors.keys() == exports[0][0].keys()
    for k, v in exports[0][0].items():
        assert torch.equal(tensors[k], v), k
    model = registry.load_model(1)
    assert isinstance(model, InferenceModel) and model.version == 1
    assert model.labels == [0, 1]


def test_versions_number_up_and_parent_is_production(registry: ModelRegistry,
                                                     publish: Publish) -> None:
    publish(registry, 0, aliases=["production"])
    m2 = publish(registry, 1)
    m3 = publish(registry, 2, parent=None, aliases=["staging", "production"])
    assert registry.versions() == [1, 2, 3]
    assert m2["parent"] == 1 and m3["parent"] is None
    assert registry.aliases() == {"production": 3, "staging": 3}
    assert publish(registry, 0, version=7)["version"] == 7
    assert publish(registry, 1)["version"] == 8  # after the highest


def test_republishing_a_version_is_idempotent(registry: ModelRegistry, publish: Publish) -> None:
    """The service journals the number, crashes, and publishes the same number again."""
    first = publish(registry, 1, version=5)
    again = publish(registry, 1, version=5, aliases=["production"])
    assert again == first  # same manifest, created_at included: nothing was rewritten
    assert registry.versions() == [5] and registry.alias("production") == 5
    with pytest.raises(VersionConflictError, match="v5 is already published with different"):
        publish(registry, 2, version=5)
    assert registry.manifest(5) == first


def test_a_publication_without_manifest_is_invisible(registry: ModelRegistry,
                                                     publish: Publish) -> None:
    """A crash between the weights and the manifest leaves nothing visible; the retry of
    that number commits normally over the leftovers."""
    registry.store.write_bytes("versions/000004/weights.safetensors", b"half a file")
    assert registry.versions() == [] and not registry.exists(4)
    with pytest.raises(UnknownVersionError, match="no version v4"):
        registry.load(4)
    m = publish(registry, 0, version=4)
    assert registry.versions() == [4]
    assert registry.load(4)[1] == m


def test_corrupt_weights_are_refused(registry: ModelRegistry, publish: Publish) -> None:
    publish(registry, 0)
    publish(registry, 1)
    _flip_byte(registry, 2)
    with pytest.raises(CorruptVersionError, match=r"v2: weights SHA-256 .* does not match"):
        registry.load(2)
    with pytest.raises(CorruptVersionError, match="v2"):
        registry.load_model(2)
    registry.load(1)  # the others are fine
    registry.store.write_bytes("versions/000001/weights.safetensors", b"")
    with pytest.raises(CorruptVersionError, match="v1"):
        registry.load(1)


def test_reserved_fields_and_bad_names(registry: ModelRegistry, exports: list[Any]) -> None:
    tensors, section = exports[0]
    with pytest.raises(ValueError, match="sha256"):
        registry.publish(tensors, {"model": section, "sha256": "x"})
    with pytest.raises(ValueError, match="alias"):
        registry.publish(tensors, {"model": section}, aliases=["../production"])
    assert registry.versions() == []
    m = registry.publish(tensors, {"model": section, "metrics": {"loss": float("nan")}})
    assert m["metrics"] == {"loss": None}  # strict JSON on disk
    with pytest.raises(UnknownVersionError, match="no version v9"):
        registry.manifest(9)
    with pytest.raises(ValueError, match="version"):
        parse_version("seven")
    assert parse_version("v12") == parse_version("12") == 12


def test_promote_and_rollback(registry: ModelRegistry, publish: Publish) -> None:
    for i in range(3):
        publish(registry, i)
    assert registry.alias("production") is None
    with pytest.raises(RegistryError, match="not set"):
        registry.rollback()
    registry.promote(1)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    registry.promote(2)
    record = registry.promote(3)
    assert record["version"] == 3 and record["history"] == [1, 2]
    assert registry.alias_record("production")["history"] == [1, 2]
    # rolling back twice goes two steps back, not back and forth
    assert registry.rollback() == 2 and registry.alias("production") == 2
    assert registry.rollback() == 1
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    assert registry.rollback(to=3) == 3
    with pytest.raises(RegistryError, match="already points at v3"):
        registry.rollback(to=3)
    with pytest.raises(UnknownVersionError, match="no version v9"):
        registry.promote(9)
    assert registry.alias("production") == 3
    assert registry.promote(3)["history"] == registry.alias_record("production")["history"]
    registry.promote(2, alias="canary")
    assert registry.aliases() == {"canary": 2, "production": 3}
    with pytest.raises(RegistryError, match="canary"):
        registry.rollback("canary")


def test_diff(registry: ModelRegistry, publish: Publish, exports: list[Any]) -> None:
    publish(registry, 0)
    publish(registry, 2)
    d = registry.diff(1, 2)
    assert d["a"] == 1 and d["b"] == 2
    assert d["fields"]["position"] == {"a": 128, "b": 384}
    assert d["fields"]["model"]["b"]["n_classes"] == 6
    assert "sha256" not in d["fields"] and "created_at" not in d["fields"]
    assert d["noise"]["sha256"]["a"] != d["noise"]["sha256"]["b"]
    acc = d["metrics"]["holdout_accuracy"]
    assert acc["a"] == 0.5 and acc["b"] == pytest.approx(0.7)
    assert acc["delta"] == pytest.approx(0.2)
    assert d["metrics"]["prequential_accuracy"]["delta"] == 0
    head = d["tensors"]["head.weight"]
    assert head["shape_a"] == [2, 16] and head["shape_b"] == [6, 16] and head["shape_changed"]
    ta, tb = exports[0][0], exports[2][0]
    expect = float(torch.linalg.vector_norm((tb["head.weight"][:2] - ta["head.weight"]).double()))
    assert head["l2"] == pytest.approx(expect)
    body = d["tensors"]["body.1.weight"]
    assert not body["shape_changed"] and body["l2"] > 0
    same = registry.diff(2, 2)
    assert same["fields"] == {} and all(t["l2"] == 0 for t in same["tensors"].values())
    json.dumps(d)  # JSON-ready


def test_readers_see_whole_versions_while_publishing(registry: ModelRegistry, publish: Publish,
                                                     exports: list[Any]) -> None:
    """Readers resolve the alias and load its version (hash-verified) continuously while a
    writer publishes and promotes: no read ever fails or sees a half-written object."""
    publish(registry, 0, aliases=["production"])
    stop = threading.Event()
    loads = [0, 0]
    errors: list[str] = []

    def reader(k: int) -> None:
        reader_registry = ModelRegistry(registry.store)  # its own caches, like a service
        while not stop.is_set():
            try:
                version = reader_registry.alias("production")
                tensors, manifest = reader_registry.load(version)
                assert manifest["version"] == version
                assert tensors.keys() == exports[0][0].keys()
                loads[k] += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    published, deadline = 1, time.monotonic() + 30
    try:
        while (sum(loads) < 300 or published < 20) and time.monotonic() < deadline and not errors:
            publish(registry, published % 3, aliases=["production"])
            published += 1
            if published % 5 == 0:
                registry.rollback()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
    assert sum(loads) >= 300 and published >= 20
    assert registry.versions() == list(range(1, published + 1))
