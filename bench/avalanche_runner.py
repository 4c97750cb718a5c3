#!/usr/bin/env python3
"""Side-by-side baseline: run one Avalanche strategy on a split Fashion-MNIST stream.

This script is standalone. It does NOT import ``streamcl`` and Avalanche is NOT a
dependency of this project: run it with the interpreter of a throwaway virtual
environment that has Avalanche installed (see /opt/avalanche-venv/SETUP.md on the
machine where the baseline was prepared), e.g.::

    /opt/avalanche-venv/bin/python bench/avalanche_runner.py \\
        --train /tmp/split-fmnist-train.npz --test /tmp/split-fmnist-test.npz \\
        --strategy er --threads 2

Input NPZ files hold ``x`` (N x 784 uint8 pixels), ``y`` (N,) labels 0..9 and
``task`` (N,) experience index 0..4. Experience t is made of the train rows with
``task == t`` in file order (the file order is the stream order).

Exactly one JSON object is printed on stdout::

    {"strategy", "samples", "seconds", "samples_per_s", "final_accuracy",
     "avalanche_version", "notes"}

Everything else (Avalanche output, warnings, progress) goes to stderr. On failure
the script prints ``avalanche_runner: error: ...`` on stderr and exits non-zero.

``seconds`` is the wall time of the five ``strategy.train(experience)`` calls only
(benchmark construction and the final evaluation are excluded), ``samples`` the
number of train rows, ``final_accuracy`` the argmax accuracy of the raw model
output over the whole test set after the last experience.

Stream order vs. shuffling: by default ``strategy.train(exp, shuffle=False)`` is
used, so each experience is visited in file order. Avalanche passes that same flag
to the replay-memory loaders of ER, IL2M and RAR, which then walk the buffer in
its stored order instead of drawing random batches. That costs ER and IL2M about
7 accuracy points on split Fashion-MNIST. ``--shuffle`` keeps Avalanche's default
(shuffle=True) instead. The input files are already shuffled within each
experience, so with ``--shuffle`` the samples are still drawn from the same
distribution, only in a different order.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import random
import sys
import time
import traceback

STRATEGIES = ("naive", "er", "er-ace", "agem", "der", "der++", "mas", "il2m", "rar")


class RunnerError(Exception):
    """A user-facing error (bad arguments, bad input file, ...)."""


def parse_value(text: str):
    """Parse a --param value as bool / None / int / float, else keep the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_params(items):
    params = {}
    for item in items or []:
        if "=" not in item:
            raise RunnerError(f"--param expects k=v, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RunnerError(f"--param has an empty name: {item!r}")
        params[key] = parse_value(value)
    return params


def build_argparser():
    p = argparse.ArgumentParser(
        description="Run one Avalanche strategy on a split Fashion-MNIST NPZ stream "
        "and print one JSON line with throughput and final accuracy."
    )
    p.add_argument("--train", required=True, help="train NPZ (x, y, task)")
    p.add_argument("--test", required=True, help="test NPZ (x, y, task)")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--mem-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--order",
        choices=("stream", "shuffled", "stream-memory-in-order"),
        default="stream",
        help="stream: the incoming data in file (stream) order, replay memories sampled at "
        "random (what a live stream imposes, nothing more); shuffled: Avalanche's default, "
        "every experience reshuffled; stream-memory-in-order: strategy.train(exp, "
        "shuffle=False) as it is, which also walks ER/IL2M/RAR memories in stored order",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="override a constructor argument of the strategy/plugin "
        "(value parsed as int/float/bool when possible); repeatable",
    )
    return p


