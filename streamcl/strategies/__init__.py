"""Continual-learning strategies, one file each. ``STRATEGIES`` maps CLI names to classes.

Each strategy's keyword arguments are its parameters, under the names of the Avalanche API
(``--param name=value`` on the command line); :func:`make_strategy` validates them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from streamcl.models import Classifier
from streamcl.strategies.agem import AGEM
from streamcl.strategies.base import Strategy
from streamcl.strategies.der import DER, DERPP
from streamcl.strategies.er import ER
from streamcl.strategies.il2m import IL2M
from streamcl.strategies.mas import MAS
from streamcl.strategies.naive import Naive
from streamcl.strategies.rar import RAR

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Naive, ER, AGEM, DER, DERPP, MAS, IL2M, RAR)
}


def strategy_params(name: str) -> dict[str, inspect.Parameter]:
    """The parameters strategy ``name`` accepts, with their defaults and annotations."""
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
    for k in params:
        if k not in accepted:
            raise ValueError(f"--param {k}: {name} takes {', '.join(accepted) or 'no parameters'}")
    return STRATEGIES[name](model, optimizer, generator, **params)


__all__ = ["STRATEGIES", "Strategy", "make_strategy", "resolved_params", "strategy_params"]
