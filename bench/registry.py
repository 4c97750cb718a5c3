"""Benchmark: what publishing a model costs the trainer, and how fast watchers serve it.

On an embedded tansu broker and a registry in a temporary directory (or ``--registry URL``),
with the benchmark MLP (784-256-256-10, naive, trained a few steps on random 784-byte samples):

(1) publish — per publication: ``export_model`` (weights copied out of the live trainer), then
    ``ModelRegistry.publish`` (safetensors bytes, SHA-256, weights written and fsynced, manifest
    created exclusively, ``production`` moved) and ``Announcer.announce`` (acked by the broker).
    Median and p99 over ``--publishes`` (default 50), with the parts. Target: <= 50 ms.
(2) watcher — a ``ModelWatcher`` following ``<name>.models``; per promotion, the time from the
    announcement's ``ts`` to the watcher serving the new version (fetch the announcement,
    re-read the alias, read and SHA-verify the weights, rebuild the model, swap). Median and
    p99 over ``--promotions`` (default 30). Target: <= 100 ms.

(3) freshness — the trainer service (naive MLP, holdout 5 %, gate tolerance 0.05, publication
    every ``--interval`` seconds) on shuffled Fashion-MNIST produced at ``--rate`` samples/s
    (default 1,000) for ``--seconds``; for every sample, the time from its Kafka timestamp
    (when it was produced) to the creation of the first production version whose offsets
    cover it. p50/p99/max. Target: p99 <= interval + 1 s.

    python bench/registry.py [--publishes 50] [--promotions 30] [--registry URL] [--threads 1]
                             [--rate 1000] [--seconds 30] [--interval 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from streamcl.registry import (
    Announcer,
    ModelRegistry,
    ModelWatcher,
    announcement,
    export_model,
)
from streamcl.stream.broker import EmbeddedBroker
from streamcl.trainer import OnlineTrainer, TrainerConfig

BATCH = 32


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by nearest rank (p99 of 50 values is their maximum)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {"median_ms": 1000 * statistics.median(values), "p99_ms": 1000 * percentile(values, 99),
            "max_ms": 1000 * max(values)}


def benchmark_trainer(seed: int = 0) -> tuple[OnlineTrainer, Any]:
    """The benchmark MLP after a few steps, and a function that trains it one more step."""
    trainer = OnlineTrainer(TrainerConfig(input_shape=(784,), hidden=(256, 256), strategy="naive",
                                          boundaries="new-class", seed=seed))
    gen = torch.Generator().manual_seed(seed)

    def step() -> None:
        x = torch.randint(0, 256, (BATCH, 784), dtype=torch.uint8, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        trainer.step(x, y)

    for _ in range(5):
        step()
    assert trainer.model.n_classes == 10
    return trainer, step


def bench_publish(registry: ModelRegistry, announcer: Announcer, n: int = 50) -> dict[str, Any]:
    """Export + publish (promoting to production) + announce, ``n`` times; one training step
    between publications (not timed) so every version has new weights."""
    trainer, step = benchmark_trainer()
    parts: dict[str, list[float]] = {"export": [], "publish": [], "announce": [], "total": []}
    size = 0
    for _ in range(n):
        step()
        t0 = time.perf_counter()
        tensors, section = export_model(trainer)
        t1 = time.perf_counter()
        manifest = registry.publish(tensors, {"model": section, "position": trainer.position,
                                              "strategy": trainer.config.strategy},
                                    aliases=["production"])
        t2 = time.perf_counter()
        announcer.announce(announcement("publish", manifest["version"], alias="production",
                                        registry=registry.url))
        t3 = time.perf_counter()
        for key, dt in (("export", t1 - t0), ("publish", t2 - t1), ("announce", t3 - t2),
                        ("total", t3 - t0)):
            parts[key].append(dt)
        size = manifest["size_bytes"]
    return {"n": n, "size_bytes": size, **{k: summary_ms(v) for k, v in parts.items()}}


def bench_watcher(registry: ModelRegistry, announcer: Announcer, bootstrap: str, name: str,
                  n: int = 30) -> dict[str, Any]:
    """Promote ``n`` new versions, announcing each; the watcher's announcement-to-serving time,
    and the caller's promote-to-serving time (alias write included)."""
    trainer, step = benchmark_trainer(seed=1)
    tensors, section = export_model(trainer)
    registry.publish(tensors, {"model": section}, aliases=["production"])
    end_to_end: list[float] = []
    with ModelWatcher(registry, bootstrap=bootstrap, name=name, poll_s=0.5) as watcher:
        for _ in range(n):
            step()
            tensors, section = export_model(trainer)
            version = registry.publish(tensors, {"model": section})["version"]  # not timed
            t0 = time.perf_counter()
            registry.promote(version)
            announcer.announce(announcement("promote", version, alias="production",
                                            registry=registry.url))
            if not watcher.wait_for_version(version, timeout=30):
                raise RuntimeError(f"the watcher did not serve v{version} within 30 s")
            end_to_end.append(time.perf_counter() - t0)
        latencies = list(watcher.swap_latency_s)
        refused = watcher.refused
    if len(latencies) != n or refused:
        raise RuntimeError(f"{len(latencies)} timed swaps for {n} promotions, {refused} refused")
    return {"n": n, "announcement_to_serving": summary_ms(latencies),
            "promote_to_serving": summary_ms(end_to_end)}