def load_npz(path, what):
    import numpy as np

    if not os.path.isfile(path):
        raise RunnerError(f"{what} file not found: {path}")
    try:
        with np.load(path) as data:
            missing = [k for k in ("x", "y", "task") if k not in data.files]
            if missing:
                raise RunnerError(f"{what} file {path} lacks arrays {missing}")
            x = np.asarray(data["x"])
            y = np.asarray(data["y"]).astype(np.int64).reshape(-1)
            task = np.asarray(data["task"]).astype(np.int64).reshape(-1)
    except RunnerError:
        raise
    except Exception as exc:
        raise RunnerError(f"cannot read {what} file {path}: {exc}") from exc
    n = x.shape[0]
    x = x.reshape(n, -1)
    if y.shape[0] != n or task.shape[0] != n:
        raise RunnerError(f"{what}: x, y and task lengths differ")
    if n == 0:
        raise RunnerError(f"{what} file is empty")
    if y.min() < 0:
        raise RunnerError(f"{what} labels must be >= 0")
    # uint8 inputs are image bytes (as streamcl reads them); anything else is used as it is
    xf = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return xf, y, task


def make_model(n_features, n_classes):
    from torch import nn

    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(n_features, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, n_classes),
    )


def check_params(target, params, label):
    """Reject --param names the constructor cannot take (unless it takes **kwargs)."""
    sig = inspect.signature(target)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    unknown = sorted(set(params) - set(sig.parameters))
    if unknown:
        valid = sorted(k for k in sig.parameters if k != "self")
        raise RunnerError(f"{label} has no argument(s) {unknown}; valid: {valid}")


def build_strategy(args, model, optimizer, criterion, params):
    """Return (strategy, algorithm_kwargs, description)."""
    from avalanche.training import DER, Naive, Replay
    from avalanche.training.plugins import (
        AGEMPlugin,
        IL2MPlugin,
        MASPlugin,
        RARPlugin,
    )

    common = dict(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        train_mb_size=args.batch_size,
        train_epochs=1,
        eval_mb_size=1000,
        device="cpu",
        # On Avalanche main `evaluator=None` becomes EvaluationPlugin() with no
        # metrics and no loggers, so nothing is computed or logged per iteration.
        evaluator=None,
        eval_every=-1,
    )

    name = args.strategy
    if name == "naive":
        kw = dict(params)
        check_params(Naive.__init__, kw, "Naive")
        return Naive(**{**common, **kw}), kw, "Naive"
    if name == "er":
        kw = {"mem_size": args.mem_size, **params}
        check_params(Replay.__init__, kw, "Replay")
        return Replay(**{**common, **kw}), kw, "Replay"
    if name == "er-ace":
        from avalanche.training import ER_ACE

        kw = {"mem_size": args.mem_size, "batch_size_mem": args.batch_size, **params}
        check_params(ER_ACE.__init__, kw, "ER_ACE")
        return ER_ACE(**{**common, **kw}), kw, "ER_ACE"
    if name in ("der", "der++"):
        kw = {
            "mem_size": args.mem_size,
            "batch_size_mem": args.batch_size,
            "alpha": 0.1,
            "beta": 0.0 if name == "der" else 0.5,
            **params,
        }
        check_params(DER.__init__, kw, "DER")
        return DER(**{**common, **kw}), kw, "DER"

    if name == "agem":
        plugin_cls = AGEMPlugin
        kw = {"patterns_per_experience": 100, "sample_size": 64, **params}
    elif name == "mas":
        plugin_cls = MASPlugin
        kw = {"lambda_reg": 1.0, "alpha": 0.5, **params}
    elif name == "il2m":
        plugin_cls = IL2MPlugin
        kw = {"mem_size": args.mem_size, "batch_size_mem": args.batch_size, **params}
    elif name == "rar":
        plugin_cls = RARPlugin
        kw = {"batch_size_mem": args.batch_size, "mem_size": args.mem_size, **params}
    else:  # pragma: no cover - argparse restricts the choices
        raise RunnerError(f"unknown strategy {name!r}")
    check_params(plugin_cls.__init__, kw, plugin_cls.__name__)
    plugin = plugin_cls(**kw)
    return Naive(**common, plugins=[plugin]), kw, f"Naive + {plugin_cls.__name__}"


def build_benchmark(train, test):
    import torch
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    def stream(x, y, task):
        exps = []
        for t in sorted(set(task.tolist())):
            idx = (task == t).nonzero()[0]  # file order is kept
            exps.append(
                _make_taskaware_tensor_classification_dataset(
                    torch.from_numpy(x[idx]),
                    torch.from_numpy(y[idx]),
                    task_labels=0,  # class-incremental: a single task label
                )
            )
        return exps

    train_exps = stream(*train)
    test_exps = stream(*test)
    # with_classes_timeline adds classes_in_this_experience / previous_classes /
    # classes_seen_so_far / future_classes, which IL2M needs.
    return with_classes_timeline(benchmark_from_datasets(train=train_exps, test=test_exps))


