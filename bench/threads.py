"""Benchmark: training speed by torch thread count, on a quiet machine and beside a busy process.

For each stream (split digits, split Fashion-MNIST) and strategy (naive, DER++), runs
``streamcl simulate`` with ``--threads 1``, ``--threads 2`` and without ``--threads`` (the
default streamcl picks, ``streamcl.threads``), each ``--repeat`` times in interleaved order, with
the machine quiet and again with one competing busy process per ``--busy`` (a Python busy loop,
as another tenant or the service's own consumer process would be). Prints samples/s (the
median of the repeats) and, per condition, whether the default is within 10% of the best cell.

    python bench/threads.py [--samples 20000] [--repeat 3] [--busy 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streams import split_digits, split_fmnist

from streamcl.data import Stream

STREAMS = {"split-digits": split_digits, "split-fmnist": split_fmnist}
STRATEGIES = ("naive", "der++")
SETTINGS = ("1", "2", "default")


def simulate(path: Path, strategy: str, threads: str, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "streamcl", "simulate", "--data", str(path), "--strategy",
           strategy, "--boundaries", "task", "--json"]
    if threads != "default":
        cmd += ["--threads", threads]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout)["samples_per_s"])


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20_000, help="first N samples of each stream")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--busy", type=int, default=1, help="competing busy processes")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    folder = Path(tempfile.mkdtemp(prefix="streamcl-threads-"))
    files = {}
    for name, build in STREAMS.items():
        train, _ = build(0)
        n = min(args.samples, len(train))
        files[name] = folder / f"{name}.npz"
        Stream(train.x[:n], train.y[:n], train.task[:n]).save(files[name])

    from streamcl.threads import usable_cpus

    print(f"usable CPUs: {usable_cpus()}; {args.repeat} runs per cell, median samples/s")
    rows, verdicts = [], []
    for condition in ("quiet", "busy"):
        hogs = busy_processes(args.busy) if condition == "busy" else []
        try:
            for name, path in files.items():
                for strategy in STRATEGIES:
                    runs: dict[str, list[float]] = {s: [] for s in SETTINGS}
                    for _ in range(args.repeat):
                        for setting in SETTINGS:
                            runs[setting].append(simulate(path, strategy, setting, env))
                    med = {s: statistics.median(v) for s, v in runs.items()}
                    best = max(med.values())
                    ok = med["default"] >= 0.9 * best
                    verdicts.append(ok)
                    rows.append((condition, name, strategy, med, ok))
                    print(f"{condition:5s} {name:13s} {strategy:6s} "
                          + "  ".join(f"{s}: {med[s] / 1000:5.1f}k" for s in SETTINGS)
                          + f"  default/best {med['default'] / best:.0%}", flush=True)
        finally:
            for p in hogs:
                p.kill()
    print()
    print("| condition | stream | strategy | 1 thread | 2 threads | default | default / best |")
    print("|---|---|---|---|---|---|---|")
    for condition, name, strategy, med, _ in rows:
        best = max(med.values())
        print(f"| {condition} | {name} | {strategy} | "
              + " | ".join(f"{med[s] / 1000:.1f}k" for s in SETTINGS)
              + f" | {med['default'] / best:.0%} |")
    print(f"\ndefault within 10% of the best cell: {sum(verdicts)} of {len(verdicts)}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
