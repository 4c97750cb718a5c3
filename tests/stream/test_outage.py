"""Broker outages against a real broker: the service waits them out and loses nothing.

The broker (tansu, in memory) stays up; a TCP proxy in front of it plays the network
(tests/netproxy.py) and cuts every connection, as a partition or a dead host would. The broker
advertises the proxy, so the journal writer, the consumer process and the readers all lose it.
A short outage is ridden out by waiting for the acknowledgements; one longer than the journal's
timeout makes the writer give up and the service reconnect (new writer, the log decides). Both
must end in the SHA-256 of an uninterrupted run over the same input, with every sample
journaled exactly once, /readyz 503 during the outage and 200 after it.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from streamcl.data import Stream, digits, split_stream
from streamcl.metrics.prometheus import ServiceMetrics
from streamcl.metrics.server import MetricsServer
from streamcl.service import TrainerService
from streamcl.stream.broker import EmbeddedBroker, ensure_topics, free_port
from streamcl.stream.entries import Batch, Start
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream
from streamcl.trainer import TrainerConfig

N = 800
BATCH = 16
CONFIG = TrainerConfig(input_shape=(64,), hidden=(16,), boundaries="task", lr=0.1, seed=5)
JOURNAL_TIMEOUT_S = 4.0  # librdkafka gives up on an entry after this: the reconnect path


@pytest.fixture(scope="module")
def network(netproxy: ModuleType) -> Iterator[tuple[Any, str]]:
    """(proxy, bootstrap through it) in front of a broker of this module's own."""
    port = free_port()
    with netproxy.Proxy(("127.0.0.1", port)) as proxy, \
            EmbeddedBroker(port=port, advertised=f"127.0.0.1:{proxy.port}"):
        yield proxy, f"127.0.0.1:{proxy.port}"


@pytest.fixture(scope="module")
def topic(network: tuple[Any, str]) -> str:
    _, bootstrap = network
    train, _ = digits()
    s = split_stream(train, classes_per_exp=2, seed=1)
    stream = Stream(s.x[:N], s.y[:N], s.task[:N])
    name = f"outage-in-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [name])
    assert produce_stream(stream, bootstrap, name) == N
    # a sentinel of another task: cuts the last batch at once, never consumed itself
    assert produce_stream(Stream(stream.x[:1], stream.y[:1], np.array([99])), bootstrap,
                          name) == 1
    return name


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _service(bootstrap: str, topic: str, snapdir: Path, metrics: ServiceMetrics | None = None
             ) -> TrainerService:
    name = f"outage-{uuid.uuid4().hex[:8]}"
    return TrainerService(CONFIG, bootstrap=bootstrap, topic=topic, group_id=name, name=name,
                          snapshot_dir=str(snapdir), batch_size=BATCH, max_wait_s=0.3,
                          snapshot_every_batches=10, metrics=metrics,
                          journal_timeout_s=JOURNAL_TIMEOUT_S)


def _drained(service: TrainerService) -> bool:
    return service.offsets.get(0, 0) >= N


@pytest.fixture(scope="module")
def uninterrupted(network: tuple[Any, str], topic: str,
                  tmp_path_factory: pytest.TempPathFactory) -> str:
    _, bootstrap = network
    torch.set_num_threads(1)
    service = _service(bootstrap, topic, tmp_path_factory.mktemp("whole"))
    deadline = time.monotonic() + 120
    service.run(threading.Event(), until=lambda s: _drained(s) or time.monotonic() > deadline)
    assert _drained(service)
    return service.state_sha256()


def _readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait(what: str, condition: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``condition`` (a state, not a time) until true; the seconds it took."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)  # polling interval
    return time.monotonic() - t0


@pytest.mark.parametrize("outage_s", [JOURNAL_TIMEOUT_S / 2, JOURNAL_TIMEOUT_S * 2.5],
                         ids=["shorter-than-the-journal-timeout", "longer"])
def test_an_outage_is_waited_out_and_loses_nothing(network: tuple[Any, str], topic: str,
                                                    uninterrupted: str, tmp_path: Path,
                                                    outage_s: float) -> None:
    proxy, bootstrap = network
    metrics = ServiceMetrics()
    service = _service(bootstrap, topic, tmp_path, metrics)
    step = service.step_once

    def paced() -> bool:  # a slower learner, so that the cut lands mid-stream
        done = step()
        time.sleep(0.02)
        return done

    service.step_once = paced  # type: ignore[method-assign]
    server = MetricsServer(metrics, "127.0.0.1", 0, live=service.alive,
                           ready=service.is_ready).start()
    stop, result = threading.Event(), {}
    deadline = time.monotonic() + 180

    def run() -> None:
        try:
            result["summary"] = service.run(
                stop, until=lambda s: _drained(s) or time.monotonic() > deadline)
        except BaseException as exc:  # surfaced by the assertions below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait("ready and training", lambda: _readyz(server.url) == 200 and service.batches >= 5,
              60)
        proxy.cut()
        _wait("/readyz 503 after the cut", lambda: _readyz(server.url) == 503, 8)
        trained = service.samples
        cut_at = time.monotonic()
        _wait("the outage lasted", lambda: time.monotonic() - cut_at >= outage_s, outage_s + 5)
        assert service.samples == trained, "trained while the broker was out of reach"
        proxy.restore()
        back = _wait("/readyz 200 after the broker came back",
                     lambda: _readyz(server.url) == 200, 60)
        thread.join(120)
    finally:
        stop.set()
        thread.join(30)
        server.stop()
    assert "error" not in result, result.get("error")
    assert _drained(service)
    assert service.state_sha256() == uninterrupted
    assert back < 30
    assert metrics.value("streamcl_broker_outage_seconds_total") >= outage_s - 2.5
    with Journal(bootstrap, journal_topic(service.name), create=False) as journal:
        entries = list(journal.read())
    batches = [e for e in entries if isinstance(e, Batch)]
    assert sum(e.samples for e in batches) == N  # nothing lost, nothing journaled twice
    starts = [e for e in entries if isinstance(e, Start)]
    if outage_s > JOURNAL_TIMEOUT_S:  # the writer gave up and a new one took over
        assert len(starts) >= 2
