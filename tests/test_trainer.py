"""The online trainer: prequential predictions, head growth, determinism, resume, boundaries."""

from __future__ import annotations

import copy
import json
import math
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamcl.data import Stream, digits, split_stream
from streamcl.drift.boundaries import Boundary, BoundaryPolicy
from streamcl.simulate import simulate
from streamcl.state import load_state, save_state, state_sha256
from streamcl.strategies import STRATEGIES
from streamcl.trainer import OnlineTrainer, TrainerConfig, replace_parameter

ALL = sorted(STRATEGIES)
WORKER = Path(__file__).with_name("resume_worker.py")


def run(trainer: OnlineTrainer, stream: Stream, start: int = 0, stop: int | None = None,
        batch_size: int = 32) -> OnlineTrainer:
    stop = len(stream) if stop is None else stop
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        trainer.step(torch.from_numpy(stream.x[s:e]), torch.from_numpy(stream.y[s:e]))
    return trainer


def config(strategy: str = "naive", **kwargs) -> TrainerConfig:
    kwargs.setdefault("hidden", (32,))
    kwargs.setdefault("input_shape", (64,))
    return TrainerConfig(strategy=strategy, **kwargs)


@pytest.fixture(scope="module")
def short_stream(split_digits_once: Stream) -> Stream:
    """The first three experiences of one-pass split digits (~800 samples, 6 classes)."""
    stop = int((split_digits_once.task == 3).argmax())
    s = split_digits_once
    return Stream(s.x[:stop], s.y[:stop], s.task[:stop])


# == prequential ================================================================================
@pytest.mark.parametrize("name", ALL)
def test_step_predictions_are_made_before_the_update(name: str, short_stream: Stream) -> None:
    trainer = OnlineTrainer(config(name, boundaries="new-class"))
    twin = OnlineTrainer(config(name, boundaries="new-class"))  # never asked to predict
    changed = 0
    for s in range(0, len(short_stream), 32):
        x = torch.from_numpy(short_stream.x[s:s + 32])
        y = torch.from_numpy(short_stream.y[s:s + 32])
        plan = trainer.plan(y)
        if plan.boundary is not None:  # an experience closes before the batch (IL2M then
            trainer.end_experience(plan.boundary)  # updates its rectifier): predict after that
        before = trainer.predict(x)
        r = trainer.learn(x, y, plan)
        twin.step(x, y)
        assert torch.equal(r.predictions, before)
        assert r.correct == int((before == y).sum())
        changed += int(not torch.equal(trainer.predict(x), before))
    assert changed > 0, "training never changed a prediction: the check would be vacuous"
    # predicting has no side effect on the trainer's state
    assert state_sha256(trainer.state_dict()) == state_sha256(twin.state_dict())
    assert trainer.prequential_accuracy == pytest.approx(trainer.correct / len(short_stream))


