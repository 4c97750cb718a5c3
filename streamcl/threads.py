"""How many torch threads to train with: the CPUs this process may really use, and whether a
second thread pays for the model's size.

torch starts one intra-op thread per core of the *machine*. That is wrong twice over:

* A container with a CPU limit (``docker run --cpus 1``) or a process pinned by ``taskset``
  sees every core of the host but may use only some. The usable CPUs are the smaller of the
  affinity mask (``os.sched_getaffinity``) and the cgroup's CPU quota (cgroup v2 ``cpu.max``,
  v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded down: a quota of 1.5 CPUs cannot keep
  two threads busy.
* OpenMP threads wait for each other at the end of every parallel region by spinning. When
  another process (or this service's own consumer process) takes a core, the thread that lost
  it makes its partner spin until the scheduler gives it back: a small model then runs many
  times slower with two threads than with one (``bench/threads.py``: 4-5x on split
  Fashion-MNIST beside one busy process, 37x seen under heavier load). Only a step with
  enough arithmetic repays the synchronisation; below :data:`PARALLEL_FLOPS` per step one
  thread is the default.

The choice is a pure function of the machine's limits and the model, decided once at start-up,
so the same deployment always trains with the same thread count.

>>> threads_for(step_flops=1e6, cpus=8)        # a small MLP: one thread
1
>>> threads_for(step_flops=1e10, cpus=8, reserve=1)  # a big model, a core for the consumer
7
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

# Floating-point operations (forward + backward) of one training step from which a second thread
# pays. Measured on this project's 2-core machine, naive, batch 32, quiet (samples/s, 1 -> 2
# threads): MLP 784-256-256-10, 52 MFLOP/step: 25k -> 30k (1.2x, inside the noise of repeated
# runs); 784-512-512-10, 128 MFLOP: 16k -> 23k (1.4x); 784-1024-1024-10, 357 MFLOP: 4.8k ->
# 8.0k (1.7x). The 8x8-digits MLP (5 MFLOP) gains nothing.
PARALLEL_FLOPS = 1e8

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """Directories that may hold this process's CPU controller files: the cgroup's own
    (from ``/proc/self/cgroup``) and its ancestors, for v2 and v1 layouts, plus the mount
    roots (inside a container, the container's cgroup is mounted at the root)."""
    dirs: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",")
        bases = ([root] if controllers == "" else
                 [root / c for c in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if "cpu" in names])
        for base in bases:
            rel = Path(path.lstrip("/"))
            for part in [rel, *rel.parents]:
                dirs.append(base / part)
    dirs += [root, root / "cpu", root / "cpu,cpuacct"]
    return list(dict.fromkeys(dirs))


def cgroup_cpu_limit(root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroups, or ``None`` if unlimited."""
    limits = []
    for d in _cgroup_dirs(root, proc_cgroup):
        try:
            if (d / "cpu.max").is_file():                      # cgroup v2: "quota period"
                quota, period = (d / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    limits.append(int(quota) / int(period))
            elif (d / "cpu.cfs_quota_us").is_file():           # cgroup v1
                quota = int((d / "cpu.cfs_quota_us").read_text())
                period = int((d / "cpu.cfs_period_us").read_text())
                if quota > 0 and period > 0:
                    limits.append(quota / period)
        except (OSError, ValueError):
            continue
    return min(limits) if limits else None


def usable_cpus() -> int:
    """CPUs this process may really use: affinity mask and cgroup quota, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def step_flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> float:
    """Floating-point operations of one training step (forward + backward ~ 3x forward),
    counted by torch's own ``FlopCounterMode`` on one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return 3.0 * counter.get_total_flops() * batch_size


def threads_for(step_flops: float, cpus: int, reserve: int = 0) -> int:
    """The thread count for a step of ``step_flops`` on ``cpus`` usable CPUs, ``reserve`` of
    them left to other processes of the service (the consumer process)."""
    if step_flops < PARALLEL_FLOPS:
        return 1
    return max(1, cpus - reserve)


def default_threads(model: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                    reserve: int = 0) -> int:
    """:func:`threads_for` this model on this machine."""
    return threads_for(step_flops(model, input_shape, batch_size), usable_cpus(), reserve)


def configure_threads(requested: int | None, model: nn.Module, input_shape: tuple[int, ...],
                      batch_size: int, reserve: int = 0) -> int:
    """Set torch's intra-op threads to ``requested``, or to :func:`default_threads`; return it."""
    n = requested if requested is not None else default_threads(model, input_shape, batch_size,
                                                                reserve)
    torch.set_num_threads(n)
    return n
