"""What the property tests share: one hypothesis profile, and a wall-clock guard.

Derandomized (the same cases on every machine, so CI is reproducible), no example database
(nothing written beside the sources), no per-example deadline (a busy machine is slow, not
wrong). A property runs in a thread joined with a timeout, so a hang fails its test instead
of freezing the suite (pytest-timeout is not a dependency).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings

#: a property that takes longer has hung (they take ~1-3 s)
HANG_S = 60.0


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def within_deadline(name: str, prop: Callable[[], None], hang_s: float = HANG_S) -> None:
    """Run ``prop`` in a daemon thread; fail if it is still running after ``hang_s`` (it is
    left running: a thread cannot be killed), re-raise what it raised."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            prop()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=target, name=f"fuzz-{name}", daemon=True)
    worker.start()
    worker.join(hang_s)
    if worker.is_alive():
        pytest.fail(f"{name}: the property ran past {hang_s:g} s (a hang); it is left running "
                    "in a daemon thread")
    if errors:
        raise errors[0]