def test_first_predictions_are_minus_one_and_labels_are_arbitrary_ints() -> None:
    trainer = OnlineTrainer(config(input_shape=(2,), hidden=(16,), boundaries="new-class",
                                   lr=0.5))
    assert trainer.predict(torch.zeros(3, 2)).tolist() == [-1, -1, -1]
    gen = torch.Generator().manual_seed(0)
    centers = {1000: torch.tensor([3.0, 0.0]), 7: torch.tensor([-3.0, 0.0]),
               123456: torch.tensor([0.0, 3.0])}
    labels = list(centers)
    r = None
    for i in range(60):
        y = torch.tensor([labels[(i + j) % (1 + min(i // 5, 2))] for j in range(8)])
        x = torch.stack([centers[int(v)] for v in y]) + 0.3 * torch.randn(8, 2, generator=gen)
        r = trainer.step(x, y)
        if i == 0:
            assert r.predictions.tolist() == [-1] * 8
    assert trainer.labels == labels  # in order of first appearance
    assert trainer.model.n_classes == 3
    assert set(r.predictions.tolist()) <= set(labels)
    test_x = torch.stack(list(centers.values()))
    assert trainer.predict(test_x).tolist() == labels


def test_predict_on_no_rows_returns_no_predictions() -> None:
    trainer = OnlineTrainer(config(input_shape=(3,), hidden=(4,)))
    assert trainer.predict(torch.zeros(0, 3)).shape == (0,)
    trainer.step(torch.zeros(2, 3), torch.tensor([5, 6]))
    assert trainer.predict(torch.zeros(0, 3)).shape == (0,)


# == head growth ================================================================================
def _head_step_reference(trainer: OnlineTrainer, x: torch.Tensor, y: torch.Tensor):
    """The model as it will be right after growth (same generator draw), and its gradients."""
    model = copy.deepcopy(trainer.model)
    gen = torch.Generator()
    gen.set_state(trainer.generator.get_state())
    new = [v for v in dict.fromkeys(y.tolist()) if v not in trainer.index]
    index = {**trainer.index, **{v: len(trainer.labels) + i for i, v in enumerate(new)}}
    model.grow(len(new), gen)
    yi = torch.tensor([index[v] for v in y.tolist()])
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), yi).backward()
    return model


def _warm_up(trainer: OnlineTrainer) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        trainer.step(torch.randn(16, 10, generator=gen),
                     torch.tensor([1000, 7] * 8)[torch.randperm(16, generator=gen)])
    x = torch.randn(16, 10, generator=gen)
    y = torch.tensor([1000, 7, 55, 7] * 4)
    return x, y, gen


def test_head_growth_adds_one_row_and_keeps_old_rows_exactly() -> None:
    # lr = 0: the step itself moves nothing, so any change would come from the growth
    trainer = OnlineTrainer(config(input_shape=(10,), hidden=(12,), boundaries="task"),
                            optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.0))
    x, y, _ = _warm_up(trainer)
    w_old = trainer.model.head.weight.detach().clone()
    b_old = trainer.model.head.bias.detach().clone()
    body_old = [p.detach().clone() for p in trainer.model.body.parameters()]
    plan = trainer.plan(y)
    assert plan.new_labels == (55,)
    trainer.learn(x, y, plan)
    head = trainer.model.head
    assert head.weight.shape == (3, 12) and head.bias.shape == (3,)
    assert torch.equal(head.weight[:2].detach(), w_old)
    assert torch.equal(head.bias[:2].detach(), b_old)
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.body.parameters(), body_old,
                                                   strict=True))
    bound = 1 / math.sqrt(12)
    assert float(head.weight[2].detach().abs().max()) <= bound  # nn.Linear's default initialisation
    assert trainer.labels == [1000, 7, 55]


def _assert_optimizer_points_at_model(trainer: OnlineTrainer) -> None:
    params = list(trainer.model.parameters())
    in_opt = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(in_opt) == len(params) and all(p is q for p, q in zip(in_opt, params, strict=True))
    assert all(any(k is p for p in params) for k in trainer.optimizer.state)


def test_head_growth_keeps_sgd_momentum_of_old_rows() -> None:
    lr, mom = 0.05, 0.9
    trainer = OnlineTrainer(config(input_shape=(10,), hidden=(12,), boundaries="task"),
                            optimizer_factory=lambda p: torch.optim.SGD(p, lr=lr, momentum=mom))
    x, y, _ = _warm_up(trainer)
    old = {n: (p.detach().clone(), trainer.optimizer.state[p]["momentum_buffer"].clone())
           for n, p in trainer.model.named_parameters()}
    ref = _head_step_reference(trainer, x, y)
    trainer.step(x, y)
    _assert_optimizer_points_at_model(trainer)
    refs = dict(ref.named_parameters())
    for n, p in trainer.model.named_parameters():
        w0, buf0 = old[n]
        buf0 = torch.cat([buf0, buf0.new_zeros((p.shape[0] - buf0.shape[0], *buf0.shape[1:]))])
        expected_buf = mom * buf0 + refs[n].grad  # new rows: zero momentum
        buf = trainer.optimizer.state[p]["momentum_buffer"]
        torch.testing.assert_close(buf, expected_buf)
        start = refs[n].detach()  # old rows: the weights before; new rows: their fresh init
        assert torch.equal(start[: w0.shape[0]], w0)
        torch.testing.assert_close(p.detach(), start - lr * expected_buf)
    assert trainer.model.head.weight.shape[0] == 3
    # a reset momentum would give buf == grad on the old rows; make sure that differs
    assert not torch.allclose(refs["head.weight"].grad[:2],
                              trainer.optimizer.state[trainer.model.head.weight]
                              ["momentum_buffer"][:2])


