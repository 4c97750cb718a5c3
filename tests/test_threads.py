"""The default thread count: the CPUs a process may use (affinity, cgroup quota) and whether a
second thread pays for the model's size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamcl import threads
from streamcl.models import build_model


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    root = _cgroup(tmp_path / "fs", {"cpu.max": "max 100000\n",
                                     "system.slice/app/cpu.max": "150000 100000\n"})
    proc = _cgroup(tmp_path, {"cgroup": "0::/system.slice/app\n"}) / "cgroup"
    assert threads.cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v2_parent_quota_binds(tmp_path: Path) -> None:
    root = _cgroup(tmp_path / "fs", {"kubepods/cpu.max": "200000 100000\n",
                                     "kubepods/pod1/cpu.max": "max 100000\n"})
    proc = _cgroup(tmp_path, {"cgroup": "0::/kubepods/pod1\n"}) / "cgroup"
    assert threads.cgroup_cpu_limit(root, proc) == 2.0


def test_cgroup_v1_quota_as_docker_mounts_it(tmp_path: Path) -> None:
    # inside a container the host path in /proc/self/cgroup does not exist; the mount root does
    root = _cgroup(tmp_path / "fs", {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
                                     "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    proc = _cgroup(tmp_path, {"cgroup": "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n"})
    assert threads.cgroup_cpu_limit(root, proc / "cgroup") == 0.5


def test_no_quota_means_no_limit(tmp_path: Path) -> None:
    root = _cgroup(tmp_path / "fs", {"cpu/cpu.cfs_quota_us": "-1\n",
                                     "cpu/cpu.cfs_period_us": "100000\n",
                                     "cpu.max": "max 100000\n"})
    proc = _cgroup(tmp_path, {"cgroup": "1:cpu:/\n0::/\n"}) / "cgroup"
    assert threads.cgroup_cpu_limit(root, proc) is None
    assert threads.cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent") is None


def test_usable_cpus_takes_the_smaller_of_affinity_and_quota(monkeypatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.usable_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.3)
    assert threads.usable_cpus() == 1          # a fractional CPU still trains on one thread
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cpus() == 6


def test_usable_cpus_reads_this_process_for_real() -> None:
    import os

    assert 1 <= threads.usable_cpus() <= len(os.sched_getaffinity(0))


def test_step_flops_counts_the_model() -> None:
    model = build_model("mlp", (784,), (256, 256), torch.Generator().manual_seed(0))
    model.grow(10, torch.Generator().manual_seed(0))
    per_sample = 2 * (784 * 256 + 256 * 256 + 256 * 10)   # multiply-adds of the matmuls
    assert threads.step_flops(model, (784,), 32) == pytest.approx(3 * per_sample * 32)
    assert model.training  # restored


@pytest.mark.parametrize(("flops", "cpus", "reserve", "expected"), [
    (5e7, 8, 0, 1),        # the benchmark MLP: one thread even with 8 CPUs
    (5e8, 8, 0, 8),
    (5e8, 8, 1, 7),        # a core left to the consumer process
    (5e8, 1, 1, 1),        # never below one
])
def test_threads_for(flops: float, cpus: int, reserve: int, expected: int) -> None:
    assert threads.threads_for(flops, cpus, reserve) == expected


def test_configure_threads_sets_torch(monkeypatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    small = build_model("mlp", (64,), (32,), torch.Generator().manual_seed(0))
    big = build_model("mlp", (4096,), (4096, 4096), torch.Generator().manual_seed(0))
    try:
        assert threads.configure_threads(None, small, (64,), 32) == 1
        assert torch.get_num_threads() == 1
        assert threads.configure_threads(None, big, (4096,), 32, reserve=1) == 3
        assert torch.get_num_threads() == 3
        assert threads.configure_threads(2, small, (64,), 32) == 2   # an explicit count wins
    finally:
        torch.set_num_threads(before)
