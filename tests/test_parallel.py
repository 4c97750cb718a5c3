"""Data-parallel training (streamcl.parallel) with 2 real replicas: torchrun, gloo, loopback.

Each case launches tests/parallel_worker.py under ``torchrun --standalone --nproc-per-node 2``
and compares what the replicas wrote with one learner trained in this process on the same
global batches (each replica's part concatenated in rank order): the replicas must hold
bit-identical parameters, and for naive the same model as the single learner, to float
tolerance (a mean gradient summed in another order), with the same labels, boundaries and
prequential counts. The strategies with global state (A-GEM, MAS, IL2M, IL2M-DER, ER-ACE)
share one launch per mode (parts sorted by label, empty batches), their trainers one after
the other.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from streamcl.data import digits, split_stream
from streamcl.models import build_model
from streamcl.parallel import ReplicaGroup
from streamcl.registry.model import export_model
from streamcl.trainer import OnlineTrainer, TrainerConfig

WORKER = Path(__file__).with_name("parallel_worker.py")
STEPS, BATCH = 40, 32
PUBLISH = 20  # the step after which replica 0 (alone) publishes, in the GLOBAL_STATE runs


def _launch(out: Path, configs: list[TrainerConfig], *extra: str) -> list[list[dict[str, Any]]]:
    """Both replicas' results for each config (trained one after the other in one group)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), "--out", str(out),
         *(a for c in configs for a in ("--config", json.dumps(c.to_json()))),
         "--batch", str(BATCH), "--steps", str(STEPS), *extra],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [[{**json.loads((out / str(i) / f"rank{r}.json").read_text()),
              "params": load_file(str(out / str(i) / f"rank{r}.safetensors")),
              "state": load_file(str(out / str(i) / f"rank{r}.strategy.safetensors"))}
             for r in range(2)] for i in range(len(configs))]


def _replicas(tmp_path: Path, config: TrainerConfig, *extra: str) -> list[dict[str, Any]]:
    return _launch(tmp_path / "replicas", [config], *extra)[0]


def _single(config: TrainerConfig, close: bool = False, by_label: bool = False
            ) -> OnlineTrainer:
    """One learner on the same global batches (``by_label``: each sorted by label, as the
    worker's ``--by-label``; ``close``: then it ends the open experience, as ``--close``,
    keeping its strategy's state from before in ``open_state``; it publishes after step
    PUBLISH as the worker's ``--publish-after``, the rectifier in ``published``)."""
    torch.set_num_threads(1)
    train, _ = digits()
    s = split_stream(train, classes_per_exp=2, seed=0)
    x, y = torch.from_numpy(s.x), torch.from_numpy(s.y).long()
    if by_label:
        order = torch.cat([k + torch.sort(y[k:k + BATCH], stable=True).indices
                           for k in range(0, len(y), BATCH)])
        x, y = x[order], y[order]
    trainer = OnlineTrainer(config)
    for k in range(STEPS):
        trainer.step(x[k * BATCH:(k + 1) * BATCH], y[k * BATCH:(k + 1) * BATCH])
        if k == PUBLISH:
            trainer.published = {  # type: ignore[attr-defined]
                k.removeprefix("rectifier."): v.tolist()
                for k, v in export_model(trainer)[0].items() if k.startswith("rectifier.")}
    if close:
        trainer.open_state = trainer.strategy.extra_state()  # type: ignore[attr-defined]
        trainer.strategy.on_experience_end()
    return trainer


@pytest.mark.parametrize("skew", [False, True], ids=["even", "empty-batches"])
def test_two_replicas_of_naive_train_the_single_learners_model(tmp_path: Path,
                                                               skew: bool) -> None:
    config = TrainerConfig(input_shape=(64,), hidden=(32,), strategy="naive", lr=0.1, seed=1,
                           boundaries="drift")
    replicas = _replicas(tmp_path, config, *(["--skew"] if skew else []))
    single = _single(config)
    a, b = replicas
    assert a["sha256"] == b["sha256"]
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), name  # bit-identical replicas
    assert a["labels"] == b["labels"] == single.labels
    assert a["boundaries"] == [bd.index for bd in single.boundaries]
    assert a["position"] == single.position == STEPS * BATCH
    assert a["correct"] == single.correct
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(a["params"][name], p.detach(), rtol=1e-4, atol=1e-5)
    assert a["collective_s"] > 0