def test_head_growth_keeps_adam_moments_of_old_rows() -> None:
    lr, (b1, b2), eps = 0.01, (0.9, 0.999), 1e-8
    trainer = OnlineTrainer(config(input_shape=(10,), hidden=(12,), boundaries="task"),
                            optimizer_factory=lambda p: torch.optim.Adam(p, lr=lr))
    x, y, _ = _warm_up(trainer)
    opt = trainer.optimizer
    old = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
           for n, p in trainer.model.named_parameters()}
    ref = _head_step_reference(trainer, x, y)
    trainer.step(x, y)
    _assert_optimizer_points_at_model(trainer)
    refs = dict(ref.named_parameters())
    for n, p in trainer.model.named_parameters():
        _, st0 = old[n]
        g = refs[n].grad
        pad = p.shape[0] - st0["exp_avg"].shape[0]
        m0 = torch.cat([st0["exp_avg"], st0["exp_avg"].new_zeros((pad, *p.shape[1:]))])
        v0 = torch.cat([st0["exp_avg_sq"], st0["exp_avg_sq"].new_zeros((pad, *p.shape[1:]))])
        st = opt.state[p]
        step = float(st["step"])
        assert step == float(st0["step"]) + 1 == 6
        m, v = b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g
        torch.testing.assert_close(st["exp_avg"], m)
        torch.testing.assert_close(st["exp_avg_sq"], v)
        update = lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), refs[n].detach() - update)


def test_replace_parameter_pads_row_state_and_keeps_scalars() -> None:
    old = torch.nn.Parameter(torch.ones(2, 3))
    other = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([other, old], lr=0.1)
    (old.sum() * 2 + other.sum()).backward()
    opt.step()
    state = {k: v.clone() for k, v in opt.state[old].items()}
    new = torch.nn.Parameter(torch.zeros(5, 3))
    replace_parameter(opt, old, new)
    assert opt.param_groups[0]["params"][0] is other and opt.param_groups[0]["params"][1] is new
    assert old not in opt.state
    assert torch.equal(opt.state[new]["exp_avg"][:2], state["exp_avg"])
    assert torch.equal(opt.state[new]["exp_avg"][2:], torch.zeros(3, 3))
    assert torch.equal(opt.state[new]["step"], state["step"])


# == determinism ================================================================================
@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_batches_give_bit_identical_state(name: str, short_stream: Stream) -> None:
    hashes = [state_sha256(run(OnlineTrainer(config(name, boundaries="drift,new-class",
                                                    seed=seed)), short_stream).state_dict())
              for seed in (0, 0, 1)]
    assert hashes[0] == hashes[1]
    assert hashes[0] != hashes[2]


# == save, load in a fresh process, continue =====================================================
RESUME_BOUNDARIES = "drift,new-class"


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory, digits_data) -> dict:
    """For every strategy: an uninterrupted run, and a run saved half-way and finished by a
    fresh Python process (one process resumes all eight)."""
    tmp = tmp_path_factory.mktemp("resume")
    stream = split_stream(digits_data[0], passes=1, seed=4)
    stream.save(tmp / "stream.npz")
    half = 32 * 21  # 21 of 43 batches
    states = tmp / "states"
    states.mkdir()
    full, saved = {}, {}
    for name in ALL:
        cfg = config(name, boundaries=RESUME_BOUNDARIES)
        full[name] = run(OnlineTrainer(cfg), stream)
        first = run(OnlineTrainer(cfg), stream, stop=half)
        save_state(first.state_dict(), states / f"{name}.safetensors")
        saved[name] = first
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp / "stream.npz"), str(states), str(half), "32",
         str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return {"full": full, "saved": saved, "resumed": json.loads(proc.stdout), "half": half}


@pytest.mark.parametrize("name", ALL)
def test_resume_in_a_fresh_process_is_bit_identical(name: str, resume_case: dict) -> None:
    full: OnlineTrainer = resume_case["full"][name]
    saved: OnlineTrainer = resume_case["saved"][name]
    resumed = resume_case["resumed"][name]
    assert resumed["loaded"] == state_sha256(saved.state_dict())
    assert resumed["final"] == state_sha256(full.state_dict())
    # boundaries on both sides of the cut, so experience bookkeeping crossed it
    assert any(b.index < resume_case["half"] for b in full.boundaries)
    assert any(b["index"] >= resume_case["half"] for b in resumed["boundaries"])
    assert resumed["boundaries"] == [b.to_json() for b in full.boundaries]
    assert saved.policy.detector is not None and saved.policy.detector.width > 0


