"""Pickle-free state: nested dicts of tensors and JSON values <-> one safetensors file.

Every stateful piece (trainer, strategy, buffers, detector, optimizer, random generators)
exposes ``state_dict()`` made of tensors and JSON values only. This module turns such a tree
into a flat ``{key: tensor}`` map plus a JSON skeleton that names where each tensor goes, and
writes both into a single safetensors file (the skeleton lives in the file's metadata). One
file keeps a snapshot atomic to publish with a single rename, and safetensors cannot execute
code on load, unlike ``torch.save``/pickle.

>>> import torch
>>> tree = {"step": 3, "w": torch.arange(4.0), "opt": {"state": {0: {"m": torch.ones(2)}}}}
>>> skeleton, tensors = flatten(tree)
>>> sorted(tensors)
['t0', 't1']
>>> back = unflatten(skeleton, tensors)
>>> back["step"], back["w"].tolist(), back["opt"]["state"][0]["m"].tolist()
(3, [0.0, 1.0, 2.0, 3.0], [1.0, 1.0])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

_TENSOR = "__tensor__"
_INTKEYS = "__intkeys__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"
_META_KEY = "streamcl.state"


def flatten(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON-serialisable skeleton and a flat dict of tensors.

    Dicts with int keys (as in ``torch.optim.Optimizer.state_dict()``) are kept as such;
    non-finite floats are encoded explicitly so the JSON stays standard.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            key = f"t{len(tensors)}"
            # clone: safetensors refuses shared storage and needs contiguous memory
            tensors[key] = node.detach().to("cpu").contiguous().clone()
            return {_TENSOR: key}
        if isinstance(node, dict):
            if node and all(isinstance(k, int) for k in node):
                return {_INTKEYS: [[k, walk(node[k])] for k in sorted(node)]}
            bad = [k for k in node if not isinstance(k, str)]
            if bad:
                raise TypeError(f"state keys must be str or int, got {bad[0]!r}")
            # sorted: tensor numbering must not depend on dict insertion order
            return {k: walk(node[k]) for k in sorted(node)}
        if isinstance(node, tuple):
            return {_TUPLE: [walk(v) for v in node]}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, float) and not math.isfinite(node):
            return {_FLOAT: repr(node)}
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"state values must be tensors or JSON values, got {type(node).__name__}")

    return walk(tree), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if _TENSOR in node:
                return tensors[node[_TENSOR]]
            if _INTKEYS in node:
                return {int(k): walk(v) for k, v in node[_INTKEYS]}
            if _TUPLE in node:
                return tuple(walk(v) for v in node[_TUPLE])
            if _FLOAT in node:
                return float(node[_FLOAT])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def dump_state(tree: Any) -> bytes:
    """``tree`` as the bytes of one safetensors file (the skeleton JSON in its metadata)."""
    skeleton, tensors = flatten(tree)
    return save(tensors, metadata={_META_KEY: json.dumps(skeleton, sort_keys=True)})


def save_state(tree: Any, path: str | os.PathLike[str]) -> None:
    """Write ``tree`` to ``path`` as one safetensors file (skeleton JSON in its metadata).

    The write is atomic: a temporary file in the same directory, fsync, then rename, so a
    reader or a crash never sees half a state.
    """
    data = dump_state(tree)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames, links and unlinks in ``directory`` durable (a no-op where unsupported):
    an atomic rename is only crash-safe once the directory entry itself is on disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def load_state(path: str | os.PathLike[str]) -> Any:
    """Read a tree written by :func:`save_state`. Never unpickles anything."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path}: not a streamcl state file (no {_META_KEY!r} metadata)")
    return unflatten(json.loads(meta[_META_KEY]), load_file(str(path)))


def state_sha256(tree: Any) -> str:
    """A content hash of a state tree: equal states hash equal, whatever process made them.

    Hashes the canonical JSON skeleton, then each tensor's dtype, shape and raw bytes in
    key order, so two runs that are bit-identical give the same digest.
    """
    skeleton, tensors = flatten(tree)
    h = hashlib.sha256(json.dumps(skeleton, sort_keys=True).encode())
    for key in sorted(tensors, key=lambda k: int(k[1:])):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rng_state(gen: torch.Generator) -> torch.Tensor:
    """A generator's state as a tensor (uint8), storable in safetensors."""
    return gen.get_state()


def set_rng_state(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(torch.uint8).contiguous())
