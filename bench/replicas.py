"""Replicas through the real service: samples/s of `streamcl run` alone and with --replicas 2.

bench/scale.py measures the trainer's step (4 collectives); the service adds its own per
global step (the turn's flags, whether any replica brought a batch, the label-cap count, the
entry's ranges and counts), and a consumer process per replica. This runs the real
`streamcl run` on an embedded broker, over a topic of 4 partitions filled beforehand with
split-digits samples (so the input is never the limit), once alone and once as 2 replicas
(`--replicas 2`: torchrun, gloo over loopback), with an MLP 64-256-256 on split digits, ER,
publication off, and reads the training rate from the journal's own timestamps (first to last
batch entry), so start-up and recovery are not counted.

    python bench/replicas.py [--samples 40000] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaProducer

from streamcl.data import digits, split_stream
from streamcl.stream.broker import EmbeddedBroker, ensure_topics
from streamcl.stream.entries import Batch
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.messages import encode_binary

PARTITIONS = 4


def _fill(bootstrap: str, topic: str, n: int) -> None:
    train, _ = digits()
    s = split_stream(train, passes=max(1, n // len(train.y) + 1))
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20)
    for i in range(n):
        value, headers = encode_binary(s.x[i], int(s.y[i]), id=str(i))
        producer.send(topic, value=value, headers=headers, partition=i % PARTITIONS)
    producer.flush()
    producer.close()


def _run(bootstrap: str, topic: str, n: int, batch: int, replicas: int, tmp: Path) -> dict:
    name = f"bench-rep-{uuid.uuid4().hex[:6]}"
    config = tmp / f"{name}.yaml"
    config.write_text(
        f"consumer: {{topic: {topic}, batch_size: {batch}, max_wait_s: 0.5}}\n"
        f"journal: {{name: {name}}}\n"
        "learner: {input_shape: [64], hidden: [256, 256], strategy: er, torch_threads: 1}\n"
        f"snapshots: {{every_batches: 100000, dir: {tmp / name}}}\n"
        "publication: {every_samples: null, at_experience_end: false, holdout_fraction: 0}\n"
        "metrics: {port: 0}\n")
    env = {**os.environ, "STREAMCL_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "streamcl", "run", "--config", str(config)]
    if replicas > 1:
        cmd += ["--replicas", str(replicas), "--max-restarts", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    cpu0 = os.times()
    ensure_topics(bootstrap, [journal_topic(name)])
    with Journal(bootstrap, journal_topic(name), create=False) as journal:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            entries = [e for e in journal.read() if isinstance(e, Batch)]
            if sum(e.samples for e in entries) >= n or proc.poll() is not None:
                break
            time.sleep(0.5)  # polling interval
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    cpu1 = os.times()
    if len(entries) < 2:
        raise RuntimeError(f"streamcl run trained nothing (exit {proc.returncode}): {err[-2000:]}")
    trained = sum(e.samples for e in entries)
    seconds = entries[-1].ts - entries[0].ts
    collective = [float(c) for c in re.findall(r'"collective_s": ([0-9.e-]+)', out)]
    return {"replicas": replicas, "batch_per_replica": batch, "samples": trained,
            "steps": len(entries), "seconds": round(seconds, 2),
            "samples_per_s": round((trained - entries[0].samples) / seconds),
            "collective_s_per_replica": [round(c, 2) for c in collective],
            "cpu_s_children": round((cpu1.children_user + cpu1.children_system)
                                    - (cpu0.children_user + cpu0.children_system), 1),
            "exit": proc.returncode, "stderr_tail": err[-300:] if proc.returncode else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=40_000)
    ap.add_argument("--batch", type=int, default=32, help="samples per replica per step")
    args = ap.parse_args()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        topic = f"bench-rep-{uuid.uuid4().hex[:6]}"
        ensure_topics(broker.bootstrap, [topic], partitions=PARTITIONS)
        _fill(broker.bootstrap, topic, args.samples)
        for replicas in (1, 2):
            print(json.dumps(_run(broker.bootstrap, topic, args.samples, args.batch, replicas,
                                  Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
