"""Learning on a short split stream: every replay strategy forgets clearly less than
fine-tuning, and fine-tuning with a growing head learns as well as a fixed head.

The ``split-digits`` benchmark (5 experiences of 2 classes, each shown 5 times: ~42 batches per
experience, as short as the "short" streams of the benchmark suite; batch 32, lr 0.05, task
boundaries), with a one-hidden-layer MLP of 128 units: on this stream it separates the
strategies as clearly as the default 256-256 MLP at a fraction of the cost. Final test
accuracies measured over seeds 0-7 (naive: 0.18-0.19; a bare PyTorch loop with a fixed 10-way
head over the same batches: 0.18-0.19):

=========  ===========  ================================
strategy   accuracy     smallest gap to naive, same seed
=========  ===========  ================================
er         0.58-0.64    0.39
er-ace     0.74-0.80    0.56
agem       0.53-0.58    0.34
der        0.48-0.52    0.29   (alpha=1.0, see below)
der++      0.59-0.65    0.41
il2m       0.74-0.77    0.56
rar        0.79-0.83    0.60
il2m-der   0.77-0.80    0.59
mas        0.17-0.18    (a regulariser: no replay, no gain here; it must only stay sane)
=========  ===========  ================================

The margins asserted below are about half of the smallest measured gap.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamcl.simulate import batch_bounds, simulate
from streamcl.trainer import OnlineTrainer, TrainerConfig, prepare_inputs

SEEDS = (0, 1)
HIDDEN = (128,)
MARGIN = {"er": 0.2, "er-ace": 0.28, "agem": 0.17, "der": 0.14, "der++": 0.2, "il2m": 0.28,
          "rar": 0.3, "il2m-der": 0.3}
PARAMS = {
    # Plain DER has no cross-entropy replay term, only the logit-matching MSE. On this short
    # stream the logits are still small when they are stored, so with the default alpha=0.1 the
    # MSE barely pulls and DER ends at naive's level (0.18-0.19 for seeds 0-3, as naive);
    # alpha=1.0 lets the stored "dark knowledge" protect the old classes.
    "der": {"alpha": 1.0},
}


@pytest.fixture(scope="module")
def results(split_digits) -> dict[tuple[str, int], dict]:
    """One run per (strategy, seed), shared by the tests below."""
    train, test = split_digits
    cache: dict[tuple[str, int], dict] = {}

    def get(name: str, seed: int) -> dict:
        if (name, seed) not in cache:
            cfg = TrainerConfig(input_shape=train.input_shape, hidden=HIDDEN, strategy=name,
                                params=PARAMS.get(name, {}), lr=0.05, boundaries="task",
                                seed=seed)
            trainer = OnlineTrainer(cfg)
            result = simulate(train, trainer, batch_size=32, test=test)
            result["finite"] = all(bool(torch.isfinite(p).all())
                                   for p in trainer.model.parameters())
            cache[name, seed] = result
        return cache[name, seed]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(MARGIN))
def test_replay_strategies_beat_fine_tuning(name: str, seed: int, results) -> None:
    naive = results("naive", seed)["test"]["accuracy"]
    mine = results(name, seed)["test"]
    assert mine["accuracy"] >= naive + MARGIN[name], (name, seed, mine["accuracy"], naive)
    # the gain is remembering: less forgetting than fine-tuning
    assert mine["forgetting"] < results("naive", seed)["test"]["forgetting"]


@pytest.mark.parametrize("seed", SEEDS)
def test_fine_tuning_forgets_almost_everything(seed: int, results) -> None:
    test = results("naive", seed)["test"]
    matrix = test["accuracy_matrix"]
    assert len(matrix) == 5
    assert all(row[i] > 0.8 for i, row in enumerate(matrix))  # each experience is learned...
    assert max(matrix[-1][:4]) < 0.1  # ...and gone after the last one
    assert 0.1 <= test["accuracy"] <= 0.3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["naive", "mas"])
def test_regularised_and_plain_learners_do_not_diverge(name: str, seed: int, results) -> None:
    r = results(name, seed)
    assert r["finite"]
    assert math.isfinite(r["test"]["accuracy"]) and r["test"]["accuracy"] >= 0.1
    assert r["prequential_accuracy"] > 0.5  # it learns each experience while it lasts
    assert [b["index"] for b in r["boundaries"]] == r["true_switches"]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_growing_head_learns_as_well_as_a_fixed_one(seed: int, split_digits, results) -> None:
    """Naive fine-tuning (head grown label by label) against the oracle a live stream cannot
    have: a bare PyTorch loop whose head has a row for every class from the start, trained on
    the same batches in the same order."""
    train, test = split_digits
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y)
    for lo, hi in batch_bounds(train, 32, cut_at_tasks=True):
        loss = F.cross_entropy(model(prepare_inputs(x_all[lo:hi], torch.device("cpu"))),
                               y_all[lo:hi])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(prepare_inputs(torch.from_numpy(test.x), torch.device("cpu"))).argmax(1)
    fixed = float((pred.numpy() == test.y).mean())
    assert 0.1 <= fixed <= 0.3                          # the oracle learns the last experience
    assert results("naive", seed)["test"]["accuracy"] >= fixed - 0.02