@pytest.mark.parametrize("strategy", ["er", "der", "der++"])
def test_two_replicas_of_replay_share_the_memory_and_learn_as_one(tmp_path: Path,
                                                                  strategy: str) -> None:
    """Replay: each replica keeps half the memory and replays half the replay batch from it,
    so the two hold mem_size together. Their draws differ from one learner's, so the model is
    not the single learner's; it is one model on both replicas, and it learns as well
    (prequential accuracy within 5 points of the single learner's; for ER, replaying a full
    batch on each replica instead gave 20% against 37%)."""
    config = TrainerConfig(input_shape=(64,), hidden=(32,), strategy=strategy, lr=0.1, seed=1,
                           boundaries="new-class", params={"mem_size": 101, "batch_size_mem": 32})
    a, b = _replicas(tmp_path, config)
    single = _single(config)
    assert a["sha256"] == b["sha256"]
    assert a["labels"] == b["labels"] == single.labels
    assert a["memory"][1] + b["memory"][1] == 101
    assert abs(a["correct"] - single.correct) < 0.05 * STEPS * BATCH


#: the strategies whose state must be global, with memories small enough to fill, evict and
#: replay within the run; MAS keeps its default importance_samples (1,024), more than any
#: experience here, so the replicas' reservoirs hold every sample, as one learner's does
GLOBAL_STATE: dict[str, dict[str, Any]] = {
    "agem": {"mem_size": 101, "sample_size": 32, "patterns_per_experience": 50},
    "mas": {},
    "il2m": {"mem_size": 101, "batch_size_mem": 32},
    "il2m-der": {"mem_size": 101, "batch_size_mem": 32},
    "er-ace": {"mem_size": 101, "batch_size_mem": 32},
}


def _global_config(strategy: str) -> TrainerConfig:
    return TrainerConfig(input_shape=(64,), hidden=(32,), strategy=strategy, lr=0.1, seed=1,
                         boundaries="new-class", params=GLOBAL_STATE[strategy])


#: the launch modes of the GLOBAL_STATE strategies: each global batch sorted by label (each
#: replica's part then lacks classes the step holds: the counts, the mask and the statistics
#: must be global to be one learner's), and replica 1 bringing empty batches every third step
#: (its collectives must still match replica 0's)
MODES = {"label-sorted-parts": ("--by-label",), "empty-batches": ("--skew",)}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def global_runs(mode: str, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, list[dict[str, Any]]]:
    """Both replicas of every GLOBAL_STATE strategy, from one launch per mode; each run ends
    with the open experience closed on every replica (the boundary's reductions, in lockstep,
    on the final model)."""
    names = list(GLOBAL_STATE)
    runs = _launch(tmp_path_factory.mktemp("global"), [_global_config(n) for n in names],
                   "--close", "--publish-after", str(PUBLISH), *MODES[mode])
    return dict(zip(names, runs, strict=True))


@functools.cache
def _global_single(strategy: str, mode: str) -> OnlineTrainer:
    """One learner per GLOBAL_STATE strategy and mode's batches, trained once (and closed, as
    the replicas)."""
    return _single(_global_config(strategy), close=True, by_label=mode == "label-sorted-parts")


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical model (parameters and buffers: IL2M's rectifier) and global strategy
    state on both replicas."""
    assert a["sha256"] == b["sha256"]
    assert a["params"].keys() == b["params"].keys()
    for name, t in a["params"].items():
        assert torch.equal(t, b["params"][name]), name
    shared = {k for k in a["state"] if not k.startswith("shard.")}
    assert shared == {k for k in b["state"] if not k.startswith("shard.")}
    for name in shared:
        assert torch.equal(a["state"][name], b["state"][name]), name
    assert a["strategy"] == b["strategy"]


@pytest.mark.parametrize("strategy", list(GLOBAL_STATE))
def test_replicas_of_a_strategy_with_global_state_stay_one_learner(
        global_runs: dict[str, list[dict[str, Any]]], mode: str, strategy: str) -> None:
    """Each replica holds its shard of the memory (their capacities add up to mem_size) and
    the strategy's global state is reduced (A-GEM's spare row and reference gradient, MAS's
    importance and anchor, IL2M's counts and rectifier, ER-ACE's mask): the replicas end
    bit-identical, model and state, when their parts lack classes of the step and when one
    brings empty batches (a collective it skipped would hang its peer), and learn as one
    learner does (their draws from the memory differ: prequential accuracy within 5 points)."""
    a, b = global_runs[strategy]
    single = _global_single(strategy, mode)
    _assert_identical(a, b)
    assert a["labels"] == b["labels"] == single.labels
    assert a["boundaries"] == [bd.index for bd in single.boundaries]
    if "mem_size" in GLOBAL_STATE[strategy]:
        assert a["memory"][1] + b["memory"][1] == GLOBAL_STATE[strategy]["mem_size"]
    assert abs(a["correct"] - single.correct) < 0.05 * STEPS * BATCH


def test_mas_replicas_measure_the_single_learners_importance(
        global_runs: dict[str, list[dict[str, Any]]], mode: str) -> None:
    """Every experience is shorter than importance_samples, so the replicas' reservoirs hold
    all its samples between them, and MAS has no other draw: the reduced importance, the
    anchor and the model are the single learner's, to float tolerance (sums in another
    order), however the step's samples are split."""
    a, _ = global_runs["mas"]
    single = _global_single("mas", mode)
    strategy = single.strategy
    assert strategy.importance and len(single.boundaries) >= 3  # importance was in play
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(a["state"][f"importance.{name}"], strategy.importance[name],
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a["state"][f"anchor.{name}"], strategy.anchor[name],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["params"][name], p.detach(), rtol=1e-4, atol=1e-5)
    assert a["correct"] == single.correct


