"""Continual-learning strategies, one file each. ``STRATEGIES`` maps CLI names to classes.

Each strategy's keyword arguments are its parameters, under the names of the Avalanche API
(``--param name=value`` on the command line); :func:`make_strategy` validates them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from streamcl import DEFAULT_STRATEGY
from streamcl.models import Classifier
from streamcl.strategies.agem import AGEM
from streamcl.strategies.base import Strategy
from streamcl.strategies.der import DER, DERPP
from streamcl.strategies.er import ER
from streamcl.strategies.er_ace import ERACE
from streamcl.strategies.il2m import IL2M
from streamcl.strategies.il2m_der import IL2MDER
from streamcl.strategies.mas import MAS
from streamcl.strategies.naive import Naive
from streamcl.strategies.rar import RAR

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Naive, ER, ERACE, AGEM, DER, DERPP, MAS, IL2M, RAR, IL2MDER)
}


def strategy_params(name: str) -> dict[str, inspect.Parameter]:
    """The parameters strategy ``name`` accepts, with their defaults and annotations."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    sig = inspect.signature(STRATEGIES[name].__init__)
    return {k: p for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def resolved_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Every parameter of strategy ``name``: the given ones over the defaults."""
    out = {k: p.default for k, p in strategy_params(name).items()}
    out.update(params)
    return out


def make_strategy(name: str, model: Classifier, optimizer: torch.optim.Optimizer,
                  generator: torch.Generator, params: dict[str, Any]) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"--strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    accepted = strategy_params(name)
    for k, v in params.items():
        if k not in accepted:
            raise ValueError(f"--param {k}: {name} takes {', '.join(accepted) or 'no parameters'}")
        check_param(name, k, v, accepted[k].annotation)
    return STRATEGIES[name](model, optimizer, generator, **params)


_POSITIVE_INTS = {"mem_size", "batch_size_mem", "patterns_per_experience", "sample_size",
                  "importance_samples"}


def check_param(strategy: str, key: str, value: Any, annotation: str) -> None:
    """Refuse a value that does not fit the parameter's annotation, with a one-line reason."""
    kinds = {a.strip() for a in str(annotation).split("|")}
    ok = (("int" in kinds and isinstance(value, int) and not isinstance(value, bool))
          or ("float" in kinds and isinstance(value, int | float) and not isinstance(value, bool))
          or ("bool" in kinds and isinstance(value, bool))
          or ("str" in kinds and isinstance(value, str))
          or ("None" in kinds and value is None))
    if not ok:
        raise ValueError(f"--param {key}={value!r}: {strategy}'s {key} must be "
                         f"{' or '.join(sorted(kinds))}")
    if key in _POSITIVE_INTS and value < 1:
        raise ValueError(f"--param {key}={value!r}: must be >= 1")


__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "Strategy", "make_strategy", "resolved_params",
           "strategy_params"]
