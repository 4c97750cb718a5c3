"""Each strategy's defining property, checked on real models and real data.

A-GEM projects conflicting gradients; DER stores pre-update logits and pads them when the head
grows; MAS measures non-negative importance and pulls weights back to the anchor; IL2M rectifies
old-class scores only when a new class wins; RAR attacks inside an L-inf ball towards the nearest
other-class sample; the replay memories keep the samples they promise to keep.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from streamcl.models import build_model
from streamcl.strategies import STRATEGIES, make_strategy
from streamcl.strategies.agem import AGEM, project
from streamcl.strategies.base import flat_grad
from streamcl.strategies.buffer import BalancedBuffer, ExperienceMemory, ReservoirBuffer
from streamcl.strategies.der import pad_logits
from streamcl.strategies.er_ace import ERACE
from streamcl.strategies.il2m import IL2MRectifier
from streamcl.strategies.mas import MAS
from streamcl.strategies.rar import RAR
from streamcl.trainer import load_module_state


def grad_of(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    for p in params:
        p.grad = None
    loss.backward()
    return flat_grad(params)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def head_index(trainer, y: torch.Tensor) -> torch.Tensor:
    return torch.tensor([trainer.index[v] for v in y.tolist()])


def run_until(trainer, stream, batch_iter, stop: int, start: int = 0) -> None:
    for x, y, task in batch_iter(stream, 32, start, stop):
        trainer.step(x, y, task)


# == A-GEM ======================================================================================
def test_project_removes_the_conflicting_component() -> None:
    gen = torch.Generator().manual_seed(0)
    conflicting = 0
    for _ in range(500):
        g, g_ref = torch.randn(2, 50, generator=gen, dtype=torch.float64)
        if torch.dot(g, g_ref) >= 0:
            continue
        conflicting += 1
        out = project(g, g_ref)
        scale = float(g.norm() * g_ref.norm())
        assert float(torch.dot(out, g_ref)) >= -1e-12 * scale
        # what is removed is along g_ref only: the component orthogonal to g_ref is untouched
        removed = g - out
        cos = torch.dot(removed, g_ref) / (removed.norm() * g_ref.norm())
        assert math.isclose(abs(float(cos)), 1.0, rel_tol=1e-9)
    assert conflicting > 100


def test_project_leaves_agreeing_gradients_exactly_alone() -> None:
    gen = torch.Generator().manual_seed(1)
    agreeing = 0
    for _ in range(200):
        g, g_ref = torch.randn(2, 30, generator=gen)
        if torch.dot(g, g_ref) < 0:
            continue
        agreeing += 1
        assert torch.equal(project(g, g_ref), g)
    g = torch.tensor([1.0, 0.0])
    assert torch.equal(project(g, torch.tensor([0.0, 1.0])), g)  # orthogonal: dot == 0
    assert agreeing > 50


def test_agem_step_applies_the_projected_gradient(split_digits_once, batch_iter,
                                                  trainer_factory) -> None:
    """Reproduce each A-GEM step by hand: the applied update (plain SGD, so ``-lr * grad``) of
    the model and the spare row is ``project(g, g_ref)``, with ``g_ref`` from the same memory
    sample; it never opposes g_ref."""
    stream = split_digits_once
    lr = 0.05
    trainer = trainer_factory("agem", boundaries="task", lr=lr, params={"sample_size": 32})
    switch = int((stream.task == 1).argmax())  # first sample of experience 1
    run_until(trainer, stream, batch_iter, switch)
    strategy: AGEM = trainer.strategy  # type: ignore[assignment]

    def with_spare(model, spare):
        return torch.cat([flat_params(model), spare[0].reshape(-1), spare[1].reshape(-1)])

    def grad_with_spare(model, spare, x, y):
        w, b = (t.clone().requires_grad_(True) for t in spare)
        h = model.features(x)
        logits = torch.cat([model.head(h), (h @ w + b).unsqueeze(1)], dim=1)
        params = [*model.parameters(), w, b]
        for p in params:
            p.grad = None
        F.cross_entropy(logits, y).backward()
        return flat_grad(params)

    reproduced = projected = 0
    for x, y, task in batch_iter(stream, 32, switch, int((stream.task == 2).argmax())):
        before = copy.deepcopy(trainer.model)
        spare = (strategy.spare_weight.clone(), strategy.spare_bias.clone())
        gen_before = strategy.generator.get_state()
        plan = trainer.plan(y, task)
        if plan.boundary is not None or plan.new_labels:  # the switch itself: just learn it
            if plan.boundary is not None:
                trainer.end_experience(plan.boundary)
            trainer.learn(x, y, plan)
            continue
        trainer.learn(x, y, plan)
        after = with_spare(trainer.model, (strategy.spare_weight, strategy.spare_bias))
        update = (with_spare(before, spare) - after) / lr

        gen_after = strategy.generator.get_state()
        strategy.generator.set_state(gen_before)
        mem = strategy.memory.sample(strategy.sample_size)  # the sample the step drew
        strategy.generator.set_state(gen_after)
        g_ref = grad_with_spare(before, spare, mem["x"], mem["y"])
        g = grad_with_spare(before, spare, x.float(), head_index(trainer, y))

        scale = float(g.norm() * g_ref.norm())
        assert float(torch.dot(update, g_ref)) >= -1e-5 * scale
        torch.testing.assert_close(update, project(g, g_ref), rtol=1e-4, atol=1e-6)
        projected += int(torch.dot(g, g_ref) < 0)
        reproduced += 1
    assert len(strategy.memory) > 0 and reproduced >= 5
    assert projected > 0, "no step needed a projection; the test would not show it is applied"


def test_agem_new_rows_start_from_the_spare_row(trainer_factory) -> None:
    """The spare row is trained as a class that never occurs (its logit falls), and a label's
    new row starts as a copy of it."""
    trainer = trainer_factory("agem", input_shape=(4,), hidden=(8,), boundaries="task")
    strategy: AGEM = trainer.strategy  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 4, generator=gen)
    first = float(strategy.logits_with_spare(x)[:, -1].mean().detach())
    for _ in range(30):
        trainer.step(x, torch.zeros(16, dtype=torch.long), 0)
    assert float(strategy.logits_with_spare(x)[:, -1].mean().detach()) < first - 0.5
    spare = (strategy.spare_weight.clone(), strategy.spare_bias.clone())
    plan = trainer.plan(torch.ones(16, dtype=torch.long), 1)
    trainer.end_experience(plan.boundary)
    # learn() grows the head, then trains: read the new row right after growth
    trainer._add_labels(plan.new_labels)
    assert torch.equal(trainer.model.head.weight[1], spare[0])
    assert torch.equal(trainer.model.head.bias[1], spare[1])


def test_agem_memory_stays_bounded_over_hundreds_of_experiences(trainer_factory) -> None:
    """300 experiences (the reference implementation breaks once they outnumber sample_size):
    the memory holds at most mem_size samples, split evenly across all experiences."""
    mem_size, n_exp, batch = 1000, 300, 10
    trainer = trainer_factory("agem", input_shape=(6,), hidden=(8,), boundaries=f"every:{batch}",
                              params={"mem_size": mem_size, "patterns_per_experience": 10,
                                      "sample_size": 64})
    gen = torch.Generator().manual_seed(0)
    for _ in range(n_exp):
        trainer.step(torch.randn(batch, 6, generator=gen),
                     torch.randint(0, 3, (batch,), generator=gen))
    trainer.end_experience(trainer.policy.decide(trainer.position, batch_size=1,
                                                 new_labels=False, task=None))
    memory: BalancedBuffer = trainer.strategy.memory  # type: ignore[attr-defined]
    assert len(trainer.boundaries) == n_exp
    assert len(memory) <= mem_size
    shares = [len(memory.group_rows(e)) for e in range(n_exp)]
    assert sorted(memory.slots) == list(range(n_exp))
    assert max(shares) - min(shares) <= 1
    assert min(shares) >= mem_size // n_exp
    # every stored row belongs to exactly one experience
    rows = sorted(r for e in range(n_exp) for r in memory.group_rows(e).tolist())
    assert rows == list(range(len(memory)))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# == DER / DER++ =================================================================================
@pytest.mark.parametrize("name", ["der", "der++"])
def test_der_stores_the_logits_of_the_pre_update_model(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    model = build_model("mlp", (8,), (16,), gen)
    model.grow(3, gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    strategy = make_strategy(name, model, opt, torch.Generator().manual_seed(1), {})
    x1, y1 = torch.randn(6, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    x2, y2 = torch.randn(5, 8, generator=gen), torch.tensor([2, 2, 1, 0, 0])

    before = copy.deepcopy(model)
    returned = strategy.observe(x1, y1)  # empty buffer
    with torch.no_grad():
        expected = before(x1)
    stored = strategy.memory.current.all()["logits"]
    assert stored.shape == (6, 3)
    torch.testing.assert_close(stored, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(returned, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(x1), expected, atol=1e-3)  # the step did move the model

    before = copy.deepcopy(model)
    strategy.observe(x2, y2)  # non-empty buffer: memory rows share the forward pass
    with torch.no_grad():
        expected = before(x2)
    torch.testing.assert_close(strategy.memory.current.all()["logits"][6:11], expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["der", "der++"])
def test_der_rescores_an_experience_when_it_ends(name: str, trainer_factory) -> None:
    """At a boundary the finished experience's rows get the logits of the model that learned
    it, and join the past; from then on only past rows are replayed."""
    trainer = trainer_factory(name, input_shape=(8,), hidden=(16,), boundaries="task")
    strategy = trainer.strategy
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        trainer.step(torch.randn(8, 8, generator=gen), torch.randint(0, 2, (8,), generator=gen), 0)
    early = strategy.memory.current.all()  # logits of the steps that saw the samples
    x, y = torch.randn(8, 8, generator=gen), torch.randint(2, 4, (8,), generator=gen)
    plan = trainer.plan(y, 1)
    trainer.end_experience(plan.boundary)
    past = strategy.memory.past.all()
    assert len(strategy.memory.current) == 0 and len(strategy.memory.past) == 80
    order = torch.argsort(past["x"][:, 0])
    assert torch.equal(past["x"][order], early["x"][torch.argsort(early["x"][:, 0])])
    with torch.no_grad():
        trainer.model.eval()
        expected = trainer.model(past["x"])
        trainer.model.train()
    torch.testing.assert_close(past["logits"], expected)
    assert not torch.allclose(past["logits"][order],
                              early["logits"][torch.argsort(early["x"][:, 0])], atol=1e-3)
    trainer.learn(x, y, plan)
    assert set(strategy.memory.sample(64)["y"].tolist()) <= {0, 1}


def test_pad_logits_fills_new_columns_with_each_rows_minimum() -> None:
    stored = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 1.0], [0.0, 0.0, 0.0]])
    out = pad_logits(stored, 5)
    assert out.shape == (3, 5)
    assert torch.equal(out[:, :3], stored)
    assert torch.equal(out[:, 3:], torch.tensor([[-1.0, -1.0], [-3.0, -3.0], [0.0, 0.0]]))


@pytest.mark.parametrize("name", ["der", "der++"])
def test_der_pads_stored_logits_when_the_head_grows(name: str, trainer_factory) -> None:
    """When a new label arrives, the open experience's rows are scored by the model as it is
    before the new class trains (a drift detector will close the experience only after that
    batch), and every stored row gets its smallest logit in the new columns."""
    # no boundary: the rows stay in the open experience's reservoir
    trainer = trainer_factory(name, input_shape=(8,), hidden=(16,), boundaries="task")
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        trainer.step(torch.randn(8, 8, generator=gen), torch.randint(0, 2, (8,), generator=gen))
    buffer = trainer.strategy.memory.current  # type: ignore[attr-defined]
    assert buffer.all()["logits"].shape == (32, 2)

    for new_label in (2, 3):  # grow twice; the second growth pads already padded rows
        x_rows = buffer.all()["x"][:32].clone()
        with torch.no_grad():
            trainer.model.eval()
            expected = trainer.model(x_rows)      # the model before the new class trains
            trainer.model.train()
        y = torch.randint(0, new_label, (8,), generator=gen)
        y[3] = new_label
        r = trainer.step(torch.randn(8, 8, generator=gen), y)
        assert math.isfinite(r.loss)
        assert trainer.model.n_classes == new_label + 1
        stored = buffer.all()["logits"][:32]  # capacity 500: the first rows were not replaced
        assert stored.shape[1] == new_label + 1
        torch.testing.assert_close(stored[:, :new_label], expected)
        row_min = expected.min(1, keepdim=True).values
        torch.testing.assert_close(stored[:, new_label:], row_min.expand(-1, 1))
    assert trainer.strategy.grew_last_step  # type: ignore[attr-defined]
    # and training keeps going with replay of padded rows against the grown head
    for _ in range(3):
        r = trainer.step(torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
        assert math.isfinite(r.loss)
    assert not trainer.strategy.grew_last_step  # type: ignore[attr-defined]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_der_keeps_the_scores_taken_before_a_late_detected_switch(trainer_factory) -> None:
    """A drift detector opens the experience one batch after new classes arrive. The finished
    experience's rows then keep the scores taken when the head grew, before that batch
    trained (which hits the old classes hardest), not scores of the model after it."""
    trainer = trainer_factory("der", input_shape=(8,), hidden=(16,), boundaries="every:96")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        trainer.step(torch.randn(32, 8, generator=gen), torch.randint(0, 2, (32,), generator=gen))
    strategy = trainer.strategy
    x_rows = strategy.memory.current.all()["x"].clone()
    with torch.no_grad():
        trainer.model.eval()
        before_new = trainer.model(x_rows)
        trainer.model.train()
    # the third batch brings new classes; the boundary (every 96 samples) comes after it
    trainer.step(torch.randn(32, 8, generator=gen), torch.randint(2, 4, (32,), generator=gen))
    r = trainer.step(torch.randn(32, 8, generator=gen), torch.randint(2, 4, (32,), generator=gen))
    assert r.boundary is not None and r.boundary.index == 96
    past = strategy.memory.past.all()
    order = [int(torch.nonzero((past["x"] == row).all(1))[0]) for row in x_rows]
    torch.testing.assert_close(past["logits"][order][:, :2], before_new)
    with torch.no_grad():
        trainer.model.eval()
        now = trainer.model(x_rows)[:, :2]
        trainer.model.train()
    assert not torch.allclose(now, before_new, atol=1e-3)   # the new batch did move them


# == MAS =========================================================================================
def _tiny_mas(**params) -> MAS:
    gen = torch.Generator().manual_seed(0)
    model = build_model("mlp", (4,), (3,), gen)
    model.grow(2, gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_strategy("mas", model, opt, torch.Generator().manual_seed(1), params)


def test_mas_importance_is_the_mean_absolute_per_sample_gradient() -> None:
    strategy = _tiny_mas()
    model = strategy.model
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for xi in x:  # one sample at a time, plain autograd
        model.zero_grad(set_to_none=True)
        model(xi.unsqueeze(0)).pow(2).sum().backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad.abs() / len(x)
    got = strategy.compute_importance(x, chunk=3)  # chunks that do not divide 7
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)
        assert (got[k] >= 0).all()
    assert any((v > 0).any() for v in got.values())


def test_mas_importance_is_nonnegative_and_penalty_zero_at_the_anchor(
        split_digits_once, batch_iter, trainer_factory) -> None:
    stream = split_digits_once
    trainer = trainer_factory("mas", boundaries="task")
    strategy: MAS = trainer.strategy  # type: ignore[assignment]
    assert float(strategy.penalty().detach()) == 0.0  # nothing learned yet
    switch = int((stream.task == 1).argmax())
    run_until(trainer, stream, batch_iter, switch + 32)  # the boundary at `switch` fired
    assert len(trainer.boundaries) == 1
    names = {k for k, _ in trainer.model.named_parameters()}
    assert set(strategy.importance) == names
    for k, p in trainer.model.named_parameters():
        assert strategy.importance[k].shape == p.shape  # padded with the grown head
        assert (strategy.importance[k] >= 0).all()
    assert all(float(v.sum()) > 0 for v in strategy.importance.values())

    strategy.on_experience_end()  # fresh anchor at the current weights
    assert float(strategy.penalty().detach()) == 0.0
    x, y, _ = next(batch_iter(stream, 32, switch + 32))
    trainer.step(x, y)
    assert float(strategy.penalty().detach()) > 0.0


def test_mas_step_is_sgd_followed_by_the_exact_proximal_step() -> None:
    strategy = _tiny_mas(lambda_reg=3.0)
    model, gen = strategy.model, torch.Generator().manual_seed(3)
    x0, y0 = torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    strategy.observe(x0, y0)
    strategy.on_experience_end()
    anchor = {k: v.clone() for k, v in strategy.anchor.items()}
    with torch.no_grad():  # move away from the anchor, as later training would
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))

    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    sgd = copy.deepcopy(model)
    g_loss = F.cross_entropy(sgd(x), y)
    g_loss.backward()
    with torch.no_grad():
        for p in sgd.parameters():
            p -= 0.1 * p.grad
    strategy.observe(x, y)
    pulled = 0
    for (k, p), q in zip(model.named_parameters(), sgd.parameters(), strict=True):
        c = 2 * 0.1 * 3.0 * strategy.importance[k]
        torch.testing.assert_close(p.detach(), (q.detach() + c * anchor[k]) / (1 + c))
        # towards the anchor, never past it
        d_mas, d_sgd = (p.detach() - anchor[k]).abs(), (q.detach() - anchor[k]).abs()
        assert (d_mas <= d_sgd + 1e-6).all()
        pulled += int((d_mas < d_sgd - 1e-6).sum())
    assert pulled > 0


def test_mas_with_a_huge_penalty_does_not_diverge(split_digits_once, batch_iter,
                                                  trainer_factory) -> None:
    stream = split_digits_once
    trainer = trainer_factory("mas", boundaries="task", lr=0.05, params={"lambda_reg": 100.0})
    end = int((stream.task == 2).argmax())  # experiences 0 and 1
    losses = []
    for x, y, task in batch_iter(stream, 32, 0, end):
        losses.append(trainer.step(x, y, task).loss)
    strategy: MAS = trainer.strategy  # type: ignore[assignment]
    assert max(float(v.max()) for v in strategy.importance.values()) * 100 * 0.05 * 2 > 1, (
        "the gradient form of the penalty would overshoot at these settings")
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert math.isfinite(float(strategy.penalty().detach()))


# == IL2M ========================================================================================
def _rectifier() -> IL2MRectifier:
    r = IL2MRectifier()
    r.grow(6)
    r.register(0, [0, 1], init_mean={0: 0.8, 1: 0.6}, confidence=0.7)
    r.register(1, [2, 3], init_mean={2: 0.9, 3: 0.5}, confidence=0.9,
               current_mean={0: 0.4, 1: 0.2})
    r.register(2, [4, 5], init_mean={4: 0.7, 5: 0.75}, confidence=0.95,
               current_mean={0: 0.5, 1: 0.3, 2: 0.45, 3: 0.25})
    return r


def test_il2m_rectifies_old_scores_only_when_a_new_class_wins() -> None:
    r = _rectifier()
    init = [0.8, 0.6, 0.9, 0.5]
    current = [0.5, 0.3, 0.45, 0.25]
    conf = [0.7, 0.9, 0.95]
    learned_in = [0, 0, 1, 1]
    logits = torch.tensor([
        [0.2, 0.1, 0.3, 0.0, 2.0, 0.5],   # new class 4 on top: rectify classes 0-3
        [0.1, 0.0, 0.2, 0.4, 0.3, 1.5],   # new class 5 on top
        [1.9, 0.1, 0.3, 0.0, 1.8, 0.5],   # old class 0 on top: untouched
        [0.0, 0.1, 2.5, 0.0, 1.0, 0.5],   # old class 2 (experience 1) on top: untouched
    ])
    soft = F.softmax(logits, 1)
    out = r(logits)
    for i in (0, 1):
        expected = soft[i].clone()
        for c in range(4):
            expected[c] *= init[c] / current[c] * conf[2] / conf[learned_in[c]]
        torch.testing.assert_close(out[i], expected)
    for i in (2, 3):
        torch.testing.assert_close(out[i], soft[i])
    # the rectification changes a decision: class 0 beats new class 4 after it
    close_call = torch.log(torch.tensor([[0.30, 0.02, 0.02, 0.02, 0.6, 0.04]]))
    assert int(r(close_call).argmax()) == 0


def test_il2m_rectifier_is_part_of_the_saved_model(split_digits_once, batch_iter,
                                                   trainer_factory) -> None:
    stream = split_digits_once
    trainer = trainer_factory("il2m", boundaries="task", hidden=(64,))
    run_until(trainer, stream, batch_iter, len(stream))
    state = trainer.model.state_dict()
    for buf in ("class_exp", "init_mean", "current_mean", "confidence", "last_exp"):
        assert f"rectifier.{buf}" in state
    assert int(state["rectifier.last_exp"]) == 3  # experiences 0-3 closed; 4 still running
    assert state["rectifier.class_exp"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, -1, -1]

    # a second model restored from those weights alone predicts the same rectified classes
    clone = build_model("mlp", (64,), (64,))
    clone.rectifier = IL2MRectifier()
    clone.grow(trainer.model.n_classes, torch.Generator())
    clone.rectifier.grow(trainer.model.n_classes)
    load_module_state(clone, state)
    x = torch.from_numpy(stream.x[:200])
    with torch.no_grad():
        torch.testing.assert_close(clone.predict_scores(x), trainer.model.predict_scores(x))


def test_il2m_prediction_does_not_depend_on_the_rest_of_the_batch(
        split_digits, batch_iter, trainer_factory) -> None:
    """The reference implementation derived the class history from the evaluated data, so a
    sample's prediction changed with the test set around it."""
    stream, test = split_digits
    trainer = trainer_factory("il2m", boundaries="task", hidden=(64,))
    run_until(trainer, stream, batch_iter, len(stream))
    x = torch.from_numpy(test.x)
    model = trainer.model
    with torch.no_grad():
        raw = model(x)
        full = model.predict_scores(x)
        alone = torch.cat([model.predict_scores(x[i:i + 1]) for i in range(len(x))])
        old_only = test.y < 4  # a test set holding only the first two experiences' classes
        subset = model.predict_scores(x[torch.from_numpy(old_only)])
    assert not torch.equal(raw.argmax(1), full.argmax(1)), "rectification never mattered"
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(subset, full[torch.from_numpy(old_only)], rtol=1e-5, atol=1e-6)
    preds = trainer.predict(x)
    for i in range(0, len(x), 37):
        assert trainer.predict(x[i:i + 1]).item() == preds[i].item()


