"""One replica of a data-parallel trainer, launched by torchrun (tests/test_parallel.py).

Global step k covers samples [k * batch, (k + 1) * batch) of split digits; each replica takes
its contiguous part in rank order (``--skew``: on every third step replica 0 takes the whole
batch and the others bring an empty one; ``--by-label``: each global batch is sorted by label
first, so a replica's part lacks classes of the step that the others hold).

``--config`` may be given several times: the trainers run one after the other in the same
group (one launch, one group start, for several strategies). For the i-th, writes to
``--out/<i>/``: ``rank<R>.safetensors`` (the model's state: parameters and buffers),
``rank<R>.strategy.safetensors`` (the strategy's tensors that must be global, keyed
``<state key>[.<name>]``, and ``shard.x``/``shard.y``: the rows of this replica's balanced
memory) and ``rank<R>.json`` (labels, boundaries, counts, parameter hash, seconds in
collectives, memory usage, the strategy's other global state, and that state before
``--close``). ``--close``: at the end every replica closes the open experience (the
strategy's boundary work, in lockstep, on the final model). ``--publish-after K``: after
step K, replica 0 alone exports the model as a publication does (``prepare_inference`` on one
replica: it must make no collective call), its rectifier's buffers going to the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from streamcl.data import digits, split_stream
from streamcl.parallel import ReplicaGroup
from streamcl.registry.model import export_model
from streamcl.strategies import Strategy
from streamcl.strategies.buffer import BalancedBuffer
from streamcl.trainer import OnlineTrainer, TrainerConfig

SHARDED = ("memory", "current")  # each replica's own rows: not global state


def part(k: int, rank: int, world: int, batch: int, skew: bool) -> slice:
    lo = k * batch
    if skew and k % 3 == 0:
        return slice(lo, lo + batch) if rank == 0 else slice(lo, lo)
    share = batch // world
    return slice(lo + rank * share, lo + (rank + 1) * share if rank < world - 1 else lo + batch)


def label_sorted(y: torch.Tensor, batch: int) -> torch.Tensor:
    """The sample order with each global batch sorted by label (stable)."""
    return torch.cat([k + torch.sort(y[k:k + batch], stable=True).indices
                      for k in range(0, len(y), batch)])


def global_state(strategy: Strategy) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The strategy's state bar its memories, split into tensors and JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for key, value in strategy.extra_state().items():
        if key in SHARDED:
            continue
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor)
                                                       for v in value.values()):
            tensors.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    memory = getattr(strategy, "memory", None)
    if isinstance(memory, BalancedBuffer) and len(memory):
        rows = memory.all()
        tensors["shard.x"], tensors["shard.y"] = rows["x"], rows["y"]
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}, values


def train(config: TrainerConfig, group: ReplicaGroup, x: torch.Tensor, y: torch.Tensor,
          args: argparse.Namespace, out: Path) -> None:
    trainer = OnlineTrainer(config, group=group)
    group.collective_s = 0.0  # this trainer's
    published = None
    for k in range(args.steps):
        mine = part(k, group.rank, group.world_size, args.batch, args.skew)
        plan = trainer.plan(y[mine])
        if plan.boundary is not None:
            trainer.end_experience(plan.boundary)
        trainer.learn(x[mine], y[mine], plan)
        if k == args.publish_after and group.rank == 0:
            tensors, _ = export_model(trainer)
            published = {k.removeprefix("rectifier."): v.tolist() for k, v in tensors.items()
                         if k.startswith("rectifier.")}
    values_open = global_state(trainer.strategy)[1]
    if args.close:
        trainer.strategy.on_experience_end()
    digest = group.check_identical(trainer.model)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()},
              str(out / f"rank{group.rank}.safetensors"))
    tensors, values = global_state(trainer.strategy)
    save_file(tensors, str(out / f"rank{group.rank}.strategy.safetensors"))
    (out / f"rank{group.rank}.json").write_text(json.dumps({
        "labels": trainer.labels, "boundaries": [b.index for b in trainer.boundaries],
        "position": trainer.position, "correct": trainer.correct, "sha256": digest,
        "collective_s": group.collective_s,
        "memory": list(trainer.strategy.memory_usage()), "strategy": values,
        "strategy_open": values_open, "published": published}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", action="append", required=True,
                    help="TrainerConfig as JSON (repeat: one trainer after the other)")
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skew", action="store_true")
    ap.add_argument("--by-label", action="store_true")
    ap.add_argument("--close", action="store_true")
    ap.add_argument("--publish-after", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # a replica that skips a collective leaves its peer waiting: fail within a minute
    group = ReplicaGroup.start(backend="gloo", timeout_s=60)
    train_set, _ = digits()
    s = split_stream(train_set, classes_per_exp=2, seed=0)
    x, y = torch.from_numpy(s.x), torch.from_numpy(s.y).long()
    if args.by_label:
        order = label_sorted(y, args.batch)
        x, y = x[order], y[order]
    for i, config in enumerate(args.config):
        train(TrainerConfig.from_json(json.loads(config)), group, x, y, args, args.out / str(i))
    group.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
