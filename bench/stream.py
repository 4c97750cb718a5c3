"""Benchmark: the streaming path end to end, beside its two parts alone, and recovery.

On an embedded tansu broker, split Fashion-MNIST (60,000 784-byte uint8 samples, binary
encoding, one partition) is produced once, then measured in one run:

(a) kafka-python alone: ``BatchConsumer`` consuming and decoding the topic in batches of 32;
(b) the trainer alone: ``OnlineTrainer`` (naive) on the same batches, in memory;
(j) the journal alone: one ``batch`` entry per 32 samples, written behind and synced once;
(c) end to end: ``TrainerService`` (consume -> decode -> journal (write-behind) -> train), naive,
    with the consumer in its own process (the default) and, for comparison, in the trainer's
    process;
(d) recovery: a service stopped without a final snapshot (as after ``kill -9``) with one snapshot
    interval of journal after its last snapshot; a new service's time from start to its first
    live batch, and its replay rate against (c)'s live rate.

Each phase also reports the CPU it used, in core-seconds per 10,000 samples, counting every process
involved (this one, the prefetching consumer's process, the broker): on a machine with few cores
the end-to-end rate is bounded by cores / (CPU per sample of (a) + (b) + (j)), whatever the
overlap.

Rates exclude the consumer-group join (tansu joins after ~half the session timeout); the
restart time (d) includes it, since a restarted service really waits for it.

    python bench/stream.py [--samples 60000] [--snapshot-every 100] [--threads 2]
                           [--service-threads 1]
"""

from __future__ import annotations

import argparse
import os
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
from streamcl.stream.entries import Batch
from streamcl.stream.journal import Journal, journal_topic, writer_id
from streamcl.stream.messages import Decoder
from streamcl.stream.producer import produce_stream
from streamcl.trainer import OnlineTrainer, TrainerConfig