# == RAR =========================================================================================
def test_rar_adversarial_replay_moves_memory_towards_the_nearest_other_class(
        split_digits_once, batch_iter, trainer_factory) -> None:
    stream = split_digits_once
    trainer = trainer_factory("rar", boundaries="task", seed=3)
    s = int((stream.task == 2).argmax()) + 96  # two experiences in, a third under way
    run_until(trainer, stream, batch_iter, s)
    strategy: RAR = trainer.strategy  # type: ignore[assignment]
    x = torch.from_numpy(stream.x[s:s + 32])
    y = head_index(trainer, torch.from_numpy(stream.y[s:s + 32]))
    model = trainer.model
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()  # the current batch's gradients, as in observe
    gen_state = strategy.generator.get_state()
    mem = strategy.memory.sample(32)
    assert len(set(mem["y"].tolist())) >= 3
    # make the mask matter: the current batch also holds near-copies of memory samples of the
    # same class, which are their nearest neighbours overall but must not be targets
    x = torch.cat([x, mem["x"] + 1e-3])
    y = torch.cat([y, mem["y"]])

    mixup_state = strategy.generator.get_state()
    x_adv, soft = strategy.adversarial_replay(x, y, mem["x"], mem["y"])
    strategy.generator.set_state(mixup_state)
    mixed, soft_again, partner = strategy.mixup(mem["x"], mem["y"])
    strategy.generator.set_state(gen_state)
    assert torch.equal(soft, soft_again)

    # 1. inside the epsilon L-inf ball around the mixed samples, and actually moved
    eps = strategy.epsilon_fgsm
    assert float((x_adv - mixed).abs().max()) <= eps + 1e-6
    assert float((x_adv - mixed).abs().max()) > eps / 4

    # 2. the target is the nearest current sample of a class neither mixed parent has,
    #    found here by brute force in the look-ahead model's feature space
    params = strategy.lookahead_params()
    with torch.no_grad():
        f_cur, f_mix = strategy.features(params, x), strategy.features(params, mixed)
    nearest, nearest_any = [], []
    for i in range(len(mixed)):
        d = [float((f_mix[i] - f_cur[j]).norm()) for j in range(len(x))]
        allowed = [j for j in range(len(x)) if int(y[j]) not in (int(mem["y"][i]),
                                                                  int(partner[i]))]
        assert allowed
        nearest.append(min(allowed, key=d.__getitem__))
        nearest_any.append(min(range(len(x)), key=d.__getitem__))
    nearest_t = torch.tensor(nearest)
    assert all(int(y[j]) not in (int(mem["y"][i]), int(partner[i]))
               for i, j in enumerate(nearest))
    assert any(int(y[j]) in (int(mem["y"][i]), int(partner[i]))
               for i, j in enumerate(nearest_any)), "the class mask never mattered here"
    target = f_cur[nearest_t]
    torch.testing.assert_close(x_adv, strategy.mi_fgsm(params, mixed, target), rtol=0, atol=0)

    # 3. the attack brings the samples closer to their targets in that feature space
    with torch.no_grad():
        before = (f_mix - target).pow(2).sum(1)
        after = (strategy.features(params, x_adv) - target).pow(2).sum(1)
    assert float(after.mean()) < float(before.mean())
    assert int((after < before).sum()) > len(before) // 2