def test_resume_in_process_continues_identically(short_stream: Stream, tmp_path: Path) -> None:
    cfg = config("der++", boundaries=RESUME_BOUNDARIES)
    full = run(OnlineTrainer(cfg), short_stream)
    first = run(OnlineTrainer(cfg), short_stream, stop=320)
    save_state(first.state_dict(), tmp_path / "s.safetensors")
    resumed = OnlineTrainer.from_state(load_state(tmp_path / "s.safetensors"))
    run(resumed, short_stream, start=320)
    assert state_sha256(resumed.state_dict()) == state_sha256(full.state_dict())
    x = torch.from_numpy(short_stream.x)
    assert torch.equal(resumed.predict(x), full.predict(x))


@pytest.mark.parametrize("name", ["rar", "il2m"])
def test_load_state_dict_restores_every_random_generator(name: str, short_stream: Stream) -> None:
    cfg = config(name, boundaries="new-class")
    trainer = run(OnlineTrainer(cfg), short_stream, stop=320)
    state = trainer.state_dict()
    other = run(OnlineTrainer(cfg), short_stream, stop=64)  # same labels so far, other draws
    other.generator.manual_seed(99)
    other.strategy.generator.manual_seed(98)
    other.load_state_dict(state)
    assert state_sha256(other.state_dict()) == state_sha256(state)
    run(trainer, short_stream, start=320)
    run(other, short_stream, start=320)
    assert state_sha256(other.state_dict()) == state_sha256(trainer.state_dict())


def test_state_from_another_configuration_is_refused(short_stream: Stream) -> None:
    state = run(OnlineTrainer(config("er")), short_stream, stop=64).state_dict()
    with pytest.raises(ValueError, match="different configuration"):
        OnlineTrainer(config("er", lr=0.1)).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        OnlineTrainer(config("er")).load_state_dict({**state, "format": 99})


def test_plan_for_another_position_is_refused() -> None:
    trainer = OnlineTrainer(config(input_shape=(3,), hidden=(4,)))
    plan = trainer.plan(torch.tensor([0, 1]))
    trainer.learn(torch.zeros(2, 3), torch.tensor([0, 1]), plan)
    with pytest.raises(ValueError, match="position"):
        trainer.learn(torch.zeros(2, 3), torch.tensor([0, 1]), plan)


# == pickle-free state files =====================================================================
def test_state_file_is_plain_safetensors_and_loads_without_unpickling(
        short_stream: Stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = run(OnlineTrainer(config("il2m", boundaries="new-class", momentum=0.9)),
                  short_stream, stop=320)
    path = tmp_path / "state.safetensors"
    save_state(trainer.state_dict(), path)
    raw = path.read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor torch.save's zip
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    assert set(meta) == {"streamcl.state"}
    json.loads(meta["streamcl.state"])  # the skeleton is JSON too
    ends = sorted(entry["data_offsets"][1] for entry in header.values())
    assert header and all({"dtype", "shape", "data_offsets"} <= set(e) for e in header.values())
    assert 8 + n + ends[-1] == len(raw)  # header and tensor bytes cover the whole file

    def refuse(*_a, **_k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    restored = OnlineTrainer.from_state(load_state(path))
    assert state_sha256(restored.state_dict()) == state_sha256(trainer.state_dict())


# == boundaries =================================================================================
def _labels_stream(y: list[int], task: list[int] | None = None, dim: int = 4,
                   seed: int = 0) -> Stream:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(y), dim)).astype(np.float32)
    return Stream(x, np.array(y, dtype=np.int64),
                  None if task is None else np.array(task, dtype=np.int64))


