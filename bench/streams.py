"""The benchmark suite's streams: one function per stream, ``(seed) -> (train, test)``.

Each is a kind of stream a live learner meets; none is tuned to. The seed changes the order
(and, for synthetic data, the data itself); the test set covers every class of the stream.

* ``split-fmnist``: Fashion-MNIST, 5 experiences of 2 classes, 12,000 samples each, shuffled
  within each experience.
* ``short-fmnist``: the same stream with each experience cut to its first 1,600 samples
  (50 batches): new classes must be learned fast.
* ``short-runs``: ``short-fmnist`` with the samples of each experience in runs of one label
  (mean length 32): a stream whose label order is not shuffled, where an experience's first
  batch may hold one class only.
* ``split-digits``: scikit-learn's 8x8 digits, 5 experiences of 2 classes, each shown 5 times.
* ``many-classes``: River's ``RandomRBF``, 26 classes and 16 features in [0, 1], 13 experiences
  of 2 classes, ~1,230 samples each.
* ``permuted-fmnist``: domain-incremental, the same 10 classes throughout, 5 experiences each
  seeing the images through a new pixel permutation.

Test streams carry a ``task`` array (the runner of Avalanche needs one); for class-incremental
streams it is the experience of the sample's class.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from streamcl.data import (
    Stream,
    cut_experiences,
    digits,
    fashion_mnist,
    label_runs,
    permuted_stream,
    split_stream,
)

SHORT_EXPERIENCE = 1_600
MEAN_RUN = 32
CLASS_SEP = 3.0


def split_fmnist(seed: int) -> tuple[Stream, Stream]:
    train, test = fashion_mnist()
    return split_stream(train, seed=seed), split_stream(test, shuffle=False)


def short_fmnist(seed: int) -> tuple[Stream, Stream]:
    train, test = split_fmnist(seed)
    return cut_experiences(train, SHORT_EXPERIENCE), test


def short_runs(seed: int) -> tuple[Stream, Stream]:
    train, test = short_fmnist(seed)
    return label_runs(train, MEAN_RUN, seed=seed), test


def split_digits(seed: int) -> tuple[Stream, Stream]:
    train, test = digits(seed=seed)
    return split_stream(train, seed=seed, passes=5), split_stream(test, shuffle=False)


def many_classes(seed: int, n_classes: int = 26, n_features: int = 16,
                 per_class: int = 615, test_per_class: int = 150) -> tuple[Stream, Stream]:
    """scikit-learn's ``make_classification`` (Guyon's hypercube design: every class a
    mixture of 2 Gaussian clusters on hypercube vertices, all 16 features informative),
    min-max scaled to [0, 1]."""
    from sklearn.datasets import make_classification

    need = per_class + test_per_class
    x_all, y_all = make_classification(
        n_samples=need * n_classes, n_features=n_features, n_informative=n_features,
        n_redundant=0, n_classes=n_classes, n_clusters_per_class=2, class_sep=CLASS_SEP,
        weights=None, flip_y=0.0, shuffle=True, random_state=seed)
    x_all = ((x_all - x_all.min(0)) / (x_all.max(0) - x_all.min(0))).astype(np.float32)
    train_idx = [np.flatnonzero(y_all == c)[:per_class] for c in range(n_classes)]
    test_idx = [np.flatnonzero(y_all == c)[per_class:need] for c in range(n_classes)]
    train = Stream(x_all[np.concatenate(train_idx)], y_all[np.concatenate(train_idx)])
    test = Stream(x_all[np.concatenate(test_idx)], y_all[np.concatenate(test_idx)])
    return split_stream(train, seed=seed), split_stream(test, shuffle=False)


def permuted_fmnist(seed: int) -> tuple[Stream, Stream]:
    train, test = fashion_mnist()
    return (permuted_stream(train, seed=seed),
            permuted_stream(test, seed=seed, train=False))


SUITE: dict[str, Callable[[int], tuple[Stream, Stream]]] = {
    "split-fmnist": split_fmnist,
    "short-fmnist": short_fmnist,
    "short-runs": short_runs,
    "split-digits": split_digits,
    "many-classes": many_classes,
    "permuted-fmnist": permuted_fmnist,
}
