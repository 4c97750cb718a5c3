"""Fixtures for the metrics tests: a real Prometheus server (``prometheus_server``).

The helper lives in ``tests/prometheus_server.py`` so other test directories can reuse it. With
``--import-mode=importlib`` ``tests/`` is not on ``sys.path``, so it is loaded by file path;
to get the fixture elsewhere, put the same ``_load`` and ``prometheus_server = ...`` lines in
that directory's ``conftest.py`` (the module is cached in ``sys.modules``, so loading it twice
shares one copy).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load(name: str = "streamcl_tests_prometheus_server") -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "prometheus_server.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


prometheus_helper = _load()
prometheus_server = prometheus_helper.prometheus_server


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool``; fails (never skips) when it is missing, saying how to install it."""
    try:
        return prometheus_helper.find_binary("promtool")
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