def test_every_n_fires_at_exact_sample_counts() -> None:
    stream = _labels_stream([0, 1] * 250)  # 500 samples
    for every, batch, expected in (
            (96, 32, [96, 192, 288, 384, 480]),
            (100, 32, [128, 256, 384]),  # the first batch start at least N samples in
            (50, 25, [50, 100, 150, 200, 250, 300, 350, 400, 450])):
        trainer = OnlineTrainer(config(input_shape=(4,), hidden=(4,),
                                       boundaries=f"every:{every}"))
        run(trainer, stream, batch_size=batch)
        assert [b.index for b in trainer.boundaries] == expected
        assert [b.trigger for b in trainer.boundaries] == ["every"] * len(expected)
        assert [b.experience for b in trainer.boundaries] == list(range(1, len(expected) + 1))
        assert all(b.statistic is None for b in trainer.boundaries)


def test_task_trigger_fires_exactly_at_task_switches_even_mid_batch() -> None:
    task = [0] * 70 + [1] * 45 + [2] * 100 + [0] * 33
    stream = _labels_stream([t * 2 + (i % 2) for i, t in enumerate(task)], task)
    trainer = OnlineTrainer(config(input_shape=(4,), hidden=(4,), boundaries="task"))
    result = simulate(stream, trainer, batch_size=32)  # cuts batches at task changes
    switches = [70, 115, 215]
    assert result["true_switches"] == switches
    assert [b["index"] for b in result["boundaries"]] == switches
    assert {b["trigger"] for b in result["boundaries"]} == {"task"}
    # driven step by step with the task value, the decision is the same
    trainer = OnlineTrainer(config(input_shape=(4,), hidden=(4,), boundaries="task"))
    for s, e in [(0, 70), (70, 115), (115, 147), (147, 215), (215, 248)]:
        trainer.step(torch.from_numpy(stream.x[s:e]), torch.from_numpy(stream.y[s:e]),
                     torch.from_numpy(stream.task[s:e]))
    assert [b.index for b in trainer.boundaries] == switches


def test_new_class_fires_at_the_first_batch_holding_a_new_label() -> None:
    y = [0, 1] * 50 + [2] + [0, 1, 2] * 33 + [3, 4] * 50  # new: 2 at 100, 3 at 200, 4 at 201
    stream = _labels_stream(y)
    trainer = OnlineTrainer(config(input_shape=(4,), hidden=(4,), boundaries="new-class"))
    plans = []
    for s in range(0, len(stream), 32):
        x, yy = torch.from_numpy(stream.x[s:s + 32]), torch.from_numpy(stream.y[s:s + 32])
        plan = trainer.plan(yy)
        plans.append(plan)
        if plan.boundary:
            trainer.end_experience(plan.boundary)
        trainer.learn(x, yy, plan)
    # position 0 brings labels 0 and 1 but opens no experience (nothing has ended)
    assert plans[0].new_labels == (0, 1) and plans[0].boundary is None
    assert [b.index for b in trainer.boundaries] == [96, 192]  # batches holding 100 and 200
    assert [p.new_labels for p in plans if p.new_labels] == [(0, 1), (2,), (3, 4)]
    assert all(b.trigger == "new-class" and b.statistic is None for b in trainer.boundaries)


def _remapped_digits(seed: int, n_exp: int = 4, per: int = 1280) -> Stream:
    """Digits whose labels are re-assigned (a derangement) at every switch: same inputs, so the
    trained model's error jumps at each switch point (multiples of ``per``)."""
    train, _ = digits()
    rng = np.random.default_rng(seed)
    xs, ys, tasks, perm = [], [], [], np.arange(10)
    for t in range(n_exp):
        idx = rng.choice(len(train.y), per, replace=False)
        if t:
            while True:
                q = rng.permutation(10)
                if (q != np.arange(10)).all():
                    break
            perm = q[perm]
        xs.append(train.x[idx])
        ys.append(perm[train.y[idx]])
        tasks.append(np.full(per, t))
    return Stream(np.concatenate(xs), np.concatenate(ys), np.concatenate(tasks))


