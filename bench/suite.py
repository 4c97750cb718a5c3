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
        [--results bench/results/suite.jsonl] [--markdown docs/benchmarks.md]
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
    "rar": {"mem_size": MEM}, "il2m-der": {"mem_size": MEM},
}
# the project's first eight strategies, against which the default is judged
SEED_STRATEGIES = ("naive", "er", "agem", "der", "der++", "mas", "il2m", "rar")
AVALANCHE_PARAMS: dict[str, list[str]] = {"agem": ["patterns_per_experience=100",
                                                   "sample_size=64"]}
AVALANCHE_ORDERS = ("stream", "shuffled")
# what bench/avalanche_runner.py can build (IL2M-DER is streamcl's own)
AVALANCHE_STRATEGIES = ("naive", "er", "er-ace", "agem", "der", "der++", "mas", "il2m", "rar")


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
                if avalanche and s in AVALANCHE_STRATEGIES:
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


def summary(results: list[dict[str, Any]], streams: list[str], strategies: list[str]) -> str:
    """One row per strategy: streamcl's mean final accuracy on each stream (true switches),
    Avalanche's in stream order beside it."""
    def mean(stream, kind, strategy, variant="task"):
        return _stats([r for r in results if r["stream"] == stream and r["kind"] == kind
                       and r.get("strategy") == strategy and r["variant"] == variant
                       and "error" not in r])[0] * 100

    def cell(ours: float, ava: float) -> str:
        if ours != ours:
            return "-"
        return f"{ours:.1f}" + (f" ({ava:.1f})" if ava == ava else "")

    head = "| strategy | " + " | ".join(streams) + " | mean |"
    lines = [head, "|---" * (len(streams) + 2) + "|",
             "| bare loop, fixed head | " + " | ".join(
                 cell(mean(st, "bare", None), float("nan")) for st in streams) + " | |"]
    for s in strategies:
        ours = [mean(st, "streamcl", s) for st in streams]
        lines.append(f"| {s} | " + " | ".join(
            cell(o, mean(st, "avalanche", s, "stream")) for o, st in zip(ours, streams,
                                                                          strict=True))
            + f" | {np.mean(ours):.1f} |")
    return "\n".join(lines)


def checks(results: list[dict[str, Any]], streams: list[str], strategies: list[str]) -> str:
    """The issue's figures, stream by stream: which hold and by how much (points)."""
    from streamcl import DEFAULT_STRATEGY

    def mean(stream: str, kind: str, strategy: str | None, variant: str = "task") -> float:
        rows = [r for r in results if r["stream"] == stream and r["kind"] == kind
                and r.get("strategy") == strategy and r["variant"] == variant
                and "error" not in r]
        return _stats(rows)[0] * 100

    def ours(stream: str, strategy: str, variant: str = "task") -> float:
        return mean(stream, "streamcl", strategy, variant)

    lines = ["| stream | behind Avalanche (stream order) by more than 1 | naive - bare "
             "| DER++ - ER | worst ADWIN - true switches | ER-ACE - ER "
             "| default - best first-eight strategy |",
             "|---|---|---|---|---|---|---|"]
    for st in streams:
        gaps = {s: ours(st, s) - mean(st, "avalanche", s, "stream") for s in strategies}
        behind = ", ".join(f"{s} {g:+.1f}" for s, g in gaps.items() if g < -1) or "none"
        adwin, worst = min((ours(st, s, "drift") - ours(st, s), s) for s in strategies)
        best, best_name = max((ours(st, s), s) for s in SEED_STRATEGIES if s in strategies)
        lines.append(
            f"| {st} | {behind} | {ours(st, 'naive') - mean(st, 'bare', None):+.1f} "
            f"| {ours(st, 'der++') - ours(st, 'er'):+.1f} | {adwin:+.1f} ({worst}) "
            f"| {ours(st, 'er-ace') - ours(st, 'er'):+.1f} "
            f"| {ours(st, DEFAULT_STRATEGY) - best:+.1f} (vs {best_name}) |")
    return "\n".join(lines)


def speed_cells(strategies: list[str], repeat: int, avalanche: bool) -> list[dict[str, Any]]:
    """Training speed on split Fashion-MNIST (seed 0): every cell ``repeat`` times, one at a
    time on a quiet machine; the best run counts (noise only ever slows a run down)."""
    cells = []
    for r in range(repeat):
        base = {"stream": "split-fmnist", "seed": 0, "repeat": r}
        cells.append({**base, "kind": "bare", "strategy": None, "variant": "task"})
        for s in strategies:
            cells.append({**base, "kind": "streamcl", "strategy": s, "variant": "task"})
            if avalanche and s in AVALANCHE_STRATEGIES:
                cells.append({**base, "kind": "avalanche", "strategy": s, "variant": "stream"})
    return cells


