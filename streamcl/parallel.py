"""Data-parallel training: N replicas of one learner, one model, one decision per global step.

Each replica (a process with a ``RANK`` of ``WORLD_SIZE``, launched by ``torchrun`` or an
orchestrator) reads its own share of the input's partitions (:meth:`ReplicaGroup.partitions`:
fixed by rank, no consumer-group rebalancing) and brings one micro-batch to every global step,
an empty one if it has none. torch.distributed is the engine; what this module adds is the few
collectives that make N replicas behave as one learner that saw the step's samples in rank
order:

* **the plan** (:meth:`gather`): the labels of every replica's batch, in rank order, so that
  new labels are found, and the head grows, in the same order everywhere;
* **the gradient** (:meth:`average_gradients`): each replica's mean-loss gradient weighted by
  its sample count, summed, divided by the global count; for a mean loss that is the gradient
  of the whole step's batch, so every replica takes the same optimizer step (a replica with an
  empty batch contributes zeros and still steps);
* **the drift detector's input** (:meth:`gather`): the per-sample errors of every replica in
  rank order, fed to each replica's detector, so each one decides the same boundary at the same
  global position;
* **the check** (:meth:`check_identical`): a SHA-256 of the parameters from every replica; a
  mismatch stops the group (:class:`ReplicaDivergence`) rather than train diverging copies.

No pickle crosses the group: everything exchanged is a tensor (variable lengths are sent as
sizes first, then padded). Backend gloo on CPU, nccl on CUDA. ``collective_s`` counts the
seconds spent in collectives, for the benchmark (bench/scale.py).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from streamcl.stream.entries import owns


class ReplicaDivergence(RuntimeError):
    """The replicas' parameters differ: the group must stop (one line says which ranks)."""