@pytest.mark.parametrize("seed", [0, 1])
def test_drift_trigger_fires_shortly_after_each_true_switch(seed: int) -> None:
    stream = _remapped_digits(seed)
    trainer = OnlineTrainer(config(hidden=(64,), boundaries="drift", lr=0.3, seed=seed))
    result = simulate(stream, trainer, batch_size=32)
    switches = result["true_switches"]
    assert switches == [1280, 2560, 3840]
    found = [b["index"] for b in result["boundaries"]]
    matched = set()
    for sw in switches:
        # the decision for the switch batch itself is made before it is seen: 1 batch at best
        near = [f for f in found if 32 <= f - sw <= 3 * 32]
        assert near, f"no boundary within 3 batches after the switch at {sw}: {found}"
        matched.add(near[0])
    assert len(set(found) - matched) <= 1
    for b in trainer.boundaries:
        assert b.trigger == "drift"
        assert b.statistic is not None and 0 < b.statistic <= 1  # an error-rate gap
    assert [b.experience for b in trainer.boundaries] == list(range(1, len(found) + 1))


def test_min_length_suppresses_inferred_boundaries_only() -> None:
    y = [0, 1] * 50 + [2] + [0, 1, 2] * 33 + [3, 4] * 50  # new labels at 100 and 200
    stream = _labels_stream(y)
    t = OnlineTrainer(config(input_shape=(4,), hidden=(4,), boundaries="new-class",
                             min_length=128))
    run(t, stream)
    assert [b.index for b in t.boundaries] == [192]  # 96 was only 96 samples in
    t = OnlineTrainer(config(input_shape=(4,), hidden=(4,), boundaries="new-class,every:64",
                             min_length=1000))
    run(t, stream)
    assert {b.trigger for b in t.boundaries} == {"every"}  # schedules ignore min_length
    assert [b.index for b in t.boundaries] == list(range(64, len(stream), 64))


def test_min_length_drops_a_drift_flagged_too_early() -> None:
    policy = BoundaryPolicy.from_spec("drift", min_length=100, detector_params={"clock": 1})
    position, flagged = 0, []
    for _ in range(10):  # errors jump from 0 to 1 early in the experience
        assert policy.decide(position, batch_size=10, new_labels=False, task=None) is None
        policy.observe(position, [0.0] * 10 if position < 50 else [1.0] * 10)
        if policy.pending is not None:
            flagged.append(position)
        position += 10
    assert flagged and flagged[0] < 90  # ADWIN saw the jump, and it was dropped
    assert policy.experience == 0
    # the same errors with no minimum length open an experience right after the flag
    policy = BoundaryPolicy.from_spec("drift", detector_params={"clock": 1})
    opened = []
    for position in range(0, 100, 10):
        b = policy.decide(position, batch_size=10, new_labels=False, task=None)
        if b is not None:
            opened.append((b.index, b.trigger))
        policy.observe(position, [0.0] * 10 if position < 50 else [1.0] * 10)
    assert opened and opened[0] == (flagged[0] + 10, "drift")


def test_cooldown_keeps_the_detector_unfed_after_a_boundary() -> None:
    policy = BoundaryPolicy.from_spec("drift,task", cooldown=64)
    det = policy.detector
    assert det is not None
    policy.decide(0, batch_size=32, new_labels=False, task=0)
    policy.observe(0, [1.0] * 32)
    policy.observe(32, [1.0] * 32)
    assert det.width == 0  # the stream's start counts as a boundary too
    policy.observe(64, [0.0] * 32)
    assert det.width == 32
    boundary = policy.decide(96, batch_size=32, new_labels=False, task=1)
    assert boundary == Boundary(96, "task", 1, None)
    assert det.width == 0  # reset at the boundary
    policy.observe(96, [1.0] * 32)
    policy.observe(128, [1.0] * 32)
    assert det.width == 0
    policy.observe(160, [1.0] * 32)
    assert det.width == 32


def test_boundary_events_carry_their_facts(short_stream: Stream) -> None:
    trainer = run(OnlineTrainer(config(boundaries="new-class")), short_stream)
    seen, expected = set(), []
    for s in range(0, len(short_stream), 32):
        labels = set(short_stream.y[s:s + 32].tolist())
        if s and labels - seen:
            expected.append(s)
        seen |= labels
    assert len(expected) >= 2
    assert [b.index for b in trainer.boundaries] == expected
    for k, b in enumerate(trainer.boundaries, start=1):
        assert set(b.to_json()) == {"index", "trigger", "experience", "statistic"}
        assert b.experience == k and b.trigger == "new-class" and b.statistic is None
    for k in (1, 2):  # each experience's first sample lies in a batch that opened a boundary
        first = int(np.flatnonzero(short_stream.task == k)[0])
        assert first // 32 * 32 in expected
    assert trainer.strategy.experience == len(trainer.boundaries)


