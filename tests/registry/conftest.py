"""Fixtures for the model registry: every store kind, small real models, the real broker.

The registry's guarantees are about storage, so its tests run against each kind of store it
supports: a local directory (:class:`LocalStore`), and fsspec's ``file://`` and ``memory://``
(:class:`FsspecStore`). Models are real exports of real trainers on scikit-learn's digits.
``kafka_bootstrap`` is the session's broker (tests/conftest.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from streamcl.data import Stream
from streamcl.registry import ModelRegistry, Store, export_model, open_store
from streamcl.trainer import OnlineTrainer, TrainerConfig

STORE_KINDS = ("local", "file-url", "memory-url")


def make_store(kind: str, tmp_path: Path) -> Store:
    if kind == "local":
        return open_store(tmp_path / "registry")
    if kind == "file-url":
        return open_store((tmp_path / "registry").as_uri())
    if kind == "memory-url":
        return open_store(f"memory://streamcl-test-{uuid.uuid4().hex}/registry")
    raise AssertionError(kind)


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each kind."""
    s = make_store(request.param, tmp_path)
    yield s
    if request.param == "memory-url":  # memory:// is process-global: free it
        fs = s.fs  # type: ignore[attr-defined]
        if fs.exists(s.root):  # type: ignore[attr-defined]
            fs.rm(s.root, recursive=True)  # type: ignore[attr-defined]


@pytest.fixture
def registry(store: Store) -> ModelRegistry:
    return ModelRegistry(store)


def train(trainer: OnlineTrainer, stream: Stream, start: int, stop: int,
          batch_size: int = 32) -> OnlineTrainer:
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        task = int(stream.task[s]) if stream.task is not None else None
        trainer.step(torch.from_numpy(stream.x[s:e]), torch.from_numpy(stream.y[s:e]), task)
    return trainer


def small_trainer(strategy: str = "naive", **params: Any) -> OnlineTrainer:
    return OnlineTrainer(TrainerConfig(input_shape=(64,), hidden=(16,), strategy=strategy,
                                       boundaries="task", params=params))


@pytest.fixture(scope="session")
def exports(split_digits_once: Stream) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Three successive exports of one naive trainer on split digits: after 128, 384 and 640
    samples (the last two with more classes, so the head grew)."""
    trainer = small_trainer()
    out, pos = [], 0
    for stop in (128, 384, 640):
        train(trainer, split_digits_once, pos, stop)
        pos = stop
        out.append(export_model(trainer))
    return out


@pytest.fixture
def publish(exports: list[Any]) -> Callable[..., dict[str, Any]]:
    """``publish(registry, i, **kwargs)``: publish export ``i`` with a realistic manifest."""
    def _publish(registry: ModelRegistry, i: int, **kwargs: Any) -> dict[str, Any]:
        tensors, section = exports[i]
        fields = {"model": section, "strategy": "naive", "position": 128 * (i + 1),
                  "metrics": {"holdout_accuracy": 0.5 + 0.1 * i, "prequential_accuracy": 0.4}}
        return registry.publish(tensors, fields, **kwargs)

    return _publish