BATCH = 32


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (default: this one, all its threads)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used between ``start`` and ``stop`` by this process and the given other pids."""

    def __init__(self, *pids: int) -> None:
        self.pids = list(pids)

    def start(self) -> None:
        self.t0 = {p: cpu_seconds(p) for p in [None, *self.pids]}

    def add(self, pid: int) -> None:
        self.pids.append(pid)
        self.t0[pid] = cpu_seconds(pid)

    def stop(self) -> float:
        return sum(cpu_seconds(p) - t for p, t in self.t0.items())


def consume_alone(bootstrap: str, topic: str, n: int, meter: CpuMeter
                  ) -> tuple[float, float, list]:
    batches, got, t0 = [], 0, None
    with BatchConsumer(bootstrap, topic, f"alone-{uuid.uuid4().hex[:6]}",
                       Decoder((784,), dtypes=("uint8",))) as consumer:
        while got < n:
            mb = consumer.poll_batch(BATCH, 0.5)
            if mb is None:
                continue
            if t0 is None:  # the clocks start at the first batch (group joined)
                t0 = time.perf_counter()
                meter.start()
            batches.append((mb.x, mb.y))
            got += len(mb)
        done = got - len(batches[0][1])
        return done / (time.perf_counter() - t0), meter.stop() / done, batches


def train_alone(config: TrainerConfig, batches: list) -> tuple[float, float]:
    trainer = OnlineTrainer(config)
    meter = CpuMeter()
    meter.start()
    t0 = time.perf_counter()
    for x, y in batches:
        trainer.step(x, y)
    n = sum(len(y) for _, y in batches)
    return n / (time.perf_counter() - t0), meter.stop() / n


def journal_alone(bootstrap: str, batches: int, meter: CpuMeter) -> float:
    """CPU per batch entry of the journal alone (this process's librdkafka threads and the
    broker): one entry per batch, written behind and synced once, as the service does."""
    name = f"journal-{uuid.uuid4().hex[:6]}"
    with Journal(bootstrap, journal_topic(name), writer=writer_id(name)) as journal:
        plan = {"position": 0, "size": BATCH, "new_labels": [], "boundary": None}
        meter.start()
        for i in range(batches):
            journal.append(Batch(ranges={0: (i * BATCH, i * BATCH + BATCH - 1)},
                                 plan={**plan, "position": i * BATCH}, samples=BATCH))
        journal.sync()
        return meter.stop() / batches


def service(config: TrainerConfig, bootstrap: str, topic: str, name: str, snapdir: str,
            every: int, prefetch: bool = True) -> TrainerService:
    return TrainerService(config, bootstrap=bootstrap, topic=topic, name=name, group_id=name,
                          snapshot_dir=f"{snapdir}/{name}", batch_size=BATCH, max_wait_s=0.5,
                          snapshot_every_batches=every, prefetch=prefetch)


def end_to_end(config, bootstrap, topic, n, snapdir, every, meter: CpuMeter,
               prefetch: bool = True) -> tuple[float, float]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    svc = service(config, bootstrap, topic, name, snapdir, every, prefetch)
    marks: dict[str, float] = {}

    def until(s: TrainerService) -> bool:
        pos = s.trainer.position if s.trainer else 0
        if pos and "start" not in marks:
            marks["start"], marks["pos0"] = time.perf_counter(), pos
            meter.start()
            if prefetch:
                meter.add(s.consumer._proc.pid)
        if pos >= n and "stop" not in marks:
            marks["stop"], marks["cpu"] = time.perf_counter(), meter.stop()
        return pos >= n

    svc.run(threading.Event(), until=until)
    done = n - marks["pos0"]
    return done / (marks["stop"] - marks["start"]), marks["cpu"] / done


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
    # replay rate: from the first batch read back to the last one trained (the consumer
    # process's start-up, ~1 s of imports, is in the restart time below, not in the rate)
    replay_s = summary["replay_seconds"]
    while not second.step_once():  # first live batch (after the group join)
        pass
    live_s = time.perf_counter() - t0
    second.close()
    return {"replayed": summary["replayed"], "replay_s": replay_s, "live_after_s": live_s,
            "recover_s": summary["seconds"],
            "replay_rate": (summary["replayed"] - 1) * BATCH / max(replay_s, 1e-9)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--snapshot-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for (b)")
    ap.add_argument("--service-threads", type=int, default=1,
                    help="torch threads for the service in (c) and (d): on a 2-core machine the "
                         "consumer process and the broker need the other core")
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
        bpid = broker.process.pid
        per10k = 10_000
        consume_rate, cpu_a, batches = consume_alone(broker.bootstrap, topic, n, CpuMeter(bpid))
        print(f"(a) kafka-python alone, consume + decode: {consume_rate:,.0f} samples/s "
              f"({cpu_a * per10k:.2f} core-s per 10k samples, broker included)", flush=True)
        train_rate, cpu_b = train_alone(config, batches)
        print(f"(b) trainer alone (naive), same batches:  {train_rate:,.0f} samples/s "
              f"({cpu_b * per10k:.2f} core-s per 10k samples)", flush=True)
        cpu_j = journal_alone(broker.bootstrap, n // BATCH, CpuMeter(bpid)) / BATCH
        print(f"(j) journal alone, one entry per batch: {cpu_j * per10k:.2f} core-s per 10k "
              "samples (broker included)", flush=True)
        floor = min(consume_rate, train_rate)
        cores = len(os.sched_getaffinity(0))
        bound = cores / (cpu_a + cpu_b + cpu_j)
        print(f"    bound on this {cores}-core machine from CPU alone: cores / (a + b + j) = "
              f"{bound:,.0f} samples/s = {bound / floor:.0%} of min(a, b)", flush=True)
        torch.set_num_threads(args.service_threads)
        for prefetch in (True, False):
            rate, cpu_c = end_to_end(config, broker.bootstrap, topic, n, snapdir,
                                     args.snapshot_every, CpuMeter(bpid), prefetch)
            label = "consumer process" if prefetch else "consumer in-process"
            print(f"(c) end to end ({label}; consume, decode, journal, train): {rate:,.0f} "
                  f"samples/s = {rate / floor:.0%} of min(a, b), {rate / bound:.0%} of the "
                  f"bound ({cpu_c * per10k:.2f} core-s per 10k samples)", flush=True)
            if prefetch:
                e2e_rate = rate
        rec = recovery(config, broker.bootstrap, topic, n, snapdir, args.snapshot_every)
        print(f"(d) restart after a crash: {rec['replayed']} journaled batches replayed in "
              f"{rec['replay_s']:.2f} s ({rec['replay_rate']:,.0f} samples/s = "
              f"{rec['replay_rate'] / e2e_rate:.1f}x live; recover() took {rec['recover_s']:.2f} s "
              f"in all); first live batch after "
              f"{rec['live_after_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