def shuffle_memory_loaders(strategy):
    """Keep the incoming data in stream order but draw replay memories at random.

    ``strategy.train(exp, shuffle=False)`` reaches the memory loaders of ER and IL2M (a
    ``ReplayDataLoader``: the experience's data first, then the memory) and of RAR (its own
    ``replay_loader``) too, which then walk the memory in stored order. Here the memory
    part of every ``ReplayDataLoader`` is sampled with shuffling, and RAR's replay loader is
    rebuilt shuffled; the incoming data (dataset 0) keeps its order.
    """
    from avalanche.benchmarks.utils import data_loader as dl
    from torch.utils.data import DataLoader

    def create_samplers(datasets, batch_sizes, distributed_sampling, loader_kwargs):
        samplers = []
        for i, (d, b) in enumerate(zip(datasets, batch_sizes, strict=True)):
            kwargs = dict(loader_kwargs, shuffle=i > 0 or loader_kwargs.get("shuffle", False))
            samplers.append(dl._make_sampler(d, distributed_sampling, kwargs, b))
        return samplers

    dl.ReplayDataLoader._create_samplers = staticmethod(create_samplers)
    for plugin in strategy.plugins:
        if type(plugin).__name__ == "RARPlugin":
            original = plugin.before_training_exp

            def before_training_exp(strat, *a, _orig=original, _plugin=plugin, **kw):
                _orig(strat, *a, **kw)
                if getattr(_plugin, "replay_loader", None) is not None:
                    _plugin.replay_loader = DataLoader(_plugin.storage_policy.buffer,
                                                       batch_size=_plugin.batch_size_mem,
                                                       shuffle=True)

            plugin.before_training_exp = before_training_exp


def avalanche_version():
    import avalanche

    version = getattr(avalanche, "__version__", "unknown")
    # Optional sidecar written when the throwaway venv was built from a git
    # snapshot of Avalanche's main branch (pip's copy has no git metadata).
    sidecar = os.path.join(sys.prefix, "AVALANCHE_COMMIT")
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            commit = f.read().strip()
        if commit:
            version = f"{version} (main@{commit[:12]})"
    return version