def test_rar_trains_with_and_without_adversarial_replay(split_digits, batch_iter,
                                                        trainer_factory) -> None:
    stream, test = split_digits
    stop = int((stream.task == 2).argmax())  # experiences 0 and 1, five passes each
    old = test.y < 2
    weights = []
    for adversarial in (True, False):
        trainer = trainer_factory("rar", boundaries="task",
                                  params={"use_adversarial_replay": adversarial})
        for x, y, task in batch_iter(stream, 32, 0, stop):
            assert math.isfinite(trainer.step(x, y, task).loss)
        assert trainer.prequential_accuracy > 0.6
        # it replays: after experience 1, experience 0's classes are still recognised
        # (fine-tuning ends at 0% on them here)
        pred = trainer.predict(torch.from_numpy(test.x[old])).numpy()
        assert float((pred == test.y[old]).mean()) > 0.5
        weights.append(flat_params(trainer.model))
    assert not torch.allclose(weights[0], weights[1])  # the flag changes what is learned


# == replay memories =============================================================================
def test_reservoir_keeps_every_position_with_equal_probability() -> None:
    capacity, length, runs = 8, 40, 4000
    kept = torch.zeros(length)
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 7, 1, 12, 5, 9, 3]  # uneven batches, first one below capacity
    for _ in range(runs):
        buf = ReservoirBuffer(capacity, gen)
        pos = 0
        for n in sizes:
            buf.add(x=torch.arange(pos, pos + n).unsqueeze(1).float(), y=torch.arange(pos, pos + n))
            pos += n
            assert len(buf) == min(pos, capacity) and buf.seen == pos
        stored = buf.all()
        assert torch.equal(stored["x"].squeeze(1).long(), stored["y"])  # fields stay aligned
        assert len(set(stored["y"].tolist())) == capacity  # no duplicates
        kept[stored["y"]] += 1
    assert sum(sizes) == length
    p = capacity / length
    expected = runs * p
    sigma = math.sqrt(runs * p * (1 - p))
    assert float((kept - expected).abs().max()) < 4.5 * sigma
    chi2 = float(((kept - expected) ** 2 / expected).sum())
    assert chi2 < 72.0  # 39 degrees of freedom: the 99.9th percentile
    # the first `capacity` samples (stored without competition) are not favoured either: an
    # off-by-half in the replacement draw shifts their share by about 0.01
    first = float(kept[:capacity].sum())
    assert abs(first - capacity * expected) < 3.5 * math.sqrt(capacity) * sigma


