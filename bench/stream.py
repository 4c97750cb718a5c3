"""Benchmark: the streaming path end to end, beside its two parts alone, and recovery.

On an embedded tansu broker, split Fashion-MNIST (60,000 784-byte uint8 samples, binary
encoding, one partition) is produced once, then measured in one run:

(a) kafka-python alone: ``BatchConsumer`` consuming and decoding the topic in batches of 32;
(b) the trainer alone: ``OnlineTrainer`` (naive) on the same batches, in memory;
(c) end to end: ``TrainerService`` (consume -> decode -> journal (acked) -> train), naive;
(d) recovery: a service stopped without a final snapshot (as after ``kill -9``) with one snapshot
    interval of journal after its last snapshot; a new service's time from start to its first
    live batch, and its replay rate against (c)'s live rate.

Rates exclude the consumer-group join (tansu joins after ~half the session timeout); the
restart time (d) includes it, since a restarted service really waits for it.

    python bench/stream.py [--samples 60000] [--snapshot-every 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid

import torch

from streamcl.data import fashion_mnist, split_stream
from streamcl.service import TrainerService
from streamcl.stream.broker import EmbeddedBroker
from streamcl.stream.consumer import BatchConsumer
from streamcl.stream.messages import Decoder
from streamcl.stream.producer import produce_stream
from streamcl.trainer import OnlineTrainer, TrainerConfig

BATCH = 32


def consume_alone(bootstrap: str, topic: str, n: int) -> tuple[float, list]:
    batches, got, t0 = [], 0, None
    with BatchConsumer(bootstrap, topic, f"alone-{uuid.uuid4().hex[:6]}",
                       Decoder((784,), dtypes=("uint8",))) as consumer:
        while got < n:
            mb = consumer.poll_batch(BATCH, 0.5)
            if mb is None:
                continue
            t0 = t0 or time.perf_counter()  # the clock starts at the first batch (group joined)
            batches.append((mb.x, mb.y))
            got += len(mb)
    return (got - len(batches[0][1])) / (time.perf_counter() - t0), batches


def train_alone(config: TrainerConfig, batches: list) -> float:
    trainer = OnlineTrainer(config)
    t0 = time.perf_counter()
    for x, y in batches:
        trainer.step(x, y)
    return sum(len(y) for _, y in batches) / (time.perf_counter() - t0)


def service(config: TrainerConfig, bootstrap: str, topic: str, name: str, snapdir: str,
            every: int) -> TrainerService:
    return TrainerService(config, bootstrap=bootstrap, topic=topic, name=name, group_id=name,
                          snapshot_dir=f"{snapdir}/{name}", batch_size=BATCH, max_wait_s=0.5,
                          snapshot_every_batches=every)


def end_to_end(config, bootstrap, topic, n, snapdir, every) -> tuple[float, str]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    svc = service(config, bootstrap, topic, name, snapdir, every)
    marks: dict[str, float] = {}

    def until(s: TrainerService) -> bool:
        pos = s.trainer.position if s.trainer else 0
        if pos and "start" not in marks:
            marks["start"], marks["pos0"] = time.perf_counter(), pos
        return pos >= n

    svc.run(threading.Event(), until=until)
    rate = (n - marks["pos0"]) / (time.perf_counter() - marks["start"])
    return rate, name


def recovery(config, bootstrap, topic, n, snapdir, every) -> dict:
    name = f"rec-{uuid.uuid4().hex[:6]}"
    first = service(config, bootstrap, topic, name, snapdir, every)
    first.recover()
    target = n // 2
    # run to just before the next snapshot: one snapshot interval of journal to replay
    while first.trainer.position < target or first.batches % every != every - 1:
        first.step_once()
    first.close()  # no final snapshot: what kill -9 leaves behind
    t0 = time.perf_counter()
    second = service(config, bootstrap, topic, name, snapdir, every)
    summary = second.recover()
    replay_s = time.perf_counter() - t0
    while not second.step_once():  # first live batch (after the group join)
        pass
    live_s = time.perf_counter() - t0
    second.close()
    return {"replayed": summary["replayed"], "replay_s": replay_s, "live_after_s": live_s,
            "replay_rate": summary["replayed"] * BATCH / max(replay_s, 1e-9)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--snapshot-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    raw, _ = fashion_mnist()
    data = split_stream(raw)
    data.x, data.y, data.task = data.x[:args.samples], data.y[:args.samples], None
    n = len(data.y)
    config = TrainerConfig(input_shape=(784,), strategy="naive", boundaries="drift")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as snapdir:
        topic = "bench.samples"
        t0 = time.perf_counter()
        produce_stream(data, broker.bootstrap, topic)
        print(f"produced {n} binary messages at {n / (time.perf_counter() - t0):,.0f}/s",
              flush=True)
        consume_rate, batches = consume_alone(broker.bootstrap, topic, n)
        print(f"(a) kafka-python alone, consume + decode: {consume_rate:,.0f} samples/s",
              flush=True)
        train_rate = train_alone(config, batches)
        print(f"(b) trainer alone (naive), same batches:  {train_rate:,.0f} samples/s", flush=True)
        e2e_rate, _ = end_to_end(config, broker.bootstrap, topic, n, snapdir, args.snapshot_every)
        floor = min(consume_rate, train_rate)
        print(f"(c) end to end (consume, decode, journal, train): {e2e_rate:,.0f} samples/s = "
              f"{e2e_rate / floor:.0%} of min(a, b)", flush=True)
        rec = recovery(config, broker.bootstrap, topic, n, snapdir, args.snapshot_every)
        print(f"(d) restart after a crash: {rec['replayed']} journaled batches replayed in "
              f"{rec['replay_s']:.2f} s ({rec['replay_rate']:,.0f} samples/s = "
              f"{rec['replay_rate'] / e2e_rate:.1f}x live); first live batch after "
              f"{rec['live_after_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