@pytest.mark.parametrize("strategy", ["il2m", "il2m-der"])
def test_il2m_statistics_are_one_learners_on_the_shards_together(
        global_runs: dict[str, list[dict[str, Any]]], mode: str, strategy: str) -> None:
    """The counts are global (the single learner's exactly, so classes are registered to the
    same experiences, by the publication that replica 0 made alone too), and the statistics
    registered at the last boundary are the means over both replicas' memory rows, measured
    with the final model: recomputed here from the two shards together, as one learner
    measures its memory."""
    a, b = global_runs[strategy]
    single = _global_single(strategy, mode)
    for key in ("counts", "first_step", "steps"):  # before the last boundary, and after it
        assert a["strategy_open"][key] == single.open_state[key], key
        assert a["strategy"][key] == single.strategy.extra_state()[key], key
    assert sum(a["strategy_open"]["counts"].values()) == STEPS * BATCH - a["boundaries"][-1]
    # the publication's provisional statistics: made by replica 0 alone (its shard's scores),
    # for the classes one learner would register; replica 0's live rectifier is back as it
    # was (the replicas are identical at the end)
    assert b["published"] is None
    for key in ("class_exp", "last_exp"):
        assert a["published"][key] == single.published[key], key
    rect = {k.removeprefix("rectifier."): v for k, v in a["params"].items()
            if k.startswith("rectifier.")}
    assert torch.equal(rect["class_exp"], single.model.rectifier.class_exp)

    n = len(a["labels"])
    model = build_model("mlp", (64,), (32,), torch.Generator())
    model.grow(n, torch.Generator())
    model.load_state_dict({k: v for k, v in a["params"].items()
                           if not k.startswith("rectifier.")})
    model.eval()
    x = torch.cat([a["state"]["shard.x"], b["state"]["shard.x"]])
    y = torch.cat([a["state"]["shard.y"], b["state"]["shard.y"]])
    with torch.no_grad():
        scores = torch.softmax(model(x), dim=1)
    last = int(rect["last_exp"])
    assert last == len(single.boundaries)  # the closed open experience registered
    class_exp = rect["class_exp"].tolist()
    new = [c for c in range(n) if class_exp[c] == last]
    old = [c for c in range(n) if 0 <= class_exp[c] < last]
    assert new and old
    for c in new + old:
        expected = float(scores[y == c, c].mean())
        got = rect["init_mean" if c in new else "current_mean"][c]
        assert math.isclose(float(got), expected, rel_tol=1e-5), c
    in_new = torch.isin(y, torch.tensor(new))
    assert math.isclose(float(rect["confidence"][last]),
                        float(scores[in_new].max(1).values.mean()), rel_tol=1e-5)


def test_a_strategy_that_cannot_run_data_parallel_is_refused() -> None:
    """RAR: its look-ahead needs the global gradient in mid-step, its adversarial targets the
    global batch's features (see streamcl/strategies/rar.py)."""
    config = TrainerConfig(input_shape=(4,), hidden=(8,), strategy="rar")
    with pytest.raises(ValueError, match="does not run data-parallel yet"):
        OnlineTrainer(config, group=ReplicaGroup(0, 2))


def test_partitions_are_split_by_rank() -> None:
    owned = [ReplicaGroup(r, 3).partitions(8) for r in range(3)]
    assert owned == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert ReplicaGroup(3, 4).partitions(2) == []  # a replica may read nothing