# -- the label cap (issue 12) ---------------------------------------------------------------------

def _batch(labels: list[int], ids: list[str | None] | None = None):
    from streamcl.stream.consumer import MicroBatch

    n = len(labels)
    return MicroBatch(torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) / 10,
                      torch.tensor(labels), None, {0: (100, 100 + n - 1)}, 0, None,
                      ids if ids is not None else [f"s{i}" for i in range(n)])


def test_max_classes_is_validated_and_stays_out_of_default_configs() -> None:
    with pytest.raises(ValueError, match="max_classes"):
        config(max_classes=0)
    default = config().to_json()
    assert "max_classes" not in default  # states and journals from before it hash the same
    assert TrainerConfig.from_json(default).max_classes == TrainerConfig(input_shape=(1,)
                                                                         ).max_classes
    capped = config(max_classes=7)
    assert capped.to_json()["max_classes"] == 7
    assert TrainerConfig.from_json(capped.to_json()) == capped


def test_prepare_refuses_labels_past_max_classes_and_replays_the_same() -> None:
    from streamcl.learner import Learner, Refused
    from streamcl.stream.entries import HoldoutSpec

    cfg = config(input_shape=(4,), hidden=(8,), max_classes=2)
    holdout = HoldoutSpec(fraction=0.0, size=10, seed=0)
    batch = _batch([5, 9, 5, 3, 9, 3, 7])
    live = Learner.fresh(cfg, holdout)
    step = live.prepare(batch)
    assert step.refused == [Refused(3, 3, "s3"), Refused(5, 3, "s5"), Refused(6, 7, "s6")]
    assert step.train.y.tolist() == [5, 9, 5, 9] and step.train.ids == ["s0", "s1", "s2", "s4"]
    assert step.plan is not None and step.plan.size == 4 and step.plan.new_labels == (5, 9)
    entry = step.entry()
    assert entry.samples == len(batch)  # the batch as consumed: ranges and counts unchanged
    live.apply(step, entry)
    assert live.trainer.model.n_classes == 2 and live.trainer.labels == [5, 9]
    # a full head: every new label is refused, known ones train
    step = live.prepare(_batch([3, 5, 8]))
    assert [r.label for r in step.refused] == [3, 8] and step.train.y.tolist() == [5]
    live.apply(step, step.entry())
    assert live.trainer.model.n_classes == 2
    # a batch of refused labels only: nothing to plan
    step = live.prepare(_batch([4, 4]))
    assert step.plan is None and len(step.refused) == 2
    live.apply(step, step.entry())
    # replay from a fresh learner refuses the same samples and reaches the same state
    again = Learner.fresh(cfg, holdout)
    for labels in ([5, 9, 5, 3, 9, 3, 7], [3, 5, 8], [4, 4]):
        s = again.prepare(_batch(labels))
        again.apply(s, s.entry())
    assert again.sha256() == live.sha256()


def test_refused_samples_skip_the_holdout() -> None:
    from streamcl.learner import Learner
    from streamcl.stream.entries import HoldoutSpec

    cfg = config(input_shape=(4,), hidden=(8,), max_classes=1)
    learner = Learner.fresh(cfg, HoldoutSpec(fraction=0.5, size=100, seed=1))
    for _ in range(5):
        step = learner.prepare(_batch([1, 2, 1, 2, 1, 2, 1, 2]))
        assert [r.label for r in step.refused] == [2] * 4
        learner.apply(step, step.entry())
    assert learner.holdout is not None and len(learner.holdout)
    assert set(learner.holdout.buffer.all()["y"].tolist()) == {1}
    assert learner.holdout.seen == 5 * 4  # refused samples do not advance the stream index
    assert learner.trainer.labels == [1]


def test_plan_refuses_to_grow_the_head_past_max_classes() -> None:
    trainer = OnlineTrainer(config(input_shape=(4,), hidden=(8,), max_classes=2))
    trainer.step(torch.zeros(2, 4), torch.tensor([0, 1]))
    assert trainer.over_cap(torch.tensor([1, 0])) is None
    assert trainer.over_cap(torch.tensor([1, 2, 0, 2])).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="max_classes=2"):
        trainer.plan(torch.tensor([2]))