def test_reservoir_never_exceeds_capacity_and_counts_everything() -> None:
    buf = ReservoirBuffer(5, torch.Generator().manual_seed(0))
    seen = 0
    for n in (2, 1, 9, 30, 4):
        buf.add(x=torch.randn(n, 3), y=torch.zeros(n, dtype=torch.long))
        seen += n
        assert len(buf) <= 5 and buf.seen == seen
    assert buf.fields["x"].shape == (5, 3)
    assert buf.sample(100)["x"].shape == (5, 3)
    with pytest.raises(ValueError, match="mem_size"):
        ReservoirBuffer(0, torch.Generator())


@pytest.mark.parametrize("interleaved", [False, True])
def test_balanced_buffer_splits_capacity_evenly(interleaved: bool) -> None:
    capacity, n_groups, per_group = 100, 7, 60
    buf = BalancedBuffer(capacity, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    if interleaved:
        groups = torch.arange(n_groups).repeat(per_group)
    else:
        groups = torch.arange(n_groups).repeat_interleave(per_group)
    for chunk in groups.split(16):
        buf.add(chunk, x=torch.randn(len(chunk), 2, generator=gen), g=chunk.clone())
        assert len(buf) <= capacity
        counts = [len(buf.group_rows(g)) for g in buf.slots]
        assert sum(counts) == len(buf)
    counts = [len(buf.group_rows(g)) for g in range(n_groups)]
    assert len(buf) == capacity
    assert max(counts) - min(counts) <= 1
    for g in range(n_groups):  # each group's rows hold that group's samples
        assert (buf.get(buf.group_rows(g))["g"] == g).all()
    assert buf.seen == dict.fromkeys(range(n_groups), per_group)


def test_every_strategy_is_registered() -> None:
    assert set(STRATEGIES) == {"naive", "er", "er-ace", "agem", "der", "der++", "mas", "il2m",
                               "rar", "il2m-der"}


# == ER-ACE ======================================================================================
def _tiny_er_ace() -> ERACE:
    gen = torch.Generator().manual_seed(0)
    model = build_model("mlp", (4,), (8,), gen)
    model.grow(3, gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_strategy("er-ace", model, opt, torch.Generator().manual_seed(1), {})


def test_er_ace_masks_the_classes_absent_from_the_incoming_batch() -> None:
    """Hand-made batches, empty memory: the incoming loss is a softmax over the batch's classes
    only, so an absent class's head row gets no gradient and a one-class batch learns nothing;
    plain cross-entropy would push the absent row down in both cases."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    for y, absent in ((torch.tensor([0, 1, 0, 1, 0, 1]), [2]), (torch.zeros(6, dtype=torch.long),
                                                                [1, 2])):
        strategy = _tiny_er_ace()
        model = strategy.model
        head_before = model.head.weight.detach().clone(), model.head.bias.detach().clone()
        body_before = flat_params(model.body)
        plain = copy.deepcopy(model)
        F.cross_entropy(plain(x), y).backward()
        assert all(float(plain.head.weight.grad[c].abs().sum()) > 0 for c in absent)

        logits = strategy.observe(x, y)
        assert logits.shape == (6, 3)                        # predictions keep every class
        w, b = model.head.weight.detach(), model.head.bias.detach()
        for c in absent:
            assert torch.equal(w[c], head_before[0][c]) and b[c] == head_before[1][c]
        if len(set(y.tolist())) == 1:                        # softmax over one class: constant
            assert torch.equal(flat_params(model.body), body_before)
            assert torch.equal(w, head_before[0])
        else:
            assert not torch.equal(flat_params(model.body), body_before)


def test_er_ace_replay_trains_every_class_and_memory_is_class_balanced() -> None:
    strategy = _tiny_er_ace()
    gen = torch.Generator().manual_seed(3)
    # 300 samples of class 0, then 20 of class 1: a class-balanced memory keeps them even
    for _ in range(10):
        strategy.observe(torch.randn(30, 4, generator=gen), torch.zeros(30, dtype=torch.long))
    strategy.observe(torch.randn(20, 4, generator=gen), torch.ones(20, dtype=torch.long))
    stored = strategy.memory.all()["y"]
    assert int((stored == 1).sum()) == 20 and len(stored) == 320  # capacity 500: all kept
    for _ in range(40):
        strategy.observe(torch.randn(30, 4, generator=gen), torch.zeros(30, dtype=torch.long))
    stored = strategy.memory.all()["y"]
    assert len(stored) == 500 and int((stored == 1).sum()) == 20  # the rare class keeps its rows

    # with memory, a one-class incoming batch still trains: the replayed rows carry the loss,
    # over all classes (class 2's row, never a label, is pushed down by them)
    row2 = strategy.model.head.weight[2].detach().clone()
    strategy.observe(torch.randn(8, 4, generator=gen), torch.zeros(8, dtype=torch.long))
    assert not torch.equal(strategy.model.head.weight[2].detach(), row2)


# == the experience memory (ER, DER, DER++, RAR) ================================================
def test_experience_memory_replays_finished_experiences_in_equal_shares() -> None:
    gen = torch.Generator().manual_seed(0)
    mem = ExperienceMemory(90, gen)
    for exp, n in enumerate((300, 40, 150)):           # experiences of unequal length
        mem.add(x=torch.full((n, 1), float(exp)), y=torch.full((n,), exp))
        if exp == 0:                                    # nothing finished yet: the open one
            assert set(mem.sample(50)["y"].tolist()) == {0}
        else:                                           # only finished experiences replay
            assert set(mem.sample(200)["y"].tolist()) <= set(range(exp))
        mem.close_experience(exp)
        assert mem.current.capacity == 90 // (exp + 2)  # the next one holds its future share
        assert len(mem.current) == 0
    shares = torch.bincount(mem.past.all()["y"], minlength=3).tolist()
    assert shares == [30, 30, 30]
    assert len(mem) == 90

    restored = ExperienceMemory(90, torch.Generator())
    restored.load_state_dict(mem.state_dict())
    assert torch.equal(restored.past.all()["x"], mem.past.all()["x"])
    assert restored.current.capacity == mem.current.capacity


def test_er_replays_only_finished_experiences_once_one_has_ended(trainer_factory) -> None:
    trainer = trainer_factory("er", input_shape=(4,), hidden=(8,), boundaries="task")
    gen = torch.Generator().manual_seed(0)
    for task, labels in enumerate(((0, 1), (2, 3))):
        for _ in range(20):
            y = torch.tensor(labels)[torch.randint(0, 2, (16,), generator=gen)]
            trainer.step(torch.randn(16, 4, generator=gen), y, task)
    memory = trainer.strategy.memory
    assert set(memory.sample(500)["y"].tolist()) == {0, 1}    # the past: experience 0 only
    assert set(memory.current.all()["y"].tolist()) == {2, 3}  # experience 1 waits its turn


# == IL2M-DER ===================================================================================
def test_il2m_der_stores_logits_pads_them_and_keeps_the_rectifier(trainer_factory) -> None:
    trainer = trainer_factory("il2m-der", input_shape=(4,), hidden=(8,), boundaries="task")
    gen = torch.Generator().manual_seed(0)
    trainer.step(torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen), 0)
    stored = trainer.strategy.memory.all()
    assert stored["logits"].shape == (16, 2)
    first = stored["logits"].clone()
    for _ in range(5):
        trainer.step(torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen))
    trainer.step(torch.randn(16, 4, generator=gen), torch.randint(2, 4, (16,), generator=gen), 1)
    logits = trainer.strategy.memory.all()["logits"]   # capacity 500: nothing replaced
    assert logits.shape == (112, 4)
    assert torch.equal(logits[:16, :2], first)          # stored once, as the step saw them
    old = logits[:96]                                   # stored before the head grew
    assert torch.equal(old[:, 2:], old[:, :2].min(1, keepdim=True).values.expand(-1, 2))
    assert isinstance(trainer.model.rectifier, IL2MRectifier)   # published models rectify
