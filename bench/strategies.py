"""Benchmark: every strategy on split Fashion-MNIST, beside a bare PyTorch loop and Avalanche.

Setting (the issue's): 5 experiences of 2 classes, MLP 784-256-256-10, batch 32, buffer 500,
SGD lr 0.05, one pass, 2 threads. Each strategy runs twice — with the true task switches as
boundaries and with ADWIN-detected ones — through ``streamcl.simulate`` (prequential: every
batch is predicted, then trained). The reference is a bare PyTorch loop over the same model
and the same batches, in the same process. Where an Avalanche interpreter is available
(``--avalanche-python``, a throwaway venv: Avalanche is never a dependency), the same strategy
runs in Avalanche on the same data in the same run, via ``bench/avalanche_runner.py``.

    python bench/strategies.py [--avalanche-python /opt/avalanche-venv/bin/python]
                               [--strategies naive,er,...] [--markdown docs/benchmarks.md]

Samples/s counts training time only (test-set evaluation excluded) for all three.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamcl.data import Stream, fashion_mnist, split_stream
from streamcl.simulate import simulate
from streamcl.strategies import STRATEGIES
from streamcl.trainer import TrainerConfig

MEM = 500
# the benchmark's memory budget, expressed in each strategy's own parameters
PARAMS: dict[str, dict] = {
    "naive": {},
    "er": {"mem_size": MEM},
    "agem": {"mem_size": MEM, "patterns_per_experience": 100, "sample_size": 64},
    "der": {"mem_size": MEM},
    "der++": {"mem_size": MEM},
    "mas": {"lambda_reg": 1.0, "alpha": 0.5},
    "il2m": {"mem_size": MEM},
    "rar": {"mem_size": MEM},
}
AVALANCHE_PARAMS: dict[str, list[str]] = {  # the same settings in the runner's terms
    "agem": ["patterns_per_experience=100", "sample_size=64"],
}


def bare_loop(train: Stream, test: Stream, batch_size: int, lr: float, seed: int) -> dict:
    """The fastest honest baseline: a fixed 10-way MLP, SGD, the same batches, nothing else."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y)
    t0 = time.perf_counter()
    for i in range(0, len(y_all), batch_size):
        x = x_all[i:i + batch_size].float().div_(255.0)
        loss = F.cross_entropy(model(x), y_all[i:i + batch_size])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(torch.from_numpy(test.x).float() / 255.0).argmax(1).numpy()
    return {"samples_per_s": len(y_all) / seconds, "final_accuracy": float((pred == test.y).mean())}


def ours(name: str, train: Stream, test: Stream, boundaries: str, args) -> dict:
    cfg = TrainerConfig(input_shape=train.input_shape, strategy=name, params=PARAMS[name],
                        lr=args.lr, boundaries=boundaries, seed=args.seed)
    r = simulate(train, cfg, batch_size=args.batch_size, test=test)
    return {"samples_per_s": r["samples_per_s"], "final_accuracy": r["test"]["accuracy"],
            "boundaries": [b["index"] for b in r["boundaries"]]}


def avalanche(name: str, python: str, files: tuple[Path, Path], args) -> dict | None:
    cmd = [python, str(Path(__file__).with_name("avalanche_runner.py")), "--train", str(files[0]),
           "--test", str(files[1]), "--strategy", name, "--mem-size", str(MEM),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--threads",
           str(args.threads), "--seed", str(args.seed),
           # Avalanche's default: its loaders reshuffle each experience (and the replay memory);
           # without it, ER, IL2M and RAR walk their memory in stored order and lose ~7 points
           "--shuffle"]
    for p in AVALANCHE_PARAMS.get(name, []):
        cmd += ["--param", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"  avalanche {name} failed: {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"samples_per_s": out["samples_per_s"], "final_accuracy": out["final_accuracy"]}


def best_of(n: int, fn):
    runs = [fn() for _ in range(n)]
    return max(runs, key=lambda r: r["samples_per_s"])


def fmt_rate(r: dict | None) -> str:
    return "-" if r is None else f"{r['samples_per_s'] / 1000:.1f}k"


def fmt_acc(r: dict | None) -> str:
    return "-" if r is None else f"{100 * r['final_accuracy']:.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--avalanche-python", help="interpreter of a venv with avalanche-lib")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of the bare loop and naive, best kept (timing noise)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [s.strip() for s in args.strategies.split(",")]

    raw_train, raw_test = fashion_mnist()
    train = split_stream(raw_train, seed=args.seed)
    test = split_stream(raw_test, shuffle=False)
    tmp = Path(tempfile.mkdtemp(prefix="streamcl-bench-"))
    files = (tmp / "train.npz", tmp / "test.npz")
    train.save(files[0])
    test.save(files[1])

    bare = best_of(args.repeat, lambda: bare_loop(train, test, args.batch_size, args.lr,
                                                  args.seed))
    print(f"bare PyTorch loop: {fmt_rate(bare)} samples/s, {fmt_acc(bare)}", flush=True)
    switches = (np.flatnonzero(np.diff(train.task)) + 1).tolist()
    rows = []
    for name in names:
        n = args.repeat if name == "naive" else 1
        task = best_of(n, lambda name=name: ours(name, train, test, "task", args))
        drift = ours(name, train, test, "drift", args)
        ava = avalanche(name, args.avalanche_python, files, args) if args.avalanche_python else None
        rows.append((name, task, drift, ava))
        print(f"{name:6s} task {fmt_rate(task)}/s {fmt_acc(task)} | drift {fmt_rate(drift)}/s "
              f"{fmt_acc(drift)} boundaries {drift['boundaries']} | avalanche {fmt_rate(ava)}/s "
              f"{fmt_acc(ava)}", flush=True)

    lines = [
        "| strategy | streamcl samples/s | vs Avalanche | final acc. (true switches) "
        "| final acc. (ADWIN boundaries) | Avalanche samples/s | Avalanche final acc. |",
        "|---|---|---|---|---|---|---|",
        f"| bare PyTorch loop | {fmt_rate(bare)} | | {fmt_acc(bare)} | | | |",
    ]
    for name, task, drift, ava in rows:
        ratio = f"{task['samples_per_s'] / ava['samples_per_s']:.1f}x" if ava else "-"
        lines.append(f"| {name} | {fmt_rate(task)} | {ratio} | {fmt_acc(task)} | "
                     f"{fmt_acc(drift)} | {fmt_rate(ava)} | {fmt_acc(ava)} |")
    naive = next((t for n, t, _, _ in rows if n == "naive"), None)
    notes = [
        "",
        f"Split Fashion-MNIST, {len(train)} training samples in 5 experiences (true switches "
        f"at {switches}), 10,000 test samples; MLP 784-256-256-10, batch {args.batch_size}, "
        f"buffer {MEM}, SGD lr {args.lr}, one pass, {args.threads} threads, seed {args.seed}. "
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}.",
    ]
    if naive:
        notes.append(f"naive / bare loop: {naive['samples_per_s'] / bare['samples_per_s']:.0%}.")
    table = "\n".join(lines + notes)
    print()
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            "# Benchmarks\n\nProduced by `python bench/strategies.py --avalanche-python "
            "/opt/avalanche-venv/bin/python --markdown docs/benchmarks.md`.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
