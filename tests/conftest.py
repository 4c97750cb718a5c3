"""Shared fixtures: the real split-digits streams, a small-trainer factory, one Kafka-protocol
broker for the session, and a real Prometheus.

Everything here is real: scikit-learn's digits, real ``OnlineTrainer``s with small MLPs, real
files under ``tmp_path``. Torch runs single-threaded so results are reproducible bit for bit and
the suite stays fast on two cores.

``kafka_bootstrap`` is, in order of preference: the cluster named by ``STREAMCL_TEST_BOOTSTRAP``
(to run the tests against real Kafka), a testcontainers Kafka when testcontainers is installed
and a Docker engine answers, else the embedded tansu broker. Every test works in its own
uuid-named topics and consumer groups, so one broker serves the whole session.

``prometheus_server`` and ``promtool`` come from ``tests/prometheus_server.py`` (loaded by file
path: ``--import-mode=importlib`` keeps ``tests/`` off ``sys.path``); a missing binary is a
failure with an install hint, never a skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from streamcl.data import Stream, digits, split_stream
from streamcl.stream.broker import EmbeddedBroker
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



# -- a Kafka-protocol broker ---------------------------------------------------------------------
def _docker_kafka() -> Any:
    """A started testcontainers Kafka, or None when testcontainers or Docker is missing."""
    try:
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        return None
    if shutil.which("docker") is None:
        return None
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode != 0:
            return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return KafkaContainer().start()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("STREAMCL_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    container = _docker_kafka()
    if container is not None:
        try:
            yield container.get_bootstrap_server()
        finally:
            container.stop()
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def session_timeout_ms() -> int:
    """Consumer-group session timeout: Kafka's minimum (6 s) by default; tansu then completes a
    group's first join after about 3 s (half the session timeout)."""
    return 6000


# -- Prometheus -----------------------------------------------------------------------------------
def load_module(name: str, path: Path) -> ModuleType:
    """Import a file that is not on ``sys.path`` (cached, so every caller shares one copy)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


prometheus_helper = load_module("streamcl_tests_prometheus_server",
                                Path(__file__).with_name("prometheus_server.py"))
prometheus_server = prometheus_helper.prometheus_server


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool``; fails (never skips) when it is missing, saying how to install it."""
    try:
        return prometheus_helper.find_binary("promtool")
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def netproxy() -> ModuleType:
    """tests/netproxy.py: a TCP proxy that cuts the network between clients and a broker."""
    return load_module("streamcl_tests_netproxy", Path(__file__).with_name("netproxy.py"))


@pytest.fixture(scope="session")
def gen_reference() -> ModuleType:
    """docs/gen_reference.py, the README's reference generator."""
    return load_module("streamcl_docs_gen_reference",
                       Path(__file__).parents[1] / "docs" / "gen_reference.py")