class ReplicaGroup:
    """This process's place among ``world_size`` replicas, and the collectives they share."""

    def __init__(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        #: seconds spent in collective calls so far
        self.collective_s = 0.0

    @classmethod
    def start(cls, *, backend: str | None = None, timeout_s: float = 300.0) -> ReplicaGroup:
        """Join the group torch.distributed describes in the environment (``RANK``,
        ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``: what torchrun and a StatefulSet
        set); gloo on CPU, nccl when CUDA is available."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise ValueError(f"data-parallel training needs {', '.join(missing)} in the "
                             "environment (torchrun sets them)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        timeout = timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one store across the group's restarts, and the replicas'
            # addresses from an earlier attempt are still in it: gloo then connects to dead
            # ports ("Connection refused" at the second restart, seen). Keys per attempt.
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store = dist.PrefixStore(f"streamcl/attempt-{restart}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                is_master=False, timeout=timeout))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size())

    def stop(self) -> None:
        """Leave the group together: a replica tearing its connections down while a peer is
        still in a collective makes gloo abort that peer (seen: SIGABRT at exit)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # -- work split ---------------------------------------------------------------------------
    def partitions(self, n_partitions: int) -> list[int]:
        """The input partitions this replica reads: every ``world_size``-th one from ``rank``
        (fixed, so the journal can say who read what; a replica may get none)."""
        return [p for p in range(n_partitions) if owns(p, self.rank, self.world_size)]

    # -- collectives ----------------------------------------------------------------------------
    # A trainer step makes four collective calls, each one latency on the wire: the header and
    # the labels (plan), the gradients, the errors and losses (learn); the service's step adds
    # its own (the turn's flags, what each replica brought, the label cap, the entry's ranges).
    # Alone (world size 1) none.
    def exchange(self, header: list[int]) -> list[list[int]]:
        """Every replica's small integer ``header`` (same length everywhere), by rank."""
        if self.world_size == 1:
            return [list(header)]
        t0 = time.perf_counter()
        mine = torch.tensor(header, dtype=torch.long)
        parts = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        self.collective_s += time.perf_counter() - t0
        return [p.tolist() for p in parts]

    def gather(self, values: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Every replica's 1-D ``values`` by rank; ``sizes``: their lengths, known to all
        (from :meth:`exchange`), so one call suffices."""
        values = values.reshape(-1)
        if self.world_size == 1:
            return [values]
        if not max(sizes):
            return [values[:0] for _ in sizes]
        t0 = time.perf_counter()
        padded = torch.zeros(max(sizes), dtype=values.dtype)
        padded[:len(values)] = values
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        self.collective_s += time.perf_counter() - t0
        return [p[:s] for p, s in zip(parts, sizes, strict=True)]

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every replica's list of integers (any lengths), by rank: two collectives."""
        sizes = [h[0] for h in self.exchange([len(values)])]
        return [p.tolist() for p in self.gather(torch.tensor(values, dtype=torch.long), sizes)]

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every replica's ``rows`` (same trailing shape and dtype everywhere), concatenated
        in rank order (the quality gate's holdout, gathered for rank 0 to judge)."""
        if self.world_size == 1:
            return rows
        sizes = [h[0] for h in self.exchange([len(rows)])]
        width = math.prod(rows.shape[1:])
        parts = self.gather(rows.reshape(-1), [n * width for n in sizes])
        return torch.cat(parts).reshape(sum(sizes), *rows.shape[1:])

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the replicas (in place, and returned): for strategy state
        that must be global (an importance, a reference gradient, per-class statistics).
        Every replica must call it at the same point of the same step."""
        if self.world_size == 1:
            return values
        t0 = time.perf_counter()
        dist.all_reduce(values)
        self.collective_s += time.perf_counter() - t0
        return values

    def average_gradients(self, params: Iterable[nn.Parameter], weight: int) -> int:
        """Replace each replica's gradients by the global mean: ``sum(weight_r * grad_r) /
        sum(weight_r)`` (``weight``: this replica's sample count; a missing gradient counts as
        zeros). One all-reduce of one flat vector, the count riding at its end. Returns the
        global count."""
        params = list(params)
        if self.world_size == 1:
            return weight
        t0 = time.perf_counter()
        flat = torch.cat([*((p.grad if p.grad is not None else torch.zeros_like(p))
                            .reshape(-1) * weight for p in params),
                          torch.tensor([float(weight)], dtype=params[0].dtype)])
        dist.all_reduce(flat)
        total = float(flat[-1])
        flat = flat[:-1] / max(total, 1.0)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.collective_s += time.perf_counter() - t0
        return round(total)

    def gather_digests(self, digest: str) -> list[str]:
        """Every replica's SHA-256 (hex), by rank."""
        if self.world_size == 1:
            return [digest]
        return [bytes(d).hex() for d in self.exchange(list(bytes.fromhex(digest)))]  # 32 bytes

    def state_sha256(self, digest: str) -> str:
        """The group's state digest from each replica's own (every replica calls it):
        :func:`group_sha256` of them, in rank order."""
        return group_sha256(self.gather_digests(digest))

    def check_identical(self, model: nn.Module) -> str:
        """The parameters' SHA-256, the same on every replica, or :class:`ReplicaDivergence`."""
        digest = parameters_sha256(model)
        differ = [r for r, d in enumerate(self.gather_digests(digest)) if d != digest]
        if differ:
            raise ReplicaDivergence(f"replica {self.rank}'s parameters differ from those of "
                                    f"replica(s) {differ}: the group stops (restart it from the "
                                    "last snapshot)")
        return digest


def replica_snapshot_dir(base: str | os.PathLike[str], rank: int) -> str:
    """Where replica ``rank`` keeps its snapshot shards under ``base`` (its own directory:
    each pod may have its own volume); the service writes there and a replay reads there."""
    return os.path.join(base, f"rank-{rank}")


def group_sha256(digests: list[str]) -> str:
    """One SHA-256 for a group's state: over the replicas' own state digests in rank order
    (each replica holds its shard of the memory, the holdout and the generators, so their
    states differ while their parameters are identical)."""
    h = hashlib.sha256()
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def parameters_sha256(model: nn.Module) -> str:
    """SHA-256 over the parameters' names, shapes and bytes (CPU copies, in order)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


__all__ = ["ReplicaDivergence", "ReplicaGroup", "group_sha256", "parameters_sha256"]
