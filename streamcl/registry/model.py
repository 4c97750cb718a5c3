"""What a published model is: inference weights plus the few facts needed to rebuild them.

A published model is *not* a trainer snapshot. It holds only what inference needs — the
:class:`~streamcl.models.Classifier`'s ``state_dict`` (body, head and, for IL2M, the score
rectifier's statistics) — and a small JSON description: how to rebuild the body
(``model``, ``input_shape``, ``hidden``), how many head rows there are, which label each row
predicts, and which rectifier to attach. Optimizer state, replay memories and random
generators stay with the trainer. That keeps a publication small (the benchmark MLP is about
1 MB) and means an inference service needs no strategy code, only :mod:`streamcl.models`.

IL2M's rectification of the still-open experience is computed on demand by
``trainer.prepare_inference()``, which writes into the live rectifier — the same rectifier the
trainer's prequential predictions go through. :func:`export_model` therefore computes it, copies
the weights, and puts the live rectifier back exactly as it was, so publishing never changes
what the trainer does next (the tests check that a run with an export in the middle ends
bit-identical to one without).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from streamcl.models import Classifier, build_model
from streamcl.strategies.il2m import IL2MRectifier

if TYPE_CHECKING:
    from streamcl.trainer import OnlineTrainer

#: rectifier kinds a manifest can name, and how to build an empty one
RECTIFIERS: dict[str, type[nn.Module]] = {"il2m": IL2MRectifier}


def _rectifier_kind(module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for kind, cls in RECTIFIERS.items():
        if type(module) is cls:
            return kind
    raise ValueError(f"the model's rectifier is a {type(module).__name__}, which a published "
                     f"model cannot name (known: {', '.join(RECTIFIERS)})")


def _save_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put every buffer back as saved (assigned, not copied: IL2M's buffers change shape)."""
    current = {name for name, _ in model.named_buffers()}
    if current != set(saved):
        raise RuntimeError(f"prepare_inference() added or removed model buffers "
                           f"({sorted(current ^ set(saved))}); cannot restore the trainer")
    for name, value in saved.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, value)


def export_model(trainer: OnlineTrainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainer's model as inference weights and the manifest's ``"model"`` section.

    Weights: the classifier's ``state_dict`` (rectifier buffers included) after
    ``trainer.prepare_inference()``, as contiguous CPU copies ready for safetensors. Section:
    ``{"input_shape", "model", "hidden", "labels", "n_classes", "rectifier"}`` where ``labels[i]``
    is the label head row ``i`` predicts and ``rectifier`` is ``"il2m"`` or ``None``.

    The live trainer is left exactly as it was: the model's buffers (where prepare_inference
    writes) are saved before and restored after, and its parameters are never touched. Call it
    from the thread that trains, between steps (it reads and briefly rewrites the live model).
    """
    model: Classifier = trainer.model
    kind = _rectifier_kind(model.rectifier)
    saved = _save_buffers(model)
    try:
        trainer.prepare_inference()
        with torch.no_grad():
            tensors = {name: value.detach().to("cpu").contiguous().clone()
                       for name, value in model.state_dict().items()}
    finally:
        _restore_buffers(model, saved)
    config = trainer.config
    section = {
        "input_shape": list(config.input_shape),
        "model": config.model,
        "hidden": list(config.hidden),
        "labels": [int(v) for v in trainer.labels],
        "n_classes": model.n_classes,
        "rectifier": kind,
    }
    return tensors, section


def model_section(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``"model"`` section of a registry manifest, or ``manifest`` itself if it is one."""
    inner = manifest.get("model")
    return inner if isinstance(inner, Mapping) else manifest


class InferenceModel:
    """A published model, rebuilt for prediction only (eval mode, no gradients).

    Built from ``(tensors, manifest)`` as :func:`export_model` returns them or as
    :meth:`streamcl.registry.ModelRegistry.load` reads them back (the full manifest, whose
    ``"model"`` section is used). The weights must match the rebuilt architecture exactly:
    the same names and the same parameter shapes (a missing or extra tensor is an error, not a
    silently half-initialised model). ``package.module:function`` bodies are rebuilt by
    importing that function, so it must be importable where the model is served.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]) -> None:
        section = model_section(manifest)
        try:
            spec, input_shape = section["model"], tuple(section["input_shape"])
            hidden, n_classes = tuple(section["hidden"]), int(section["n_classes"])
            labels = [int(v) for v in section["labels"]]
            kind = section.get("rectifier")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"manifest has no usable model section ({exc!r})") from None
        if len(labels) != n_classes:
            raise ValueError(f"manifest names {len(labels)} labels for {n_classes} head rows")
        model = build_model(spec, input_shape, hidden, generator=torch.Generator())
        model.grow(n_classes, torch.Generator())  # the values are overwritten below
        if kind is not None:
            if kind not in RECTIFIERS:
                raise ValueError(f"manifest names rectifier {kind!r}; known: "
                                 f"{', '.join(RECTIFIERS)}")
            model.rectifier = RECTIFIERS[kind]()
        _load_exact(model, tensors)
        model.eval()
        model.requires_grad_(False)
        self.model: Classifier = model
        self.manifest: dict[str, Any] = dict(manifest)
        self.version: int | None = manifest.get("version") if isinstance(
            manifest.get("model"), Mapping) else None
        self.labels: list[int] = labels
        self.input_shape: tuple[int, ...] = input_shape
        self._label_table = torch.tensor([*labels, -1], dtype=torch.long)

    @property
    def n_classes(self) -> int:
        return self.model.n_classes

    @torch.no_grad()
    def predict_scores(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Scores per head row (rectified where the model has a rectifier), shape N x classes."""
        from streamcl.trainer import prepare_inputs

        if not len(x):
            return torch.zeros(0, self.n_classes)
        return torch.cat([self.model.predict_scores(prepare_inputs(x[i:i + batch_size],
                                                                   torch.device("cpu")))
                          for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted labels (``-1`` for every sample while the model knows no label)."""
        if not self.n_classes or not len(x):
            return torch.full((len(x),), -1, dtype=torch.long)
        return self._label_table[self.predict_scores(x, batch_size).argmax(1)]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor,
                      batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted labels and the softmax of the (rectified) scores, from one forward pass.

        Column ``i`` of the probabilities belongs to label ``labels[i]`` (head-row order, which
        only ever grows at the end). Labels are exactly :meth:`predict`'s.
        """
        if not self.n_classes or not len(x):
            return (torch.full((len(x),), -1, dtype=torch.long),
                    torch.zeros(len(x), self.n_classes))
        scores = self.predict_scores(x, batch_size)
        return self._label_table[scores.argmax(1)], scores.softmax(1)

    def __repr__(self) -> str:
        v = f"v{self.version}" if self.version is not None else "unpublished"
        return f"InferenceModel({v}, {self.n_classes} classes)"


def _load_exact(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load ``tensors`` strictly: same names, parameters of the same shape and dtype; buffers
    are assigned (a rectifier's per-experience statistics have the length they have)."""
    params = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    expected = set(params) | buffers
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, value in tensors.items():
            if name in params:
                p = params[name]
                if value.shape != p.shape or value.dtype != p.dtype:
                    raise ValueError(f"weights do not fit the model: {name} is "
                                     f"{tuple(value.shape)} {value.dtype}, the model's "
                                     f"{tuple(p.shape)} {p.dtype}")
                p.copy_(value)
            else:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, value.clone())
