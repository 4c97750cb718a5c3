"""`streamcl run` (settings from YAML + environment, SIGTERM drain) and `streamcl replay`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from streamcl.cli import main
from streamcl.data import Stream
from streamcl.stream.entries import Batch
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream


def _stream(n: int = 200) -> Stream:
    rng = np.random.default_rng(3)
    return Stream(rng.integers(0, 256, (n, 16), dtype=np.uint8),
                  rng.integers(0, 4, n).astype(np.int64))


def _wait_for_samples(bootstrap: str, name: str, proc: subprocess.Popen, n: int) -> None:
    """Poll the journal until its batch entries cover ``n`` samples (bounded; fails if the
    service dies first)."""
    deadline = time.monotonic() + 60
    with Journal(bootstrap, journal_topic(name)) as journal:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            done = sum(e.samples for e in journal.read() if isinstance(e, Batch))
            if done >= n:
                return
            time.sleep(0.1)  # polling interval, not synchronisation
    pytest.fail(f"the service did not train {n} samples in time")


def test_run_trains_drains_on_sigterm_and_replay_agrees(tmp_path: Path, kafka_bootstrap: str,
                                                       topic: str, capsys) -> None:
    data = _stream()
    produce_stream(data, kafka_bootstrap, topic)
    name = f"svc-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "streamcl.yaml"
    config.write_text(f"consumer: {{topic: {topic}, batch_size: 999}}\njournal: {{name: {name}}}\n"
                      "learner: {input_shape: [16], hidden: [8], strategy: er}\n"
                      "snapshots: {every_batches: 3}\n")
    env = {**os.environ, "STREAMCL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "STREAMCL_CONSUMER__BATCH_SIZE": "20",  # overrides the file's 999, keeps its topic
           "STREAMCL_SNAPSHOTS__DIR": str(tmp_path / "snaps")}
    proc = subprocess.Popen([sys.executable, "-m", "streamcl.cli", "run", "--config",
                             str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_samples(kafka_bootstrap, name, proc, len(data))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["samples"] == len(data)
    with Journal(kafka_bootstrap, journal_topic(name)) as journal:
        last = journal.last()
        sizes = [e.samples for e in journal.read() if e.type == "batch"]
    assert max(sizes) == 20 and sum(sizes) == len(data)  # the environment beat the file
    assert last is not None and last.type == "snapshot"   # drained: snapshot last
    assert list(Path(tmp_path / "snaps").glob("snapshot-*.safetensors"))

    assert main(["replay", "--bootstrap", kafka_bootstrap, "--name", name, "--topic",
                 topic]) == 0
    assert capsys.readouterr().out.split()[0] == summary["state_sha256"]


def test_run_refuses_an_invalid_setting_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("learner: {input_shape: [16]}\nconsumer: {batch_size: -3}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
    proc = subprocess.run([sys.executable, "-m", "streamcl.cli", "run", "--config",
                           str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "consumer.batch_size" in lines[0], proc.stderr
    assert "STREAMCL_CONSUMER__BATCH_SIZE" in lines[0], proc.stderr


def test_run_without_bootstrap_starts_and_stops_the_embedded_broker(tmp_path: Path) -> None:
    config = tmp_path / "streamcl.yaml"
    config.write_text(f"learner: {{input_shape: [16], hidden: [8]}}\n"
                      f"snapshots: {{dir: {tmp_path / 's'}}}\n"
                      "kafka: {embedded_storage: 'memory://tansu/'}\n")  # opted in
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
    proc = subprocess.Popen([sys.executable, "-m", "streamcl.cli", "run", "--config",
                             str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # blocks until the service announces its broker
        assert first.startswith("streamcl: embedded broker at 127.0.0.1:"), first
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["samples"] == 0


def test_demo_finds_the_task_switches_through_the_whole_pipeline(capsys) -> None:
    assert main(["demo", "--data", "digits", "--threads", "1"]) == 0
    out = {line[:19].strip(): line[19:].strip()
           for line in capsys.readouterr().out.splitlines() if line.strip()}
    true = json.loads(out["true switches"])
    found = json.loads(out["drift boundaries"].split("  (")[0])
    assert out["data"].startswith("split digits, 6735 samples trained")
    for switch in true:  # each switch found by ADWIN within two batches
        assert any(switch <= b <= switch + 64 for b in found), (switch, found)
    assert float(out["test accuracy"].split("%")[0]) > 40.0
