"""Publication end to end on a real broker: holdout, quality gate, registry, announcements, a
watcher hot-swapping, Prometheus scraping the running service, every published model rebuilt
from the journal, and a publication lost in a crash repaired by recovery."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcl.cli import main
from streamcl.data import Stream, digits, split_stream
from streamcl.learner import Learner
from streamcl.metrics.prometheus import ServiceMetrics
from streamcl.metrics.server import MetricsServer
from streamcl.registry.announce import Announcer
from streamcl.registry.holdout import Holdout
from streamcl.registry.model import export_model
from streamcl.registry.publisher import Publisher, PublishPolicy
from streamcl.registry.registry import ModelRegistry, weights_bytes
from streamcl.registry.watcher import ModelWatcher
from streamcl.replay import replay, replay_learner
from streamcl.service import TrainerService
from streamcl.stream.broker import ensure_topics
from streamcl.stream.entries import Publish
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream
from streamcl.trainer import OnlineTrainer, TrainerConfig

N, BATCH = 1000, 16
CONFIG = TrainerConfig(input_shape=(64,), hidden=(32,), strategy="naive", boundaries="task",
                       lr=0.1, seed=5)


def _stream() -> Stream:
    train, _ = digits()
    s = split_stream(train, classes_per_exp=2, seed=0)
    return Stream(s.x[:N], s.y[:N], s.task[:N])


def _service(bootstrap: str, topic: str, name: str, tmp: Path,
             metrics: ServiceMetrics | None = None) -> TrainerService:
    registry = ModelRegistry(tmp / "registry")
    announcer = Announcer(bootstrap, name)
    policy = PublishPolicy(every_samples=200, at_experience_end=True, tolerance=0.02)
    return TrainerService(CONFIG, bootstrap=bootstrap, topic=topic, group_id=f"g-{name}",
                          name=name, snapshot_dir=str(tmp / "snapshots"), batch_size=BATCH,
                          max_wait_s=0.3, snapshot_every_batches=10, session_timeout_ms=6000,
                          holdout=Holdout(0.1, 120, seed=CONFIG.seed),
                          publisher=Publisher(registry, policy, announcer=announcer),
                          metrics=metrics)


def _run_until_drained(service: TrainerService, n_offsets: int) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    return service.run(threading.Event(), until=lambda s: s.offsets.get(0, 0) >= n_offsets
                       or time.monotonic() > deadline)


def test_publication_end_to_end(kafka_bootstrap: str, tmp_path: Path,
                                prometheus_server: Any) -> None:
    stream = _stream()
    topic, name = f"pub-{uuid.uuid4().hex[:8]}", f"pub-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic])
    assert produce_stream(stream, kafka_bootstrap, topic) == N
    metrics = ServiceMetrics(window=200)
    service = _service(kafka_bootstrap, topic, name, tmp_path, metrics)
    server = MetricsServer(metrics, "127.0.0.1", 0, live=service.alive,
                           ready=lambda: service.ready).start()
    prom = prometheus_server([f"127.0.0.1:{server.port}"], scrape_interval_s=1.0)
    registry = ModelRegistry(tmp_path / "registry")
    watcher = ModelWatcher(registry, bootstrap=kafka_bootstrap, name=name).start()
    try:
        _run_until_drained(service, N)
        assert service.offsets[0] == N
        live_sha = service.state_sha256()
        trained = service.trainer.position  # type: ignore[union-attr]
        held = service.holdout.seen - trained  # type: ignore[union-attr]

        # the holdout was never trained on: ~10% of the stream, and replay agrees bit for bit
        assert held + trained == N and 0.05 * N < held < 0.15 * N
        assert replay(kafka_bootstrap, name, topic) == (live_sha, service.batches)

        # every journaled publication is a registry version, and nothing else is
        with Journal(kafka_bootstrap, journal_topic(name), create=False) as journal:
            entries = list(journal.read())
        published = [e for e in entries if e.type == "publish"]
        rejected = [e for e in entries if e.type == "reject"]
        # 3 experience ends + every 200 samples; naive fine-tuning forgets old classes, so the
        # gate turns some candidates down
        assert len(published) + len(rejected) >= 5 and published and rejected
        assert [e.version for e in published] == registry.versions()
        assert registry.alias("production") == published[-1].version
        triggers = {e.trigger for e in published + rejected}
        assert {"experience-end", "samples"} <= triggers
        for e in rejected:
            assert e.reason.startswith("worse") and e.gate.decision == "rejected"
        last = (published + rejected)[-1].metrics
        assert len(last.accuracy_matrix.rows) >= 3 and 0 < last.holdout_accuracy <= 1
        assert last.forgetting is not None and last.backward_transfer is not None

        # any published model can be rebuilt from the log: replay to its entry, export, hash
        for entry in published:
            manifest = registry.manifest(entry.version)
            assert manifest["journal_seq"] == entry.seq
            learner, _ = replay_learner(kafka_bootstrap, name, topic, to_seq=entry.seq)
            tensors, _ = export_model(learner.trainer)
            assert hashlib.sha256(weights_bytes(tensors)).hexdigest() == manifest["sha256"]

        # the watcher (following <name>.models) serves the production version
        final = published[-1].version
        assert watcher.wait_for_version(final, timeout=20)
        x = torch.from_numpy(stream.x[-200:])
        assert torch.equal(watcher.predict(x), registry.load_model(final).predict(x))

        # a real Prometheus scraping the running service sees the same figures
        assert metrics.value("streamcl_samples_trained_total") == trained
        prom.wait_for("streamcl_samples_trained_total", float(trained))
        prom.wait_for("streamcl_samples_holdout_total", float(held))
        prom.wait_for("streamcl_production_version", float(final))
        prom.wait_for("streamcl_ready", 1.0)
        prom.wait_for('streamcl_drift_events_total{trigger="task"}', 3.0)
        prom.wait_for("streamcl_publications_total", float(len(published)))
        prom.wait_for("sum(streamcl_train_step_seconds_count)", lambda v: v > 0)
    finally:
        watcher.stop()
        server.stop()

    # streamcl report reads the same journal and registry
    out = tmp_path / "report"
    assert main(["report", "--bootstrap-servers", kafka_bootstrap, "--name", name,
                 "--registry", str(tmp_path / "registry"), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert all(f"v{e.version}" in html for e in published)
    assert rejected[0].reason.split(":")[0] in html
    assert (out / "accuracy_matrix.png").stat().st_size > 1000

    # a crash between journaling a publication and writing it: recovery publishes it again,
    # from the replayed state, with the same weights
    manifest = registry.manifest(final)
    shutil.rmtree(tmp_path / "registry" / "versions" / f"{final:06d}")
    shutil.rmtree(tmp_path / "snapshots")  # recover from the journal alone
    again = _service(kafka_bootstrap, topic, name, tmp_path)
    try:
        summary = again.recover()
        assert summary["republished"] == 1
        assert ModelRegistry(tmp_path / "registry").manifest(final)["sha256"] == manifest["sha256"]
        assert again.state_sha256() == live_sha
    finally:
        again.close()


def test_gate_rejects_a_worse_candidate(tmp_path: Path) -> None:
    stream = _stream()
    good = OnlineTrainer(CONFIG)
    holdout = Holdout(0.2, 200, seed=0)
    for i in range(0, N, BATCH):
        x, y = torch.from_numpy(stream.x[i:i + BATCH]), torch.from_numpy(stream.y[i:i + BATCH])
        mask = holdout.split(len(y))
        good.step(x[~mask], y[~mask].long())
        holdout.add(x[mask], y[mask].long(), 0, len(y))
    registry = ModelRegistry(tmp_path / "registry")
    pub = Publisher(registry, PublishPolicy(every_samples=1, tolerance=0.02))
    first = pub.judge(Learner(good, holdout), experience_ended=False)
    assert isinstance(first, Publish) and first.gate.reason == "no production version yet"
    pub.commit(first, Learner(good, holdout))
    # a model that saw only the first 100 samples is far worse on the same holdout
    weak = OnlineTrainer(CONFIG)
    weak.step(torch.from_numpy(stream.x[:100]), torch.from_numpy(stream.y[:100]).long())
    verdict = pub.evaluate(Learner(weak, holdout), finished=False)
    assert not verdict.gate.promoted and verdict.gate.reason.startswith("worse")
    assert verdict.gate.candidate < verdict.gate.production - 0.02
    assert 0 < verdict.metrics.negative_flip_rate <= 1
    # the good model again passes (not worse than itself)
    assert pub.evaluate(Learner(good, holdout), finished=False).gate.promoted
    assert np.isclose(pub.evaluate(Learner(good, holdout), finished=False)
                      .metrics.negative_flip_rate, 0.0)