def run(args):
    import numpy as np
    import torch

    params = parse_params(args.param)
    if args.batch_size <= 0 or args.mem_size < 0 or args.threads <= 0:
        raise RunnerError("--batch-size and --threads must be > 0, --mem-size >= 0")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    train = load_npz(args.train, "train")
    test = load_npz(args.test, "test")

    from avalanche.core import SupervisedPlugin

    class EvalPathAccuracy(SupervisedPlugin):
        """Records argmax accuracy of strategy.mb_output as seen by Avalanche's
        eval loop (i.e. after other plugins' after_eval_forward hooks, such as
        IL2M's score rectification)."""

        def __init__(self):
            super().__init__()
            self.correct = 0
            self.total = 0

        def after_eval_forward(self, strategy, **kwargs):
            pred = strategy.mb_output.argmax(dim=1)
            self.correct += int((pred == strategy.mb_y).sum())
            self.total += int(strategy.mb_y.numel())

    bench = build_benchmark(train, test)
    n_classes = int(max(train[1].max(), test[1].max())) + 1
    model = make_model(train[0].shape[1], n_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0)
    criterion = torch.nn.CrossEntropyLoss()
    strategy, algo_kwargs, algo_desc = build_strategy(args, model, optimizer, criterion, params)
    recorder = EvalPathAccuracy()
    strategy.plugins.append(recorder)  # last, so it sees rectified outputs

    train_kwargs = {} if args.order == "shuffled" else {"shuffle": False}
    if args.order == "stream":
        shuffle_memory_loaders(strategy)
    n_samples = int(train[0].shape[0])

    # ---- timed region: the training loop only ----
    c0 = time.process_time()
    t0 = time.perf_counter()
    for exp in bench.train_stream:
        strategy.train(exp, **train_kwargs)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    # ----------------------------------------------

    strategy.eval(bench.test_stream)
    eval_path_acc = recorder.correct / recorder.total if recorder.total else float("nan")

    # Raw argmax accuracy of the model over the whole test set.
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(test[0])
        yt = torch.from_numpy(test[1])
        correct = 0
        for i in range(0, xt.shape[0], 1000):
            out = model(xt[i : i + 1000])
            correct += int((out.argmax(dim=1) == yt[i : i + 1000]).sum())
    final_acc = correct / xt.shape[0]

    notes = [
        f"{algo_desc}({', '.join(f'{k}={v}' for k, v in algo_kwargs.items())})",
        f"SGD(lr={args.lr}, momentum=0), CrossEntropyLoss, train_mb_size="
        f"{args.batch_size}, train_epochs=1, eval_mb_size=1000, cpu, "
        f"threads={args.threads}, seed={args.seed} (random/numpy/torch)",
        "evaluator=None (main turns it into EvaluationPlugin() with no metrics "
        "and no loggers), eval_every=-1",
        f"order={args.order}",
        "timing = wall time of the 5 strategy.train() calls (includes "
        "per-experience buffer updates / importance / IL2M statistics passes done "
        f"inside train()); process CPU time over the same region = {cpu_seconds:.2f}s",
        "final_accuracy = argmax of the raw model output over the full test set; "
        f"argmax accuracy of mb_output in Avalanche's eval loop = {eval_path_acc:.4f}",
    ]
    if args.strategy == "er":
        notes.append(
            "storage: ReplayPlugin default ExperienceBalancedBuffer(adaptive_size=True),"
            " i.e. equal share per experience, reservoir sampling inside each share"
        )
    elif args.strategy in ("der", "der++"):
        notes.append(
            "storage: DER's ClassBalancedBufferWithLogits (equal share per class, "
            "reservoir inside a class; logits computed after training on the "
            "experience); memory loader always shuffled"
        )
    elif args.strategy == "agem":
        notes.append(
            "memory: random patterns_per_experience samples per experience, "
            "reference batch sample_size split evenly over experiences "
            "(GroupBalancedInfiniteDataLoader, unshuffled)"
        )
    elif args.strategy == "il2m":
        notes.append(
            "storage: ExperienceBalancedBuffer(adaptive_size=True). IL2M "
            "rectification happens only in after_eval_forward and keys off the "
            "*evaluated* experience's classes (test exp 0 is never rectified); "
            "final_accuracy is the raw, unrectified model"
        )
    elif args.strategy == "rar":
        notes.append(
            "storage: ReservoirSamplingBuffer; ReplayDataLoader uses batch_size_mem for "
            "both current and memory parts; the plain buffer CE term is commented "
            "out upstream, only the beta_coef * adversarial-replay loss is added"
        )
    elif args.strategy == "mas":
        notes.append("no memory; importance recomputed after each experience")

    return {
        "strategy": args.strategy,
        "samples": n_samples,
        "seconds": round(seconds, 4),
        "samples_per_s": round(n_samples / seconds, 2) if seconds > 0 else None,
        "final_accuracy": round(final_acc, 4),
        "avalanche_version": avalanche_version(),
        "notes": "; ".join(notes),
    }


def main(argv=None):
    args = build_argparser().parse_args(argv)
    real_stdout = sys.stdout
    try:
        # Anything Avalanche or its dependencies print goes to stderr; stdout
        # carries only the final JSON object.
        with contextlib.redirect_stdout(sys.stderr):
            result = run(args)
        if result["final_accuracy"] != result["final_accuracy"]:  # NaN guard
            raise RunnerError("final accuracy is NaN")
    except RunnerError as exc:
        print(f"avalanche_runner: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        traceback.print_exc(file=sys.stderr)
        print(
            f"avalanche_runner: error: cannot import a dependency ({exc}); run this "
            "script with the Avalanche venv's python (e.g. /opt/avalanche-venv/bin/python)",
            file=sys.stderr,
        )
        return 3
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"avalanche_runner: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
