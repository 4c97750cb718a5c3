"""Check: the state SHA-256 of the real service after the same stream, for every strategy.

Why: a refactor of the service core must not change what the learner computes. This runs
``TrainerService`` (consumer process, journal, holdout, publication gate, snapshots, ADWIN
boundaries) over the same split-digits stream for each strategy, on an embedded broker, with one
torch thread, and prints one JSON object ``{strategy: state_sha256}`` plus the registry versions
published. Compare the output before and after a change (``bench/results/state_sha256.json``
holds the last recorded one).

    python bench/state_hashes.py [--samples 2000] [--out FILE] [--journal-out FILE]

``--journal-out`` also writes the journal of the default strategy's run as JSON lines (the
fixture that proves old journals stay readable: ``tests/fixtures/journal-*.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import torch

from streamcl import DEFAULT_STRATEGY
from streamcl.data import digits, split_stream
from streamcl.registry.holdout import Holdout
from streamcl.registry.publisher import Publisher, PublishPolicy
from streamcl.registry.registry import ModelRegistry
from streamcl.service import TrainerService
from streamcl.strategies import STRATEGIES
from streamcl.stream.broker import EmbeddedBroker
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream
from streamcl.trainer import TrainerConfig


def run_one(bootstrap: str, topic: str, samples: int, strategy: str, workdir: Path
            ) -> tuple[str, list[int], list[Any]]:
    """(state SHA-256, versions published, the journal's entries) of one service run."""
    name = f"hash-{strategy.replace('+', 'p')}-{uuid.uuid4().hex[:8]}"
    config = TrainerConfig(input_shape=(64,), hidden=(64, 64), strategy=strategy,
                           params={"mem_size": 200} if strategy not in ("naive", "mas") else {},
                           boundaries="drift", seed=3)
    registry = ModelRegistry(str(workdir / name / "registry"))
    publisher = Publisher(registry, PublishPolicy(every_samples=400, at_experience_end=True,
                                                  tolerance=0.05))
    service = TrainerService(
        config, bootstrap=bootstrap, topic=topic, group_id=name, name=name,
        snapshot_dir=str(workdir / name / "snapshots"), batch_size=16, max_wait_s=1.0,
        snapshot_every_batches=25, holdout=Holdout(0.1, 150, seed=3), publisher=publisher)
    service.run(threading.Event(), until=lambda s: s.offsets.get(0, 0) >= samples)
    sha = service.state_sha256()
    versions = registry.versions()
    with Journal(bootstrap, journal_topic(name), create=False) as journal:
        entries = list(journal.read())
    return sha, versions, entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--journal-out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, _ = digits()
    stream = split_stream(train, seed=0)
    stream = type(stream)(stream.x[:args.samples], stream.y[:args.samples],
                          stream.task[:args.samples])
    result: dict[str, dict] = {}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        topic = "hash-input"
        produce_stream(stream, broker.bootstrap, topic)
        for strategy in STRATEGIES:
            sha, versions, entries = run_one(broker.bootstrap, topic, len(stream), strategy,
                                             Path(tmp))
            result[strategy] = {"sha256": sha, "versions": versions,
                                "entries": {t: sum(e.type == t for e in entries)
                                            for t in sorted({e.type for e in entries})}}
            print(f"{strategy:10s} {sha}  {result[strategy]['entries']}", file=sys.stderr,
                  flush=True)
            if strategy == DEFAULT_STRATEGY and args.journal_out is not None:
                args.journal_out.parent.mkdir(parents=True, exist_ok=True)
                args.journal_out.write_text("".join(json.dumps(e.to_json(), sort_keys=True)
                                                    + "\n" for e in entries))
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
