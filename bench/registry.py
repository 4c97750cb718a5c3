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

    python bench/registry.py [--publishes 50] [--promotions 30] [--registry URL] [--threads 1]
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--publishes", type=int, default=50)
    ap.add_argument("--promotions", type=int, default=30)
    ap.add_argument("--registry", help="registry URL or directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
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
