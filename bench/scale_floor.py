"""What data-parallel training of the benchmark MLP can cost on this machine at best: the floor
under bench/scale.py's figure "time in collectives per step".

Two alternatives to streamcl's engine (which makes four collective calls per step: header,
labels, gradients, errors), each at N = 1 and 2 replicas, torchrun, gloo on loopback, one torch
thread per replica, a fixed batch of ``B`` samples per replica:

* ``one``: a bare training step with ONE collective, the flat gradient all-reduce, as if every
  other exchange rode along with it; its all-reduce time is measured directly;
* ``ddp``: torch's own DistributedDataParallel (gradients bucketed and all-reduced while the
  backward pass still runs); its overhead is (step at N=2 - step at N=1) / step at N=2.

    python bench/scale_floor.py [--batches 32,256,1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(mode: str, batch: int) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                                     nn.ReLU(), nn.Linear(256, 10))
    params = list(model.parameters())
    if mode == "ddp" and world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.rand(batch, 784), torch.randint(0, 10, (batch,))

    def step() -> float:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        took = 0.0
        if mode == "one" and world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            took = time.perf_counter() - t0
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p) / world
                offset += p.numel()
        opt.step()
        return took

    for _ in range(30):
        step()
    dist.barrier()
    n, coll, t0 = 300, 0.0, time.perf_counter()
    for _ in range(n):
        coll += step()
    wall = time.perf_counter() - t0
    if dist.get_rank() == 0:
        print(json.dumps({"step_ms": 1e3 * wall / n, "coll_ms": 1e3 * coll / n}))
    dist.destroy_process_group()


def run(mode: str, batch: int, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", str(n), __file__, "--worker", mode, str(batch)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,256,1024")
    args = ap.parse_args()
    print(f"benchmark MLP 784-256-256-10, {os.cpu_count()} cores, gloo on loopback")
    print("| samples per replica | step N=1 | one collective: step N=2 | in the all-reduce | "
          "DDP: step N=2 | DDP overhead |")
    print("|---|---|---|---|---|---|")
    for b in (int(v) for v in args.batches.split(",")):
        one1, one2 = run("one", b, 1), run("one", b, 2)
        ddp1, ddp2 = run("ddp", b, 1), run("ddp", b, 2)
        print(f"| {b} | {one1['step_ms']:.2f} ms | {one2['step_ms']:.2f} ms | "
              f"{one2['coll_ms']:.2f} ms ({100 * one2['coll_ms'] / one2['step_ms']:.0f}%) | "
              f"{ddp2['step_ms']:.2f} ms | "
              f"{100 * (ddp2['step_ms'] - ddp1['step_ms']) / ddp2['step_ms']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
