"""Pickle-free state: flatten/unflatten, the safetensors file, its hash, atomic saves, damage."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import streamcl.state
from streamcl.state import flatten, load_state, save_state, state_sha256, unflatten


def sample_tree() -> dict[str, Any]:
    base = torch.arange(12.0).reshape(3, 4)
    return {
        "step": 7,
        "name": "agem",
        "flags": [True, False, None],
        "ratio": 0.25,
        "non_finite": [math.inf, -math.inf, math.nan, {"deep": math.nan}],
        "tuple": (1, "two", (3.0, torch.ones(2))),
        "optimizer": {"state": {0: {"momentum_buffer": torch.full((2, 2), 0.5)},
                                3: {"step": torch.tensor(4.0)}},
                      "param_groups": [{"params": [0, 3], "lr": 0.05, "foreach": None}]},
        "counts": {10: 4, 2: 9},  # int keys, not in sorted order
        "empty": torch.zeros(0),
        "empty_rows": torch.zeros(0, 3, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(-1),
        "half": torch.tensor([1.5, -2.25], dtype=torch.float16),
        "bf16": torch.tensor([3.0], dtype=torch.bfloat16),
        "bytes": torch.tensor([0, 255], dtype=torch.uint8),
        "transposed": base.t(),             # not contiguous
        "view_a": base[0], "view_b": base,   # share one storage
        "empty_dict": {},
        "empty_list": [],
        "rng": torch.Generator().manual_seed(3).get_state(),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where  # (str keys come back sorted)
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_flatten_unflatten_round_trip() -> None:
    tree = sample_tree()
    skeleton, tensors = flatten(tree)
    json.dumps(skeleton, allow_nan=False)  # strict JSON: non-finite floats are encoded
    assert all(isinstance(t, torch.Tensor) and t.is_contiguous() for t in tensors.values())
    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert_same(tree, back)


def test_save_load_round_trip_through_a_file(tmp_path: Path) -> None:
    tree = sample_tree()
    path = tmp_path / "state.safetensors"
    save_state(tree, path)
    back = load_state(path)
    assert_same(tree, back)
    assert isinstance(back["counts"], dict) and set(back["counts"]) == {10, 2}
    assert isinstance(back["tuple"][2], tuple)
    assert back["mask"].dtype == torch.bool and back["empty_rows"].shape == (0, 3)
    assert state_sha256(back) == state_sha256(tree)
    # the restored generator state is a working one
    gen = torch.Generator()
    gen.set_state(back["rng"])
    assert torch.equal(torch.rand(3, generator=gen),
                       torch.rand(3, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("bad", [{1.5: 0}, {(1, 2): 0}, {"a": 1, 2: 3}, {"s": {1, 2}},
                                 {"o": object()}, {"b": b"raw"}])
def test_flatten_refuses_what_json_and_tensors_cannot_hold(bad: dict) -> None:
    with pytest.raises(TypeError):
        flatten(bad)


def test_state_hash_ignores_str_key_insertion_order() -> None:
    a = {"b": torch.ones(2), "a": {"y": 1, "x": torch.zeros(3)}, "c": [1.0, math.nan]}
    b = {"c": [1.0, math.nan], "a": {"x": torch.zeros(3), "y": 1}, "b": torch.ones(2)}
    assert state_sha256(a) == state_sha256(b)


def test_state_hash_sees_every_difference() -> None:
    base = {"w": torch.zeros(2, 3), "n": 1, "s": "x"}
    h = state_sha256(base)
    assert state_sha256({**base, "w": torch.zeros(3, 2)}) != h           # shape
    assert state_sha256({**base, "w": torch.zeros(2, 3, dtype=torch.int32)}) != h  # dtype
    flipped = torch.zeros(2, 3)
    flipped.view(torch.int32)[1, 2] = 1                                    # one bit
    assert state_sha256({**base, "w": flipped}) != h
    assert state_sha256({**base, "n": 2}) != h
    assert state_sha256({**base, "n": 1.0}) != h                           # int vs float
    assert state_sha256({**base, "s": "y"}) != h
    assert state_sha256({**base, "extra": None}) != h
    assert state_sha256({"w": torch.zeros(2, 3), "n": 1, "s": "x"}) == h


def test_state_hash_ignores_int_key_insertion_order() -> None:
    a = {"state": {0: torch.ones(2), 1: torch.zeros(2)}}
    b = {"state": {1: torch.zeros(2), 0: torch.ones(2)}}
    assert a["state"].keys() == b["state"].keys()
    assert state_sha256(a) == state_sha256(b)


def test_save_is_atomic_and_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "snap.safetensors"
    save_state({"big": torch.randn(5000), "tag": "first"}, path)
    first_inode = path.stat().st_ino
    save_state({"small": torch.ones(2), "tag": "second"}, path)
    assert sorted(os.listdir(tmp_path)) == ["snap.safetensors"]  # no temporary file left
    back = load_state(path)
    assert set(back) == {"small", "tag"} and back["tag"] == "second"
    # a new file renamed over the old one, not the old one rewritten in place
    assert path.stat().st_ino != first_inode
    fresh = tmp_path / "fresh" / "snap.safetensors"
    fresh.parent.mkdir()
    save_state({"small": torch.ones(2), "tag": "second"}, fresh)
    assert path.read_bytes() == fresh.read_bytes()


def test_save_writes_a_sibling_file_and_renames_it_over_the_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Observed from inside the real write: the target keeps the whole old state until the new
    one is complete, because the bytes go to another file in the same directory."""
    path = tmp_path / "snap.safetensors"
    save_state({"v": torch.zeros(1000), "tag": "old"}, path)
    old = path.read_bytes()
    written: list[tuple[Path, bool, bool]] = []
    real_replace = os.replace

    def replace_and_look(src, dst):
        # at the rename the new bytes are complete in `src`; the target must still be old
        intact_before = path.read_bytes() == old
        complete = load_state(src)["tag"] == "new"
        written.append((Path(src), intact_before, complete))
        real_replace(src, dst)

    monkeypatch.setattr(streamcl.state.os, "replace", replace_and_look)
    save_state({"v": torch.ones(1000), "tag": "new"}, path)
    assert len(written) == 1
    target, intact_before, complete = written[0]
    assert target != path and target.parent == path.parent  # same filesystem: rename is atomic
    assert intact_before and complete
    assert load_state(path)["tag"] == "new"
    assert sorted(os.listdir(tmp_path)) == ["snap.safetensors"]


