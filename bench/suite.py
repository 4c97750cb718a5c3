"""Benchmark: every strategy on a suite of streams and seeds, beside a bare loop and Avalanche.

For each stream of ``bench/streams.py`` and each seed, in one run:

* ``bare``: a bare PyTorch loop, the same MLP with a fixed head over all of the stream's
  classes, the same batches in the same order (the oracle for naive: what head growth must
  not cost);
* ``streamcl``: each strategy through ``streamcl.simulate`` (prequential), with the true task
  switches as boundaries and again with ADWIN-detected ones;
* ``avalanche``: the same strategy in Avalanche (main) on the same files, where an Avalanche
  interpreter is given (``--avalanche-python``, a throwaway venv: never a dependency), in
  stream order (the incoming data unshuffled, replay memories sampled at random: what a
  stream imposes) and with Avalanche's default shuffling of every experience, for scale.

Setting: MLP d-256-256-C, batch 32, SGD lr 0.05, memory 500, one pass; final accuracy of the
model on every class of the test set, mean and min-max over the seeds. Each cell runs in a
worker process with one torch thread; ``--jobs`` workers run side by side (one per core).
Samples/s is training time only. Every finished cell is appended to ``--results`` (JSON lines)
and cells already there are not run again, so a run can be resumed or extended.

    python bench/suite.py [--avalanche-python /opt/avalanche-venv/bin/python]
        [--streams split-fmnist,...] [--strategies naive,er,...] [--seeds 0,1,2]
        [--results bench-results.jsonl] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streams import SUITE

from streamcl.strategies import STRATEGIES

MEM = 500
BATCH = 32
LR = 0.05
# the benchmark's memory budget in each strategy's own parameters; everything else is the
# strategy's default (one set of defaults for every stream)
PARAMS: dict[str, dict[str, Any]] = {
    "er": {"mem_size": MEM}, "er-ace": {"mem_size": MEM}, "agem": {"mem_size": MEM},
    "der": {"mem_size": MEM}, "der++": {"mem_size": MEM}, "il2m": {"mem_size": MEM},
    "rar": {"mem_size": MEM},
}
AVALANCHE_PARAMS: dict[str, list[str]] = {"agem": ["patterns_per_experience=100",
                                                   "sample_size=64"]}
AVALANCHE_ORDERS = ("stream", "shuffled")


# -- one cell -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _data(stream: str, seed: int, folder: str) -> tuple[Any, Any, tuple[str, str]]:
    """The stream's train and test sets, also saved as NPZ files for Avalanche."""
    train, test = SUITE[stream](seed)
    files = (f"{folder}/{stream}-{seed}-train.npz", f"{folder}/{stream}-{seed}-test.npz")
    if not Path(files[0]).exists():
        train.save(files[0])
        test.save(files[1])
    return train, test, files


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def bare_loop(train, test, seed: int) -> dict[str, Any]:
    """A fixed-head MLP trained by plain SGD on the same batches as streamcl's task runs."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from streamcl.simulate import batch_bounds
    from streamcl.trainer import prepare_inputs

    torch.manual_seed(seed)
    n_classes = int(max(train.y.max(), test.y.max())) + 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(train.input_shape)), 256),
                          nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, n_classes))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    for lo, hi in batch_bounds(train, BATCH, cut_at_tasks=True):
        loss = F.cross_entropy(model(prepare_inputs(x_all[lo:hi], cpu)), y_all[lo:hi])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(prepare_inputs(torch.from_numpy(test.x), cpu)).argmax(1).numpy()
    return {"samples_per_s": len(train) / seconds, "accuracy": float((pred == test.y).mean())}


def streamcl_run(train, test, strategy: str, boundaries: str, seed: int) -> dict[str, Any]:
    from streamcl.simulate import simulate
    from streamcl.trainer import TrainerConfig

    cfg = TrainerConfig(input_shape=train.input_shape, strategy=strategy,
                        params=PARAMS.get(strategy, {}), lr=LR, boundaries=boundaries, seed=seed)
    r = simulate(train, cfg, batch_size=BATCH, test=test)
    return {"samples_per_s": r["samples_per_s"], "accuracy": r["test"]["accuracy"],
            "boundaries": [b["index"] for b in r["boundaries"]],
            "true_switches": r["true_switches"]}


def avalanche_run(python: str, files: tuple[str, str], strategy: str, order: str,
                  seed: int) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).with_name("avalanche_runner.py")), "--train", files[0],
           "--test", files[1], "--strategy", strategy, "--mem-size", str(MEM), "--batch-size",
           str(BATCH), "--lr", str(LR), "--threads", "1", "--seed", str(seed), "--order", order]
    for p in AVALANCHE_PARAMS.get(strategy, []):
        cmd += ["--param", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"samples_per_s": out["samples_per_s"], "accuracy": out["final_accuracy"]}


def run_cell(cell: dict[str, Any], folder: str, avalanche_python: str | None) -> dict[str, Any]:
    try:
        return _run_cell(cell, folder, avalanche_python)
    except Exception as exc:  # one failed cell is reported, the run goes on
        import traceback

        traceback.print_exc()
        return {**cell, "error": f"{type(exc).__name__}: {exc}"}


def _run_cell(cell: dict[str, Any], folder: str, avalanche_python: str | None) -> dict[str, Any]:
    train, test, files = _data(cell["stream"], cell["seed"], folder)
    kind = cell["kind"]
    if kind == "bare":
        result = bare_loop(train, test, cell["seed"])
    elif kind == "streamcl":
        result = streamcl_run(train, test, cell["strategy"], cell["variant"], cell["seed"])
    else:
        assert avalanche_python is not None
        result = avalanche_run(avalanche_python, files, cell["strategy"], cell["variant"],
                               cell["seed"])
    return {**cell, **result}


def cell_key(cell: dict[str, Any]) -> tuple:
    return (cell["stream"], cell["seed"], cell["kind"], cell.get("strategy"), cell["variant"])


def plan_cells(streams: list[str], strategies: list[str], seeds: list[int],
               avalanche: bool) -> list[dict[str, Any]]:
    cells = []
    for stream in streams:
        for seed in seeds:
            base = {"stream": stream, "seed": seed}
            cells.append({**base, "kind": "bare", "strategy": None, "variant": "task"})
            for s in strategies:
                for variant in ("task", "drift"):
                    cells.append({**base, "kind": "streamcl", "strategy": s, "variant": variant})
                if avalanche:
                    for order in AVALANCHE_ORDERS:
                        cells.append({**base, "kind": "avalanche", "strategy": s,
                                      "variant": order})
    return cells


# -- the tables -----------------------------------------------------------------------------

def _stats(rows: list[dict[str, Any]], field: str = "accuracy") -> tuple[float, float, float]:
    values = [r[field] for r in rows if field in r]
    if not values:
        return (float("nan"),) * 3
    return float(np.mean(values)), float(np.min(values)), float(np.max(values))


def _acc(rows: list[dict[str, Any]], spread: bool = True) -> str:
    mean, lo, hi = _stats(rows)
    if mean != mean:
        return "-"
    return f"{100 * mean:.1f} ({100 * lo:.1f}-{100 * hi:.1f})" if spread else f"{100 * mean:.1f}"


def tables(results: list[dict[str, Any]], streams: list[str], strategies: list[str]) -> str:
    def pick(stream, kind, strategy, variant):
        return [r for r in results if r["stream"] == stream and r["kind"] == kind
                and r.get("strategy") == strategy and r["variant"] == variant
                and "error" not in r]

    out = []
    for stream in streams:
        seeds = sorted({r["seed"] for r in results if r["stream"] == stream})
        out += [f"### {stream}", "",
                f"Final accuracy (%), mean (min-max) of seeds {', '.join(map(str, seeds))}.", "",
                "| strategy | streamcl, true switches | streamcl, ADWIN | Avalanche, stream "
                "order | Avalanche, shuffled | streamcl samples/s | Avalanche samples/s |",
                "|---|---|---|---|---|---|---|"]
        bare = pick(stream, "bare", None, "task")
        out.append(f"| bare loop, fixed head | {_acc(bare)} | | | | "
                   f"{_stats(bare, 'samples_per_s')[0] / 1000:.1f}k | |")
        for s in strategies:
            ours = pick(stream, "streamcl", s, "task")
            ava = pick(stream, "avalanche", s, "stream")
            rate = _stats(ours, "samples_per_s")[0]
            ava_rate = _stats(ava, "samples_per_s")[0]
            out.append(f"| {s} | {_acc(ours)} | {_acc(pick(stream, 'streamcl', s, 'drift'), False)}"
                       f" | {_acc(ava)} | {_acc(pick(stream, 'avalanche', s, 'shuffled'), False)}"
                       f" | {'-' if rate != rate else f'{rate / 1000:.1f}k'}"
                       f" | {'-' if ava_rate != ava_rate else f'{ava_rate / 1000:.1f}k'} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default=",".join(SUITE))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--avalanche-python", help="interpreter of a venv with avalanche-lib")
    ap.add_argument("--jobs", type=int, default=2, help="cells run side by side (one per core)")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("results") / "suite.jsonl",
                    help="JSON lines of finished cells; cells already in it are skipped")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = ap.parse_args()
    streams = [s.strip() for s in args.streams.split(",")]
    strategies = [s.strip() for s in args.strategies.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for name, known in (("stream", SUITE), ("strategy", STRATEGIES)):
        chosen = streams if name == "stream" else strategies
        bad = [c for c in chosen if c not in known]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r}; choose from {', '.join(known)}")

    done = []
    if args.results.exists():
        done = [json.loads(line) for line in args.results.read_text().splitlines() if line]
    have = {cell_key(r) for r in done}
    todo = [c for c in plan_cells(streams, strategies, seeds, bool(args.avalanche_python))
            if cell_key(c) not in have]
    print(f"{len(todo)} cells to run ({len(have)} already in {args.results})", flush=True)
    folder = tempfile.mkdtemp(prefix="streamcl-suite-")
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker) as pool, \
            args.results.open("a") as sink:
        futures = {pool.submit(run_cell, c, folder, args.avalanche_python): c for c in todo}
        for fut in cf.as_completed(futures):
            r = fut.result()
            sink.write(json.dumps(r) + "\n")
            sink.flush()
            done.append(r)
            acc = r.get("accuracy")
            print(f"{r['stream']:16s} seed {r['seed']} {r['kind']:9s} {r.get('strategy') or '':7s}"
                  f" {r['variant']:8s} "
                  + (f"{100 * acc:5.1f}% {r['samples_per_s'] / 1000:6.1f}k/s" if acc is not None
                     else r.get("error", "?")), flush=True)

    import torch

    table = tables(done, streams, strategies)
    footer = (f"MLP d-256-256-C, batch {BATCH}, SGD lr {LR}, memory {MEM}, one pass, one torch "
              f"thread per cell, {args.jobs} cells at a time. Machine: "
              f"{platform.machine()}, {multiprocessing.cpu_count()} cores, torch "
              f"{torch.__version__}.")
    print()
    print(table)
    print(footer)
    if args.markdown:
        args.markdown.write_text(
            "# Benchmarks\n\nProduced by `python bench/suite.py --avalanche-python "
            "/opt/avalanche-venv/bin/python --markdown docs/benchmarks.md`.\n\n"
            + table + "\n" + footer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
