"""Restart after kill -9: seconds from starting `streamcl run` again to its first live batch.

A real `streamcl run` (its own process, default learner, snapshots every 20 batches) trains
on a topic of split-digits samples on an embedded broker; at a random point it is killed with
SIGKILL and started again at once. Measured per restart: from the new process's start to (a)
its ``start`` entry in the journal (recovered: snapshot loaded, journal replayed) and (b) the
first ``batch`` entry after it (training live again), both from the entries' own timestamps
(the polling here does not blur them). Samples keep arriving at a steady rate all along, as on a
live topic. The consumer is assigned its partitions (no group join), so no session of the dead
process has to time out first.

    python bench/restart.py --restarts 5
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from streamcl.data import Stream, digits, split_stream
from streamcl.stream.broker import EmbeddedBroker, ensure_topics
from streamcl.stream.entries import Batch, Start
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream


def _entries(journal: Journal, after: int) -> list:
    return list(journal.read(from_seq=after + 1)) if journal.last() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    train, _ = digits()
    stream = split_stream(train, passes=100)
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        topic, name = f"restart-{uuid.uuid4().hex[:6]}", f"restart-{uuid.uuid4().hex[:6]}"
        ensure_topics(broker.bootstrap, [topic])
        done = threading.Event()

        def feed() -> None:  # a live topic: 2,000 samples/s, in one-second slices
            for lo in range(0, len(stream), 2000):
                if done.is_set():
                    return
                part = slice(lo, lo + 2000)
                produce_stream(Stream(stream.x[part], stream.y[part], stream.task[part]),
                               broker.bootstrap, topic, rate=2000)

        feeder = threading.Thread(target=feed)
        feeder.start()
        config = Path(tmp) / "streamcl.yaml"
        config.write_text(f"consumer: {{topic: {topic}}}\njournal: {{name: {name}}}\n"
                          f"learner: {{input_shape: [64]}}\n"
                          f"snapshots: {{dir: {tmp}/snaps, every_batches: 20}}\n"
                          f"publication: {{registry: {tmp}/registry}}\nmetrics: {{port: 0}}\n")
        env = {**os.environ, "STREAMCL_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap}
        cmd = [sys.executable, "-m", "streamcl", "run", "--config", str(config)]
        ensure_topics(broker.bootstrap, [journal_topic(name)], partitions=1)
        recovered, live = [], []
        with Journal(broker.bootstrap, journal_topic(name), create=False) as journal:
            for k in range(args.restarts + 1):
                seen = -1 if journal.last() is None else journal.last().seq
                t0 = time.time()
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                t_start = t_batch = None
                while t_batch is None:
                    assert proc.poll() is None, "streamcl run ended"
                    for e in _entries(journal, seen):
                        seen = e.seq
                        if isinstance(e, Start) and e.pid == proc.pid:
                            t_start = e.ts - t0
                        elif isinstance(e, Batch) and t_start is not None:
                            t_batch = e.ts - t0
                            break
                    time.sleep(0.05)  # polling interval (the figures come from entry times)
                if k:  # the first start is a cold one, not a restart
                    recovered.append(t_start)
                    live.append(t_batch)
                    print(f"restart {k}: recovered {t_start:.2f} s, first live batch "
                          f"{t_batch:.2f} s", flush=True)
                time.sleep(rng.uniform(1.0, 4.0))  # let it train a while, then kill it
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        done.set()
        feeder.join()
    print(f"kill -9 -> first live batch: median {statistics.median(live):.2f} s, "
          f"max {max(live):.2f} s over {len(live)} restarts (recovered: median "
          f"{statistics.median(recovered):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
