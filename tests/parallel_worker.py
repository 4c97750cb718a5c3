"""One replica of a data-parallel trainer, launched by torchrun (tests/test_parallel.py).

Global step k covers samples [k * batch, (k + 1) * batch) of split digits; each replica takes
its contiguous part in rank order (``--skew``: on every third step replica 0 takes the whole
batch and the others bring an empty one). Writes ``rank<R>.safetensors`` (the parameters) and
``rank<R>.json`` (labels, boundaries, counts, parameter hash, seconds in collectives) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamcl.data import digits, split_stream
from streamcl.parallel import ReplicaGroup
from streamcl.trainer import OnlineTrainer, TrainerConfig


def part(k: int, rank: int, world: int, batch: int, skew: bool) -> slice:
    lo = k * batch
    if skew and k % 3 == 0:
        return slice(lo, lo + batch) if rank == 0 else slice(lo, lo)
    share = batch // world
    return slice(lo + rank * share, lo + (rank + 1) * share if rank < world - 1 else lo + batch)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", required=True, help="TrainerConfig as JSON")
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skew", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    group = ReplicaGroup.start(backend="gloo")
    train, _ = digits()
    s = split_stream(train, classes_per_exp=2, seed=0)
    x, y = torch.from_numpy(s.x), torch.from_numpy(s.y).long()
    trainer = OnlineTrainer(TrainerConfig.from_json(json.loads(args.config)), group=group)
    for k in range(args.steps):
        mine = part(k, group.rank, group.world_size, args.batch, args.skew)
        plan = trainer.plan(y[mine])
        if plan.boundary is not None:
            trainer.end_experience(plan.boundary)
        trainer.learn(x[mine], y[mine], plan)
    digest = group.check_identical(trainer.model)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in trainer.model.named_parameters()},
              str(args.out / f"rank{group.rank}.safetensors"))
    (args.out / f"rank{group.rank}.json").write_text(json.dumps({
        "labels": trainer.labels, "boundaries": [b.index for b in trainer.boundaries],
        "position": trainer.position, "correct": trainer.correct, "sha256": digest,
        "collective_s": group.collective_s,
        "memory": list(trainer.strategy.memory_usage())}))
    group.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
