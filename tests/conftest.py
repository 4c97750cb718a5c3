"""Shared fixtures: the real split-digits streams and a small-trainer factory.

Everything here is real: scikit-learn's digits, real ``OnlineTrainer``s with small MLPs, real
files under ``tmp_path``. Torch runs single-threaded so results are reproducible bit for bit and
the suite stays fast on two cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from streamcl.data import Stream, digits, split_stream
from streamcl.trainer import OnlineTrainer, TrainerConfig

THREADS = 1


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def digits_data() -> tuple[Stream, Stream]:
    """scikit-learn's digits, split train/test per class (1,347 / 450 samples)."""
    return digits()


@pytest.fixture(scope="session")
def split_digits(digits_data: tuple[Stream, Stream]) -> tuple[Stream, Stream]:
    """The ``split-digits`` benchmark: 5 experiences of 2 classes, each shown 5 times; test set
    in class order."""
    train, test = digits_data
    return split_stream(train, passes=5), split_stream(test, shuffle=False)


@pytest.fixture(scope="session")
def split_digits_once(digits_data: tuple[Stream, Stream]) -> Stream:
    """Split digits with one pass per experience (1,347 samples): cheap, still class-incremental."""
    return split_stream(digits_data[0], passes=1)


def make_trainer(strategy: str = "naive", *, input_shape: tuple[int, ...] = (64,),
                 hidden: tuple[int, ...] = (32,), **kwargs: Any) -> OnlineTrainer:
    return OnlineTrainer(TrainerConfig(input_shape=input_shape, hidden=hidden, strategy=strategy,
                                       **kwargs))


def batches(stream: Stream, batch_size: int = 32, start: int = 0,
            stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(x, y, task)`` micro-batches of ``stream[start:stop]`` in file order."""
    stop = len(stream) if stop is None else stop
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        task = int(stream.task[s]) if stream.task is not None else None
        yield torch.from_numpy(stream.x[s:e]), torch.from_numpy(stream.y[s:e]), task


@pytest.fixture(scope="session")
def trainer_factory() -> Callable[..., OnlineTrainer]:
    return make_trainer


@pytest.fixture(scope="session")
def batch_iter() -> Callable[..., Iterator[tuple[torch.Tensor, torch.Tensor, int]]]:
    return batches

