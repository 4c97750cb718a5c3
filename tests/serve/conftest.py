"""Fixtures for ``streamcl serve``: real models of real trainers, a real registry, a real server.

The models are exports of small trainers on scikit-learn's digits (64 features in [0, 1]):
``exports[0]`` knows 2 classes, ``exports[1]`` 6, ``exports[2]`` is an IL2M model with a
rectifier. ``serving(registry, **kw)`` starts an :class:`InferenceServer` on a free port and
waits (with a deadline) until it is ready; the client every test uses to talk to it is Triton's
own (``tritonclient.http``) or plain ``urllib``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from streamcl.data import Stream
from streamcl.registry import ModelRegistry, export_model
from streamcl.serve import InferenceServer
from streamcl.trainer import OnlineTrainer, TrainerConfig

Export = tuple[dict[str, torch.Tensor], dict[str, Any]]


def _train(strategy: str, stream: Stream, stop: int) -> Export:
    trainer = OnlineTrainer(TrainerConfig(input_shape=(64,), hidden=(32,), strategy=strategy,
                                          boundaries="task"))
    for s in range(0, stop, 32):
        e = min(s + 32, stop)
        task = int(stream.task[s]) if stream.task is not None else None
        trainer.step(torch.from_numpy(stream.x[s:e]), torch.from_numpy(stream.y[s:e]), task)
    return export_model(trainer)


@pytest.fixture(scope="session")
def exports(split_digits_once: Stream) -> list[Export]:
    return [_train("naive", split_digits_once, 128), _train("naive", split_digits_once, 640),
            _train("il2m", split_digits_once, 640)]


@pytest.fixture(scope="session")
def probe(split_digits_once: Stream) -> torch.Tensor:
    """Inputs of classes 0-5, on which the 2-class and 6-class models disagree."""
    return torch.from_numpy(split_digits_once.x[:640:8].copy())


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def publish(exports: list[Export]) -> Callable[..., dict[str, Any]]:
    """``publish(registry, i, **kwargs)``: publish export ``i``."""
    def _publish(registry: ModelRegistry, i: int, **kwargs: Any) -> dict[str, Any]:
        tensors, section = exports[i]
        return registry.publish(tensors, {"model": section}, **kwargs)

    return _publish


@pytest.fixture
def damage() -> Callable[[ModelRegistry, int], None]:
    """``damage(registry, version)``: flip the last byte of that version's weights, as a disk
    or a copy might, so that its SHA-256 no longer matches the manifest."""
    def _damage(registry: ModelRegistry, version: int) -> None:
        path = f"versions/{version:06d}/weights.safetensors"
        data = bytearray(registry.store.read_bytes(path))
        data[-1] ^= 0xFF
        registry.store.write_bytes(path, bytes(data))

    return _damage


def wait_until(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)  # polling interval of a condition with a deadline
    return check()


def get(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
        method: str | None = None) -> tuple[int, bytes]:
    """Status and body of a plain HTTP request (an error status is returned, not raised)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def is_ready(url: str) -> bool:
    try:
        return get(f"{url}/v2/health/ready")[0] == 200
    except OSError:
        return False


@pytest.fixture
def serving() -> Callable[..., Any]:
    @contextmanager
    def _serving(registry: ModelRegistry, name: str = "digits", *, ready: bool = True,
                 **kwargs: Any) -> Iterator[InferenceServer]:
        kwargs.setdefault("poll_s", 0.05)
        with InferenceServer(registry, name, host="127.0.0.1", port=0, **kwargs) as server:
            if ready:
                assert wait_until(lambda: is_ready(server.url)), "the server never got ready"
            yield server

    return _serving


def infer_json(x: torch.Tensor, datatype: str = "FP32", **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape),
                                   "datatype": datatype, "data": x.flatten().tolist()}],
                       **extra}).encode()


class Http:
    """The plain-HTTP helpers, as one fixture (``tests/`` is not importable as a package)."""

    get = staticmethod(get)
    wait_until = staticmethod(wait_until)
    infer_json = staticmethod(infer_json)
    is_ready = staticmethod(is_ready)


@pytest.fixture(scope="session")
def http() -> type[Http]:
    return Http