def test_a_failed_save_leaves_the_previous_state_intact(tmp_path: Path) -> None:
    path = tmp_path / "snap.safetensors"
    save_state({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_state({"w": torch.zeros(3), "bad": object()}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["snap.safetensors"]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, bytes, int]:
    path = tmp_path / "good.safetensors"
    save_state(sample_tree(), path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return path, raw, header_len


def test_flipped_header_bytes_are_an_error_not_garbage(saved, tmp_path: Path) -> None:
    _, raw, header_len = saved
    bad_path = tmp_path / "bad.safetensors"
    positions = sorted({*range(0, 8), *range(8, 8 + header_len, 11), 8 + header_len - 1})
    for pos in positions:
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        bad_path.write_bytes(bytes(bad))
        with pytest.raises((SafetensorError, ValueError)):
            load_state(bad_path)
    assert len(positions) > 50


@pytest.mark.parametrize("keep", ["nothing", "4 bytes", "length only", "half header",
                                  "header only", "all but one byte"])
def test_truncated_files_are_an_error(keep: str, saved, tmp_path: Path) -> None:
    _, raw, header_len = saved
    size = {"nothing": 0, "4 bytes": 4, "length only": 8, "half header": 8 + header_len // 2,
            "header only": 8 + header_len, "all but one byte": len(raw) - 1}[keep]
    bad_path = tmp_path / "cut.safetensors"
    bad_path.write_bytes(raw[:size])
    with pytest.raises((SafetensorError, ValueError)):
        load_state(bad_path)


def test_a_safetensors_file_that_is_not_a_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not a streamcl state"):
        load_state(path)