def bench_freshness(rate: float, seconds: float, interval: float) -> dict[str, Any]:
    import threading

    import numpy as np
    from kafka import KafkaConsumer, TopicPartition

    from streamcl.data import Stream, fashion_mnist
    from streamcl.metrics.prometheus import ServiceMetrics
    from streamcl.registry.holdout import Holdout
    from streamcl.registry.publisher import Publisher, PublishPolicy
    from streamcl.service import TrainerService
    from streamcl.stream.broker import ensure_topics
    from streamcl.stream.producer import produce_stream

    raw, _ = fashion_mnist()
    n = int(rate * seconds)
    order = np.random.default_rng(0).permutation(len(raw.y))[:n]
    stream = Stream(raw.x[order], raw.y[order], None)
    name, topic = f"fresh-{uuid.uuid4().hex[:6]}", "fresh.samples"
    config = TrainerConfig(input_shape=(784,), strategy="naive")
    metrics = ServiceMetrics()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        ensure_topics(broker.bootstrap, [topic])
        registry = ModelRegistry(f"{tmp}/registry")
        policy = PublishPolicy(every_samples=None, every_s=interval, at_experience_end=False,
                               tolerance=0.05)
        service = TrainerService(
            config, bootstrap=broker.bootstrap, topic=topic, name=name, group_id=name,
            snapshot_dir=f"{tmp}/snapshots", batch_size=32, max_wait_s=0.05,
            snapshot_every_batches=1000, holdout=Holdout(0.05, 500, 0), metrics=metrics,
            publisher=Publisher(registry, policy,
                                announcer=Announcer(broker.bootstrap, name)))
        service.recover()
        # one warm-up sample: the clock starts once the service is live (group joined)
        produce_stream(Stream(stream.x[:1], stream.y[:1], None), broker.bootstrap, topic)
        while service.offsets.get(0, 0) < 1:
            service.step_once()
        n += 1
        producer = threading.Thread(target=produce_stream,
                                    args=(stream, broker.bootstrap, topic), kwargs={"rate": rate})
        producer.start()
        while service.offsets.get(0, 0) < n:
            service.step_once()
        producer.join()
        # one more interval so the last samples get published too
        deadline = time.monotonic() + interval + 2
        while registry.manifest(registry.latest())["offsets"]["0"] < n \
                and time.monotonic() < deadline:
            service.step_once()
        service.close()
        versions = [(m["created_at"], m["offsets"]["0"])
                    for m in (registry.manifest(v) for v in registry.versions())]
        reader = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        reader.seek(tp, 0)
        stamps: dict[int, float] = {}
        while len(stamps) < n:
            for recs in reader.poll(timeout_ms=1000).values():
                stamps.update((r.offset, r.timestamp / 1e3) for r in recs)
        reader.close()
    lat, i = [], 0
    for offset in range(1, n):
        while i < len(versions) and versions[i][1] <= offset:
            i += 1
        if i < len(versions):
            lat.append(versions[i][0] - stamps[offset])
    return {"n": n, "covered": len(lat), "versions": len(versions),
            "rejected": int(metrics.value("streamcl_gate_rejections_total",
                                          {"reason": "worse"}) or 0),
            "latency": summary_ms(lat)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--publishes", type=int, default=50)
    ap.add_argument("--promotions", type=int, default=30)
    ap.add_argument("--registry", help="registry URL or directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--rate", type=float, default=1000, help="freshness: samples/s produced")
    ap.add_argument("--seconds", type=float, default=30, help="freshness: how long to produce")
    ap.add_argument("--interval", type=float, default=2.0,
                    help="freshness: publication interval (s)")
    ap.add_argument("--only", choices=("publish", "freshness"), help="run one part only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only != "publish":
        fresh = bench_freshness(args.rate, args.seconds, args.interval)
        s = fresh["latency"]
        print(f"freshness: {fresh['n']} samples at {args.rate:g}/s, a publication every "
              f"{args.interval:g} s: {fresh['versions']} versions, {fresh['rejected']} "
              f"candidates rejected by the gate; sample produced -> a "
              f"production version trained on it ({fresh['covered']} samples covered): median "
              f"{s['median_ms'] / 1e3:.2f} s, p99 {s['p99_ms'] / 1e3:.2f} s, "
              f"max {s['max_ms'] / 1e3:.2f} s")
        verdict = "ok" if s["p99_ms"] / 1e3 <= args.interval + 1 else "OVER"
        print(f"  target: p99 <= interval + 1 s = {args.interval + 1:g} s -> {verdict}",
              flush=True)
        if args.only == "freshness":
            return 0
    name = f"bench-{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp, \
            Announcer(broker.bootstrap, name) as announcer:
        pub = bench_publish(ModelRegistry(args.registry or f"{tmp}/publish"), announcer,
                            args.publishes)
        watch = bench_watcher(ModelRegistry(args.registry or f"{tmp}/watch"), announcer,
                              broker.bootstrap, name, args.promotions)
    print(f"publish: the benchmark MLP (784-256-256-10, {pub['size_bytes'] / 1e6:.2f} MB of "
          f"safetensors), {pub['n']} publications, export + publish + announce")
    for part in ("export", "publish", "announce", "total"):
        s = pub[part]
        print(f"  {part:<9} median {s['median_ms']:6.1f} ms   p99 {s['p99_ms']:6.1f} ms   "
              f"max {s['max_ms']:6.1f} ms")
    verdict = "ok" if pub["total"]["p99_ms"] <= 50 else "OVER"
    print(f"  target: <= 50 ms -> {verdict} (p99)")
    print(f"watcher: {watch['n']} promotions, embedded broker")
    for part in ("announcement_to_serving", "promote_to_serving"):
        s = watch[part]
        print(f"  {part.replace('_', ' '):<24} median {s['median_ms']:6.1f} ms   "
              f"p99 {s['p99_ms']:6.1f} ms   max {s['max_ms']:6.1f} ms")
    verdict = "ok" if watch["announcement_to_serving"]["p99_ms"] <= 100 else "OVER"
    print(f"  target: <= 100 ms -> {verdict} (p99)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
