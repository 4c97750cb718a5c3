"""Broker outages of 10 s, 60 s and 5 min against the service: what was lost, what was trained
twice, and how long from the broker's return to /readyz 200.

The broker (tansu, in memory) stays up behind a TCP proxy (tests/netproxy.py) that cuts every
connection, as a network partition would; the service uses its default journal timeout (30 s),
so the longer outages go through the reconnect path (a new journal writer; the log decides).
Each run is compared with an uninterrupted run over the same input: the state SHA-256 must be
the same, and the journal's batch entries must cover every sample exactly once.

    python bench/outage.py                 # 10 s, 60 s, 300 s
    python bench/outage.py --outages 5 20  # quicker
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import netproxy

from streamcl.data import Stream, digits, split_stream
from streamcl.metrics.prometheus import ServiceMetrics
from streamcl.metrics.server import MetricsServer
from streamcl.service import TrainerService
from streamcl.stream.broker import EmbeddedBroker, ensure_topics, free_port
from streamcl.stream.entries import Batch, Start
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream
from streamcl.trainer import TrainerConfig

BATCH = 16
CONFIG = TrainerConfig(input_shape=(64,), hidden=(64,), boundaries="task", lr=0.1, seed=5)


def _readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _service(bootstrap: str, topic: str, snapdir: str, metrics: ServiceMetrics | None = None
             ) -> TrainerService:
    name = f"outage-{uuid.uuid4().hex[:8]}"
    return TrainerService(CONFIG, bootstrap=bootstrap, topic=topic, group_id=name, name=name,
                          snapshot_dir=snapdir, batch_size=BATCH, max_wait_s=0.3,
                          snapshot_every_batches=50, metrics=metrics)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outages", type=float, nargs="+", default=[10, 60, 300])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--pace", type=float, default=0.02, help="seconds slept after each batch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, _ = digits()
    s = split_stream(train, classes_per_exp=2, seed=1, passes=3)
    n = min(args.samples, len(s))
    stream = Stream(s.x[:n], s.y[:n], s.task[:n])
    port = free_port()
    with netproxy.Proxy(("127.0.0.1", port)) as proxy, \
            EmbeddedBroker(port=port, advertised=f"127.0.0.1:{proxy.port}"), \
            TemporaryDirectory() as tmp:
        bootstrap = f"127.0.0.1:{proxy.port}"
        topic = f"outage-in-{uuid.uuid4().hex[:8]}"
        ensure_topics(bootstrap, [topic])
        produce_stream(stream, bootstrap, topic)
        produce_stream(Stream(stream.x[:1], stream.y[:1], np.array([99])), bootstrap, topic)
        ref = _service(bootstrap, topic, f"{tmp}/ref")
        ref.run(threading.Event(), until=lambda svc: svc.offsets.get(0, 0) >= n)
        reference = ref.state_sha256()
        print(f"input: {n} split-digits samples, batch {BATCH}, learner paced {args.pace} s "
              f"per batch; journal timeout {ref.journal.timeout_s:g} s (default)")
        print("| outage | samples lost | trained twice | same SHA-256 | writer reconnected | "
              "503 after cut | broker back -> /readyz 200 | outage seconds counted |")
        print("|---|---|---|---|---|---|---|---|")
        for k, outage in enumerate(args.outages):
            metrics = ServiceMetrics()
            svc = _service(bootstrap, topic, f"{tmp}/run{k}", metrics)
            step = svc.step_once

            def paced(step=step) -> bool:
                done = step()
                time.sleep(args.pace)
                return done

            svc.step_once = paced  # type: ignore[method-assign]
            server = MetricsServer(metrics, "127.0.0.1", 0, live=svc.alive,
                                   ready=svc.is_ready).start()
            stop = threading.Event()
            thread = threading.Thread(
                target=lambda svc=svc, stop=stop: svc.run(
                    stop, until=lambda x: x.offsets.get(0, 0) >= n))
            thread.start()
            while not (svc.ready and svc.samples >= n // 5):
                time.sleep(0.05)
            proxy.cut()
            cut = time.monotonic()
            while _readyz(server.url) != 503:
                time.sleep(0.05)
            unready = time.monotonic() - cut
            time.sleep(max(0.0, outage - (time.monotonic() - cut)))
            proxy.restore()
            back = time.monotonic()
            while _readyz(server.url) != 200:
                time.sleep(0.05)
            ready_after = time.monotonic() - back
            thread.join()
            server.stop()
            with Journal(bootstrap, journal_topic(svc.name), create=False) as journal:
                entries = list(journal.read())
            covered = [(p, o) for e in entries if isinstance(e, Batch)
                       for p, (a, b) in e.ranges.items() for o in range(a, b + 1)]
            twice = len(covered) - len(set(covered))
            samples = sum(e.samples for e in entries if isinstance(e, Batch))
            starts = sum(isinstance(e, Start) for e in entries)
            counted = metrics.value("streamcl_broker_outage_seconds_total")
            print(f"| {outage:g} s | {max(0, n - samples)} | {twice} | "
                  f"{svc.state_sha256() == reference} | {'yes' if starts > 1 else 'no'} | "
                  f"{unready:.1f} s | {ready_after:.2f} s | {counted:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
