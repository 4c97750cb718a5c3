"""Labelled streams as NPZ files, and the ready-made ones ``streamcl datasets`` writes.

An NPZ stream holds ``x`` (N x features, or N x C x H x W), ``y`` (N,) integer labels and
optionally ``task`` (N,) integers; the stream is the file's order. ``uint8`` inputs are image
bytes (the trainer scales them to [0, 1]); other inputs are used as they are. Files are read
with ``allow_pickle=False``: an NPZ holding Python objects is refused, never unpickled.

Ready-made streams (each a ``-train.npz`` for the stream and a ``-test.npz`` to evaluate on):

* ``split-fmnist``: Fashion-MNIST (Debian package ``dataset-fashion-mnist``) as 5 experiences
  of 2 classes; the train stream is experience by experience, shuffled within each.
* ``split-digits``: scikit-learn's 8x8 digits, the same way, each experience shown 5 times in a
  row (1,347 training images are too few for one pass to teach an MLP anything).
* ``permuted-fmnist``, ``permuted-digits``: 5 experiences of all 10 classes, experience ``t``
  seeing the images through a fixed pixel permutation (identity for ``t = 0``) — a domain shift
  with no new labels, which only a drift detector (or the task field) can find.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(ValueError):
    """A stream file that cannot be used; the message names the file, the array and the fix."""


@dataclass
class Stream:
    x: np.ndarray
    y: np.ndarray
    task: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def save(self, path: str | Path) -> None:
        arrays = {"x": self.x, "y": self.y}
        if self.task is not None:
            arrays["task"] = self.task
        np.savez_compressed(path, **arrays)


def load_stream(path: str | Path) -> Stream:
    """Read and validate an NPZ stream; raise :class:`DataError` with a one-line reason."""
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    with npz:
        missing = [k for k in ("x", "y") if k not in npz.files]
        if missing:
            raise DataError(f"{path}: missing array {missing[0]!r} (an NPZ stream needs x and y, "
                            "optionally task)")
        try:
            x, y = npz["x"], npz["y"]
            task = npz["task"] if "task" in npz.files else None
        except ValueError as exc:  # object arrays would need pickle
            raise DataError(f"{path}: {exc}; store plain numeric arrays") from None
    if x.dtype.kind not in "uif" or x.ndim not in (2, 4) or len(x) == 0:
        raise DataError(f"{path}: x must be a non-empty numeric array of shape N x features or "
                        f"N x C x H x W, got {x.dtype} {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{path}: x contains NaN or infinite values; clean or drop those rows")
    for name, arr in (("y", y), ("task", task)):
        if arr is None:
            continue
        if arr.dtype.kind not in "iu" or arr.ndim != 1 or len(arr) != len(x):
            raise DataError(f"{path}: {name} must be a 1-D integer array with one entry per row of "
                            f"x ({len(x)}), got {arr.dtype} {arr.shape}")
    if (y < 0).any():
        raise DataError(f"{path}: y has negative labels; labels must be integers >= 0")
    return Stream(x, y.astype(np.int64), None if task is None else task.astype(np.int64))


# -- ready-made streams -----------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip'd) IDX file, the MNIST family's format: magic, dims, big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: Path = FMNIST_DIR) -> tuple[Stream, Stream]:
    """Fashion-MNIST's train and test sets as flat uint8 rows (784 features)."""
    def part(prefix: str) -> Stream:
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        return Stream(images.reshape(len(images), -1), labels.astype(np.int64))

    if not (root / "train-images-idx3-ubyte.gz").exists():
        raise DataError(f"{root}: Fashion-MNIST not found; install it with "
                        "'apt-get install dataset-fashion-mnist'")
    return part("train"), part("t10k")


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Stream, Stream]:
    """scikit-learn's 8x8 digits (values 0..16 scaled to [0, 1]), split train/test per class."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(len(idx) * test_fraction)]] = True
    return Stream(x[~test], y[~test]), Stream(x[test], y[test])


def split_stream(data: Stream, classes_per_exp: int = 2, seed: int = 0,
                 shuffle: bool = True, passes: int = 1) -> Stream:
    """Class-incremental: experience t = classes [t*k, (t+1)*k), in order, shuffled within.

    ``passes`` > 1 shows each experience's samples that many times in a row (reshuffled each
    time): a small data set then gives the learner enough steps to learn each experience.
    """
    rng = np.random.default_rng(seed)
    task = data.y // classes_per_exp
    order = np.concatenate([
        rng.permutation(idx) if shuffle else idx
        for idx in (np.flatnonzero(task == t) for t in np.unique(task))
        for _ in range(passes)])
    return Stream(data.x[order], data.y[order], task[order])


def permuted_stream(data: Stream, n_exp: int = 5, seed: int = 0, train: bool = True) -> Stream:
    """Domain-incremental: experience t sees inputs through pixel permutation t (0: identity).

    The train stream gives each experience a disjoint 1/n_exp share of the samples; the test
    stream repeats the whole test set under every permutation.
    """
    rng = np.random.default_rng(seed)
    n_feat = int(np.prod(data.x.shape[1:]))
    perms = [np.arange(n_feat)] + [rng.permutation(n_feat) for _ in range(n_exp - 1)]
    flat = data.x.reshape(len(data.x), -1)
    order = np.random.default_rng(seed + 1).permutation(len(flat))
    parts = np.array_split(order, n_exp) if train else [np.arange(len(flat))] * n_exp
    xs = [flat[idx][:, perms[t]] for t, idx in enumerate(parts)]
    ys = [data.y[idx] for idx in parts]
    tasks = [np.full(len(idx), t, dtype=np.int64) for t, idx in enumerate(parts)]
    return Stream(np.concatenate(xs).reshape(-1, *data.x.shape[1:]), np.concatenate(ys),
                  np.concatenate(tasks))


def experience_bounds(task: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of one task value.

    >>> experience_bounds(np.array([0, 0, 1, 1, 1, 0]))
    [(0, 2), (2, 5), (5, 6)]
    """
    starts = [0, *(np.flatnonzero(np.diff(task)) + 1).tolist(), len(task)]
    return list(itertools.pairwise(starts))


