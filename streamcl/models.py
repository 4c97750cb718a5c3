"""Models: a feature extractor (``body``) followed by a linear head that grows with the labels.

A live stream does not announce its classes, so the head starts with zero rows and gains one
row per never-seen label (:meth:`Classifier.grow`). Everything before the head is the body:
the built-in MLP or small CNN, or any ``torch.nn.Module`` factory named ``package.module:fn``,
called as ``fn(input_shape)`` and returning a module that maps a batch to flat features.

The classifier's *inference path* (:meth:`Classifier.predict_scores`) is the raw head output
passed through an optional ``rectifier`` submodule. IL2M installs its score rectification
there, so the rectification is part of the saved weights and travels with a published model.

>>> import torch
>>> model = build_model("mlp", input_shape=(4,), hidden=(8,), generator=torch.Generator())
>>> model(torch.zeros(2, 4)).shape  # no label seen yet: zero classes
torch.Size([2, 0])
>>> model.grow(3, torch.Generator().manual_seed(0))
>>> model(torch.zeros(2, 4)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """``body`` -> features -> ``head`` (rows = classes seen so far)."""

    def __init__(self, body: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.head = _linear(torch.zeros(0, feature_dim), torch.zeros(0))
        self.rectifier: nn.Module | None = None

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits, the training path."""
        return self.head(self.body(x))

    def predict_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for prediction: the logits, rectified when a strategy installed a rectifier."""
        return self.rectify(self(x))

    def rectify(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.rectifier is None else self.rectifier(logits)

    def grow(self, n_new: int, generator: torch.Generator) -> None:
        """Add ``n_new`` rows to the head, keeping the old rows' weights exactly.

        New rows use ``nn.Linear``'s default initialisation (uniform in +-1/sqrt(fan_in)),
        drawn from ``generator`` so growth is reproducible. The head's Parameters are
        replaced, so whoever holds an optimizer must re-point it (see
        :func:`streamcl.trainer.replace_parameter`).
        """
        if n_new <= 0:
            return
        old = self.head
        bound = 1.0 / math.sqrt(self.feature_dim) if self.feature_dim else 0.0
        dev, dt = old.weight.device, old.weight.dtype
        w_new = (torch.rand(n_new, self.feature_dim, generator=generator) * 2 - 1) * bound
        b_new = (torch.rand(n_new, generator=generator) * 2 - 1) * bound
        with torch.no_grad():
            self.head = _linear(
                torch.cat([old.weight, w_new.to(dev, dt)]), torch.cat([old.bias, b_new.to(dev, dt)])
            )


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding exactly these values (built on 'meta' so nothing is drawn)."""
    layer = nn.Linear(weight.shape[1], max(weight.shape[0], 1), device="meta")
    layer.out_features = weight.shape[0]
    layer.weight = nn.Parameter(weight.detach().clone())
    layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def mlp_body(input_shape: Sequence[int], hidden: Sequence[int]) -> tuple[nn.Module, int]:
    """Flatten -> (Linear -> ReLU) per hidden width. The benchmark's MLP is hidden=(256, 256)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width


def cnn_body(input_shape: Sequence[int], channels: Sequence[int]) -> tuple[nn.Module, int]:
    """(Conv3x3 -> ReLU -> MaxPool2) per channel count, then flatten.

    Flat inputs whose length is a perfect square are read as one-channel square images,
    so a CNN runs on the same 784-feature streams as the MLP.
    """
    shape = _image_shape(input_shape)
    layers: list[nn.Module] = [nn.Unflatten(1, shape)] if len(input_shape) == 1 else []
    c_in, h, w = shape
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, h, w = c, h // 2, w // 2
    if h == 0 or w == 0:
        raise ValueError(
            f"--hidden: {len(channels)} pooling stages shrink a {shape[1]}x{shape[2]} image to "
            "nothing; give fewer CNN channel counts"
        )
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in * h * w


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) == 3:
        return tuple(input_shape)  # type: ignore[return-value]
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side == input_shape[0]:
            return (1, side, side)
    raise ValueError(
        f"--model cnn: inputs of shape {tuple(input_shape)} are not images; give C x H x W "
        "samples or flat square ones (e.g. 784 = 28x28), or use --model mlp"
    )


def build_model(
    spec: str,
    input_shape: Sequence[int],
    hidden: Sequence[int] = (256, 256),
    generator: torch.Generator | None = None,
) -> Classifier:
    """Build a :class:`Classifier` from ``"mlp"``, ``"cnn"`` or ``"package.module:function"``.

    Body weights are initialised under ``generator``'s seed (PyTorch initialisers draw from
    the global generator, so it is forked and re-seeded for the duration) to make a model
    reproducible from its seed alone.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec == "mlp":
            body, dim = mlp_body(input_shape, hidden)
        elif spec == "cnn":
            body, dim = cnn_body(input_shape, hidden)
        elif ":" in spec:
            factory = _load_factory(spec)
            try:
                body = factory(tuple(input_shape))
            except Exception as exc:  # the operator's code: one line saying whose it was
                raise ValueError(f"--model {spec}: the factory raised {type(exc).__name__}: "
                                 f"{exc}".replace("\n", " ")) from None
            if not isinstance(body, nn.Module):
                raise ValueError(f"--model {spec}: the factory returned {type(body).__name__}, "
                                 "not a torch.nn.Module")
            with torch.no_grad():
                out = body(torch.zeros(1, *input_shape))
            if out.dim() != 2:
                raise ValueError(f"--model {spec}: the module must return flat features "
                                 f"(batch x dim), got shape {tuple(out.shape)}")
            dim = out.shape[1]
        else:
            raise ValueError(f"--model {spec!r}: use mlp, cnn or package.module:function")
    return Classifier(body, dim)


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {spec}: cannot import it ({exc})") from None
    if not callable(fn):
        raise ValueError(f"--model {spec}: {attr} is not callable")
    # a model factory is Python code of the operator's (trusted, like any entry point); still,
    # a builtin (os:system, builtins:exec) or a class that builds no module is never what was
    # meant, and calling it could do harm before the return type is checked
    if inspect.isbuiltin(fn) or (inspect.isclass(fn) and not issubclass(fn, nn.Module)):
        raise ValueError(f"--model {spec}: not a model factory (a torch.nn.Module subclass or a "
                         "Python function of input_shape returning one)")
    return fn


# Modules whose output in train() mode differs from eval() mode: a model containing one needs a
# separate no-grad prediction pass, because the training forward's logits are not predictions.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def train_forward_predicts(model: nn.Module) -> bool:
    """True when the training forward pass gives exactly the eval-mode predictions."""
    return not any(isinstance(m, _MODE_DEPENDENT) for m in model.modules())
