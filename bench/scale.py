"""Data-parallel scaling (streamcl.parallel): samples/s, time in collectives, CPU time per sample
for N = 1 and 2 replicas here, and a cost model fitted to them that predicts larger N.

Each replica brings one micro-batch of ``--batch`` samples to every global step (the service's
shape: one micro-batch per rank per step), trains the benchmark's MLP (784-256-256-10, naive:
one optimizer step per global step) and times its collectives (label gather, gradient
all-reduce, counts, detector input). The replicas are launched by torchrun (gloo, loopback).
A second pass times a bare all-reduce of several sizes at N = 2, to fit latency and bandwidth.

Cost model (ring all-reduce): step(N) = c * b + 2 (N - 1) * alpha + 2 (N - 1) / N * bytes * beta
+ g * (N - 1), with c the compute per sample (N = 1), alpha/beta the all-reduce latency and
per-byte time (fitted at N = 2) and g the small gathers' per-peer latency; samples/s = N * b /
step(N) when every replica has its own cores.

    python bench/scale.py                  # N = 1, 2 here; model for 4, 8, 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

INPUT, HIDDEN, CLASSES = (784,), (256, 256), 10


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from streamcl.parallel import ReplicaGroup
    from streamcl.trainer import OnlineTrainer, TrainerConfig

    torch.set_num_threads(1)
    group = ReplicaGroup.start(backend="gloo")
    rng = torch.Generator().manual_seed(group.rank)
    config = TrainerConfig(input_shape=INPUT, hidden=HIDDEN, strategy="naive", lr=0.05,
                           boundaries="drift", seed=0)
    trainer = OnlineTrainer(config, group=group)
    x = torch.rand(args.steps + args.warmup, args.batch, *INPUT, generator=rng)
    y = torch.randint(0, CLASSES, (args.steps + args.warmup, args.batch), generator=rng)
    for k in range(args.warmup):
        trainer.learn(x[k], y[k], trainer.plan(y[k]))
    dist.barrier()
    group.collective_s = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(args.warmup, args.warmup + args.steps):
        plan = trainer.plan(y[k])
        if plan.boundary is not None:
            trainer.end_experience(plan.boundary)
        trainer.learn(x[k], y[k], plan)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    params = sum(p.numel() for p in trainer.model.parameters())
    sizes, allreduce = [], []
    if group.world_size > 1:  # a bare all-reduce of several sizes: latency and bandwidth
        for n in (1, 1 << 12, 1 << 16, 1 << 18, 1 << 20):
            t = torch.zeros(n)
            dist.barrier()
            s = time.perf_counter()
            for _ in range(20):
                dist.all_reduce(t)
            sizes.append(4 * n)
            allreduce.append((time.perf_counter() - s) / 20)
    Path(args.out, f"rank{group.rank}.json").write_text(json.dumps({
        "wall_s": wall, "cpu_s": cpu, "collective_s": group.collective_s, "steps": args.steps,
        "batch": args.batch, "world": group.world_size, "params": params,
        "allreduce_bytes": sizes, "allreduce_s": allreduce}))
    group.stop()


def launch(n: int, args: argparse.Namespace) -> list[dict]:
    out = tempfile.mkdtemp(prefix=f"scale{n}-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(n), __file__, "--worker", "--out", out,
           "--steps", str(args.steps), "--batch", str(args.batch), "--warmup", str(args.warmup)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ,
                                                              "OMP_NUM_THREADS": "1"})
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=".")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="samples per replica per step")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    rows = {}
    for n in (1, 2):
        reps = launch(n, args)
        wall = max(r["wall_s"] for r in reps)
        samples = n * args.batch * args.steps
        coll = sum(r["collective_s"] for r in reps) / n
        rows[n] = {"samples_s": samples / wall, "step_ms": 1e3 * wall / args.steps,
                   "coll_ms": 1e3 * coll / args.steps, "coll_share": coll / wall,
                   "cpu_us_per_sample": 1e6 * sum(r["cpu_s"] for r in reps) / samples,
                   "params": reps[0]["params"], "reps": reps}
    print(f"benchmark MLP {INPUT[0]}-{'-'.join(map(str, HIDDEN))}-{CLASSES}, "
          f"{rows[1]['params']:,} parameters, naive, {args.batch} samples per replica per step, "
          f"{args.steps} steps, gloo on loopback, 1 torch thread per replica, "
          f"{os.cpu_count()} cores")
    print("| replicas | samples/s | step | in collectives | share of step | CPU per sample |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['samples_s']:,.0f} | {r['step_ms']:.2f} ms | {r['coll_ms']:.2f} ms | "
              f"{100 * r['coll_share']:.1f}% | {r['cpu_us_per_sample']:.0f} us |")
    two = rows[2]["reps"][0]
    sizes, times = np.array(two["allreduce_bytes"]), np.array(two["allreduce_s"])
    beta, two_alpha = np.polyfit(sizes, times, 1)  # at N = 2: 2(N-1)/N = 1, 2(N-1) = 2
    alpha = max(two_alpha / 2, 1e-6)
    compute = rows[1]["step_ms"] / 1e3 - rows[1]["coll_ms"] / 1e3
    # what the step's collectives took at N = 2 beyond the gradient all-reduce: the gathers
    gradient_2 = 2 * alpha + 4 * rows[1]["params"] * beta
    gather = max(0.0, rows[2]["coll_ms"] / 1e3 - gradient_2)
    print(f"\nfit: compute {1e6 * compute / args.batch:.1f} us/sample at N=1; all-reduce "
          f"latency alpha {1e6 * alpha:.0f} us, {1 / beta / 1e9:.2f} GB/s (beta); other "
          f"collectives {1e3 * gather:.2f} ms per peer per step")
    speedup = rows[2]["samples_s"] / rows[1]["samples_s"]
    print(f"measured speed-up at N=2: {speedup:.2f}x (2 replicas on {os.cpu_count()} cores, "
          "plus the launcher: the cores bound it)")

    def predict(n: int, compute_s: float, a: float, b: float, g: float) -> float:
        step = (compute_s + 2 * (n - 1) * a + 2 * (n - 1) / n * 4 * rows[1]["params"] * b
                + g * (n - 1))
        return n * args.batch / step

    gpu = {"compute": 0.4e-3, "alpha": 15e-6, "beta": 1 / 150e9, "gather": 30e-6}
    print("\n| replicas | CPU, one core each (model) | GPU, NVLink (model, assumed) |")
    print("|---|---|---|")
    for n in (1, 2, 4, 8, 16):
        cpu_pred = predict(n, compute, alpha, beta, gather)
        gpu_pred = predict(n, gpu["compute"], gpu["alpha"], gpu["beta"], gpu["gather"])
        print(f"| {n} | {cpu_pred:,.0f} samples/s | {gpu_pred:,.0f} samples/s |")
    print("\nGPU column: assumed, not measured (no GPU lent to this session): a launch-bound "
          "step of this MLP ~0.4 ms, NCCL all-reduce ~15 us latency and ~150 GB/s bus "
          "bandwidth.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
