"""Operator mistakes and a hostile environment end `streamcl run` with one line and exit 2.

Each case is the real command in its own process against a real broker: an unknown strategy,
a model factory that is no factory, a metrics port already taken, a read-only snapshot volume,
a full disk (the earlier snapshot stays valid and no partial file is left), an emptied broker
(the journal is gone), and SIGTERM while the drain is stuck (the process still ends).
Read-only and full volumes are real tmpfs mounts: root ignores file modes, so a chmod would
test nothing here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamcl.data import Stream
from streamcl.service import service_from_settings
from streamcl.settings import load_settings
from streamcl.stream.broker import EmbeddedBroker
from streamcl.stream.producer import produce_stream
from streamcl.stream.snapshots import SnapshotStore


def _stream(n: int, seed: int = 3) -> Stream:
    rng = np.random.default_rng(seed)
    return Stream(rng.integers(0, 256, (n, 16), dtype=np.uint8),
                  rng.integers(0, 4, n).astype(np.int64))


def _config(tmp_path: Path, topic: str, name: str, snapdir: Path, **learner: str) -> Path:
    extra = "".join(f", {k}: {v}" for k, v in learner.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"consumer: {{topic: {topic}, batch_size: 20, max_wait_s: 0.2}}\n"
                    f"journal: {{name: {name}}}\n"
                    f"learner: {{input_shape: [16], hidden: [8], strategy: er{extra}}}\n"
                    f"snapshots: {{every_batches: 3, dir: {snapdir}}}\n"
                    f"metrics: {{port: 0}}\npublication: {{registry: {tmp_path / 'registry'}}}\n")
    return path


def _run(config: Path, bootstrap: str, timeout_s: float = 120,
         **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamcl", "run", "--config", str(config)],
                          env={**os.environ, "STREAMCL_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                               **env},
                          capture_output=True, text=True, timeout=timeout_s)


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("streamcl: ")]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("streamcl: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"these tests need a tmpfs mount (run them as root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> None:
    """Write a file until the volume is full."""
    with open(directory / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()


@pytest.fixture
def data_topic(kafka_bootstrap: str, topic: str) -> str:
    produce_stream(_stream(200), kafka_bootstrap, topic)
    return topic


def test_unknown_strategy(tmp_path: Path, kafka_bootstrap: str, topic: str) -> None:
    config = _config(tmp_path, topic, "bad-strategy", tmp_path / "s")
    config.write_text(config.read_text().replace("strategy: er", "strategy: bogus"))
    _one_line_exit_2(_run(config, kafka_bootstrap), "learner.strategy", "bogus", "il2m-der")


def test_a_model_factory_that_is_no_factory_is_not_called(tmp_path: Path, kafka_bootstrap: str,
                                                          topic: str) -> None:
    config = _config(tmp_path, topic, "bad-model", tmp_path / "s", model="'os:system'")
    _one_line_exit_2(_run(config, kafka_bootstrap), "os:system", "not a model factory")


def test_metrics_port_in_use(tmp_path: Path, kafka_bootstrap: str, topic: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        config = _config(tmp_path, topic, f"port-{uuid.uuid4().hex[:6]}", tmp_path / "s")
        proc = _run(config, kafka_bootstrap, STREAMCL_METRICS__PORT=str(port),
                    STREAMCL_METRICS__HOST="127.0.0.1")
    _one_line_exit_2(proc, f"metrics.port {port}", "in use")


def test_unreachable_bootstrap(tmp_path: Path, topic: str) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = _config(tmp_path, topic, "nowhere", tmp_path / "s")
    t0 = time.monotonic()
    proc = _run(config, f"127.0.0.1:{port}")
    _one_line_exit_2(proc, f"127.0.0.1:{port}", "kafka.bootstrap_servers")
    assert time.monotonic() - t0 < 60


def test_read_only_snapshot_directory(tmp_path: Path, kafka_bootstrap: str,
                                      data_topic: str) -> None:
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as snapdir:
        config = _config(tmp_path, data_topic, f"ro-{uuid.uuid4().hex[:6]}", snapdir)
        _one_line_exit_2(_run(config, kafka_bootstrap), f"snapshots.dir {snapdir}",
                         "Read-only file system")


def _train(config: Path, bootstrap: str, samples: int) -> None:
    """The configured service, in this process, until it has journaled ``samples``."""
    os.environ["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap
    try:
        settings = load_settings(config)
    finally:
        del os.environ["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"]
    service, _ = service_from_settings(settings, bootstrap)
    deadline = time.monotonic() + 60
    service.run(threading.Event(),
                until=lambda s: s.samples >= samples or time.monotonic() > deadline)
    assert service.samples >= samples


def test_full_disk_keeps_the_earlier_snapshot_and_leaves_no_partial_file(
        tmp_path: Path, kafka_bootstrap: str, data_topic: str) -> None:
    name = f"full-{uuid.uuid4().hex[:6]}"
    with _tmpfs(tmp_path / "small", "2m") as snapdir:
        config = _config(tmp_path, data_topic, name, snapdir)
        _train(config, kafka_bootstrap, 200)
        before = sorted(p.name for p in snapdir.iterdir())
        info, _ = SnapshotStore(snapdir).latest_valid()
        produce_stream(_stream(200, seed=4), kafka_bootstrap, data_topic)
        _fill(snapdir)
        proc = _run(config, kafka_bootstrap)
        _one_line_exit_2(proc, f"snapshots.dir {snapdir}", "No space left on device")
        assert sorted(p.name for p in snapdir.iterdir()) == sorted([*before, "filler"])
        again, _ = SnapshotStore(snapdir).latest_valid()
        assert again.covers_seq == info.covers_seq and again.sha256 == info.sha256


def test_an_emptied_broker_is_refused_in_one_line(tmp_path: Path, kafka_bootstrap: str,
                                                  data_topic: str) -> None:
    name = f"emptied-{uuid.uuid4().hex[:6]}"
    config = _config(tmp_path, data_topic, name, tmp_path / "snaps")
    _train(config, kafka_bootstrap, 200)
    with EmbeddedBroker() as empty:  # a broker that never saw this learner's journal
        proc = _run(config, empty.bootstrap)
    _one_line_exit_2(proc, "emptied or replaced", f"{name}.journal")


def test_sigterm_ends_a_stuck_drain_within_its_timeout(tmp_path: Path) -> None:
    """The drain waits on something that never returns (here: a sleep in C): the process
    still ends, one line, exit 1, about the drain timeout after SIGTERM."""
    script = textwrap.dedent("""
        import threading, time
        from streamcl.service import install_sigterm
        stop = threading.Event()
        install_sigterm(stop, drain_timeout_s=1.0)
        print("ready", flush=True)
        while True:
            time.sleep(3600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert err.strip().startswith("streamcl: stopped: the drain took longer than 1 s")
    assert 0.9 <= took < 15