def speed_table(results: list[dict[str, Any]], strategies: list[str]) -> str:
    def best(kind, strategy, variant):
        rates = [r["samples_per_s"] for r in results if r["kind"] == kind
                 and r.get("strategy") == strategy and r["variant"] == variant
                 and "error" not in r]
        return max(rates) if rates else float("nan")

    bare = best("bare", None, "task")
    lines = ["| strategy | streamcl samples/s | Avalanche samples/s | streamcl / Avalanche |",
             "|---|---|---|---|", f"| bare loop, fixed head | {bare / 1000:.1f}k | | |"]
    for s in strategies:
        ours, ava = best("streamcl", s, "task"), best("avalanche", s, "stream")
        ratio = f"{ours / ava:.2f}x" if ava == ava else "-"
        lines.append(f"| {s} | {ours / 1000:.1f}k | "
                     f"{'-' if ava != ava else f'{ava / 1000:.1f}k'} | {ratio} |")
    naive = best("streamcl", "naive", "task")
    runs = max((r.get("repeat", 0) for r in results), default=0) + 1
    lines += ["", f"Split Fashion-MNIST (60,000 samples, seed 0), training time only, one torch "
                  f"thread, one cell at a time, best of {runs} runs. naive / bare loop: "
                  f"{naive / bare:.0%}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default=",".join(SUITE))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--avalanche-python", help="interpreter of a venv with avalanche-lib")
    ap.add_argument("--jobs", type=int, default=2, help="cells run side by side (one per core)")
    ap.add_argument("--results", type=Path,
                    default=Path(__file__).with_name("results") / "suite.jsonl",
                    help="JSON lines of finished cells; cells already in it are skipped")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    ap.add_argument("--speed", action="store_true",
                    help="measure speed instead (split Fashion-MNIST, one cell at a time, "
                         "best of --repeat) into --speed-results")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--speed-results", type=Path,
                    default=Path(__file__).with_name("results") / "speed.jsonl")
    args = ap.parse_args()
    streams = [s.strip() for s in args.streams.split(",")]
    strategies = [s.strip() for s in args.strategies.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for name, known in (("stream", SUITE), ("strategy", STRATEGIES)):
        chosen = streams if name == "stream" else strategies
        bad = [c for c in chosen if c not in known]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r}; choose from {', '.join(known)}")

    results_file = args.speed_results if args.speed else args.results
    done = []
    if results_file.exists():
        done = [json.loads(line) for line in results_file.read_text().splitlines() if line]
    have = {(*cell_key(r), r.get("repeat")) for r in done}
    planned = (speed_cells(strategies, args.repeat, bool(args.avalanche_python)) if args.speed
               else plan_cells(streams, strategies, seeds, bool(args.avalanche_python)))
    todo = [c for c in planned if (*cell_key(c), c.get("repeat")) not in have]
    if args.speed:
        args.jobs = 1
    print(f"{len(todo)} cells to run ({len(have)} already in {results_file})", flush=True)
    folder = tempfile.mkdtemp(prefix="streamcl-suite-")
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker) as pool, \
            results_file.open("a") as sink:
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

    if args.speed:
        done = [json.loads(line) for line in args.results.read_text().splitlines() if line]
        streams = list(SUITE)
    speed_file = args.speed_results
    speed = [json.loads(line) for line in speed_file.read_text().splitlines()
             if line] if speed_file.exists() else []
    seeds_run = sorted({r["seed"] for r in done if r["stream"] in streams})
    setting = (f"MLP d-256-256-C, batch {BATCH}, SGD lr {LR}, memory {MEM}, one pass; final "
               f"accuracy (%) of the raw model on every class of the test set, mean of seeds "
               f"{', '.join(map(str, seeds_run))}; one torch thread per cell. Machine: "
               f"{platform.machine()}, {multiprocessing.cpu_count()} cores, torch "
               f"{torch.__version__}.")
    text = "\n".join([
        "## Summary", "",
        "streamcl's final accuracy with the true task switches as boundaries; in parentheses "
        "Avalanche (main) on the same files in stream order (incoming data unshuffled, replay "
        "memories sampled at random).", "",
        summary(done, streams, strategies), "",
        "## Figures", "",
        "Differences in accuracy points, per stream.", "",
        checks(done, streams, strategies), "",
        setting, "",
        *(["## Speed", "", speed_table(speed, strategies), ""] if speed else []),
        "## Per stream", "",
        tables(done, streams, strategies)])
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(
            "# Benchmarks\n\nProduced by `python bench/suite.py --avalanche-python "
            "/opt/avalanche-venv/bin/python --markdown docs/benchmarks.md`; the raw results "
            "are in `bench/results/suite.jsonl`. docs/benchmark-notes.md reads them.\n\n"
            + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
