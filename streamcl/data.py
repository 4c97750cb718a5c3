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