def cut_experiences(data: Stream, per_experience: int) -> Stream:
    """The first ``per_experience`` samples of every experience (runs of one ``task`` value),
    in stream order: short experiences, where a learner has only a few dozen batches to pick
    up new classes.

    >>> labels = np.array([0, 0, 0, 1, 1, 1])
    >>> s = Stream(np.arange(6).reshape(6, 1), labels, task=labels)
    >>> cut_experiences(s, 2).y.tolist()
    [0, 0, 1, 1]
    """
    if data.task is None:
        raise DataError("cutting experiences needs the stream's task values")
    keep = np.concatenate([np.arange(lo, min(lo + per_experience, hi))
                           for lo, hi in experience_bounds(data.task)])
    return Stream(data.x[keep], data.y[keep], data.task[keep])


def label_runs(data: Stream, mean_run: float, seed: int = 0) -> Stream:
    """Reorder each experience into runs of one label, of geometric length ``mean_run``.

    Real streams are rarely shuffled: a sensor, a user session or a batch job sends many
    samples of one kind in a row. Within every experience (same samples, same experience
    order), the next sample keeps the current label with probability ``1 - 1/mean_run`` and
    otherwise draws a label uniformly among those with samples left; within a label the order
    is random. A learner that only follows the latest batches forgets the experience's other
    classes within the experience itself.

    >>> s = Stream(np.zeros((8, 1)), np.array([0, 1] * 4), np.zeros(8, dtype=np.int64))
    >>> sorted(label_runs(s, mean_run=4).y.tolist())
    [0, 0, 0, 0, 1, 1, 1, 1]
    """
    rng = np.random.default_rng(seed)
    task = data.task if data.task is not None else np.zeros(len(data), dtype=np.int64)
    order: list[int] = []
    for lo, hi in experience_bounds(task):
        idx = np.arange(lo, hi)
        pools = {int(c): list(rng.permutation(idx[data.y[idx] == c]))
                 for c in np.unique(data.y[idx])}
        label = int(rng.choice(list(pools)))
        for _ in range(len(idx)):
            if not pools[label] or rng.random() < 1.0 / mean_run:
                label = int(rng.choice([c for c, p in pools.items() if p]))
            order.append(pools[label].pop())
    o = np.array(order, dtype=np.int64)
    return Stream(data.x[o], data.y[o], None if data.task is None else data.task[o])


def write_datasets(out: Path, seed: int = 0) -> list[Path]:
    """Write every ready-made stream that can be built here; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    sources = {"digits": digits(seed=seed)}
    with contextlib.suppress(DataError):
        sources["fmnist"] = fashion_mnist()
    written = []
    for name, (train, test) in sources.items():
        passes = 5 if name == "digits" else 1
        variants = {
            f"split-{name}": (split_stream(train, seed=seed, passes=passes),
                              split_stream(test, shuffle=False)),
            f"permuted-{name}": (permuted_stream(train, seed=seed),
                                 permuted_stream(test, seed=seed, train=False)),
        }
        for stem, (tr, te) in variants.items():
            for suffix, s in (("train", tr), ("test", te)):
                path = out / f"{stem}-{suffix}.npz"
                s.save(path)
                written.append(path)
    return written
