"""Exported models: what inference gets, and that exporting never disturbs the trainer.

IL2M is the interesting case: its rectification of the open experience is computed by
``prepare_inference()`` inside the live model, which the trainer's own predictions go through.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamcl.data import Stream
from streamcl.registry import InferenceModel, export_model
from streamcl.state import state_sha256
from streamcl.trainer import OnlineTrainer

from .conftest import small_trainer, train

# split digits, one pass: experience 0 is samples 0..269 (classes 0, 1), experience 1 270..539
MID_EXP1, END = 416, 608


def _il2m() -> OnlineTrainer:
    return small_trainer("il2m", mem_size=200)


def test_export_leaves_the_il2m_trainer_bit_identical(split_digits_once: Stream) -> None:
    """Training with an export in the middle ends bit-identical to training without one, and
    the export really did differ from the live rectifier (so the restore was needed)."""
    with_export, without = _il2m(), _il2m()
    train(with_export, split_digits_once, 0, MID_EXP1)
    train(without, split_digits_once, 0, MID_EXP1)
    live_before = {k: v.clone() for k, v in with_export.model.state_dict().items()}
    tensors, section = export_model(with_export)
    live_after = with_export.model.state_dict()
    assert live_after.keys() == live_before.keys()
    for k, v in live_before.items():
        assert torch.equal(live_after[k], v), k
    # prepare_inference registered the open experience in the export only
    assert int(tensors["rectifier.last_exp"]) == 1
    assert int(live_after["rectifier.last_exp"]) == 0
    assert not torch.equal(tensors["rectifier.class_exp"], live_after["rectifier.class_exp"])
    assert section == {"input_shape": [64], "model": "mlp", "hidden": [16],
                       "labels": [0, 1, 2, 3], "n_classes": 4, "rectifier": "il2m"}

    train(with_export, split_digits_once, MID_EXP1, END)
    train(without, split_digits_once, MID_EXP1, END)
    assert state_sha256(with_export.state_dict()) == state_sha256(without.state_dict())
    assert with_export.correct == without.correct


def test_inference_model_predicts_like_the_trainer(split_digits_once: Stream,
                                                   digits_data: tuple[Stream, Stream]) -> None:
    trainer = train(_il2m(), split_digits_once, 0, MID_EXP1)
    tensors, section = export_model(trainer)
    model = InferenceModel(tensors, section)

    twin = OnlineTrainer.from_state(trainer.state_dict())  # the reference, on a copy
    twin.prepare_inference()
    x = torch.from_numpy(digits_data[1].x)
    expected = twin.predict(x)
    got = model.predict(x)
    assert got.dtype == torch.long and torch.equal(got, expected)
    assert set(got.unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(model.predict_scores(x), twin._predict_scores(x, 4))
    # the rectifier shipped with the weights and is active: scores are not plain softmax
    raw = F.softmax(model.model(x), dim=1)
    assert not torch.allclose(model.predict_scores(x), raw)
    assert model.labels == [0, 1, 2, 3] and model.version is None and model.n_classes == 4
    assert not model.model.training
    assert all(not p.requires_grad for p in model.model.parameters())


def test_labels_map_head_rows(split_digits_once: Stream) -> None:
    """Head rows follow first appearance, and predictions are labels, not rows: a stream of
    labels 10..19 in reverse order predicts labels 10..19."""
    stream = Stream(split_digits_once.x[::-1].copy(), split_digits_once.y[::-1].copy() + 10)
    trainer = train(small_trainer(), stream, 0, 256)
    tensors, section = export_model(trainer)
    model = InferenceModel(tensors, section)
    assert section["labels"] == trainer.labels and section["labels"][0] == int(stream.y[0]) == 18
    assert section["rectifier"] is None and "rectifier.class_exp" not in tensors
    x = torch.from_numpy(stream.x[:64])
    assert torch.equal(model.predict(x), trainer.predict(x))
    assert set(model.predict(x).tolist()) <= set(section["labels"])


def test_untrained_model_predicts_minus_one() -> None:
    tensors, section = export_model(small_trainer("il2m"))
    model = InferenceModel(tensors, section)
    assert section["n_classes"] == 0 and section["labels"] == []
    assert model.predict(torch.zeros(3, 64)).tolist() == [-1, -1, -1]


def test_weights_must_fit_exactly(split_digits_once: Stream) -> None:
    tensors, section = export_model(train(small_trainer(), split_digits_once, 0, 64))
    missing = {k: v for k, v in tensors.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        InferenceModel(missing, section)
    with pytest.raises(ValueError, match="unexpected"):
        InferenceModel({**tensors, "extra": torch.zeros(1)}, section)
    wrong = {**tensors, "head.weight": torch.zeros(5, 16)}
    with pytest.raises(ValueError, match=r"head\.weight is \(5, 16\)"):
        InferenceModel(wrong, section)
    with pytest.raises(ValueError, match="labels"):
        InferenceModel(tensors, {**section, "labels": [0]})
    with pytest.raises(ValueError, match="rectifier"):
        InferenceModel(tensors, {**section, "rectifier": "magic"})
