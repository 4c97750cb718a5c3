"""The streaming interfaces: BatchConsumer and PrefetchingConsumer are BatchSources and
RangeSources, RangeReader is a RangeSource, with the protocols' exact signatures.

``isinstance`` against a runtime-checkable protocol only checks that the members exist, so the
signatures are checked here as a type checker would: every parameter of the protocol's method
in the same place, with the same name, kind, default and type, any extra parameter optional,
and the same return type.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping

import pytest

from streamcl.stream.consumer import BatchConsumer, MicroBatch, RangeReader
from streamcl.stream.messages import Decoder
from streamcl.stream.prefetch import PrefetchingConsumer
from streamcl.stream.sources import BatchSource, RangeSource

CONFORMING = [(BatchConsumer, BatchSource), (PrefetchingConsumer, BatchSource),
              (BatchConsumer, RangeSource), (PrefetchingConsumer, RangeSource),
              (RangeReader, RangeSource)]


def _methods(protocol: type) -> list[str]:
    """The protocol's methods (``typing.get_protocol_members`` is Python 3.13+)."""
    return sorted(name for name, value in vars(protocol).items()
                  if inspect.isfunction(value) and not name.startswith("_"))


def signature_mismatches(cls: type, protocol: type) -> list[str]:
    """Why ``cls``'s methods do not fit ``protocol``'s (empty if they do)."""
    problems = []
    for name in _methods(protocol):
        impl = getattr(cls, name, None)
        if not callable(impl):
            problems.append(f"{name}: missing")
            continue
        want, got = inspect.signature(getattr(protocol, name)), inspect.signature(impl)
        want_types = typing.get_type_hints(getattr(protocol, name))
        got_types = typing.get_type_hints(impl)
        got_params = list(got.parameters.values())
        for i, param in enumerate(want.parameters.values()):
            if i >= len(got_params):
                problems.append(f"{name}: no parameter {param.name}")
                continue
            mine = got_params[i]
            if (mine.name, mine.kind, mine.default) != (param.name, param.kind, param.default):
                problems.append(f"{name}: parameter {i} is {mine}, the protocol's {param}")
            elif got_types.get(mine.name) != want_types.get(param.name):
                problems.append(f"{name}({param.name}): {got_types.get(mine.name)}, "
                                f"the protocol's {want_types.get(param.name)}")
        problems += [f"{name}: extra parameter {p.name} has no default"
                     for p in got_params[len(want.parameters):]
                     if p.default is inspect.Parameter.empty
                     and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if got_types.get("return") != want_types.get("return"):
            problems.append(f"{name} returns {got_types.get('return')}, "
                            f"the protocol's {want_types.get('return')}")
    return problems


@pytest.mark.parametrize(("cls", "protocol"), CONFORMING,
                         ids=[f"{c.__name__}-{p.__name__}" for c, p in CONFORMING])
def test_signatures_match_the_protocol(cls: type, protocol: type) -> None:
    assert signature_mismatches(cls, protocol) == []


def test_the_signature_check_sees_a_mismatch() -> None:
    class Loose:
        rejections: dict[str, int] = {}  # noqa: RUF012

        def poll_batch(self, max_records: int) -> MicroBatch | None: ...
        def seek(self, offsets: dict[str, int]) -> None: ...
        def seek_to_beginning(self, timeout_s: float = 10.0) -> dict[int, int]: ...
        def commit(self, offsets: dict[int, int], now: bool) -> None: ...
        def lag(self) -> dict[int, int]: ...

    problems = signature_mismatches(Loose, BatchSource)
    assert [p.split(":")[0].split("(")[0].split(" ")[0] for p in problems] == [
        "close", "commit", "poll_batch", "seek", "seek_to_beginning"]
    assert signature_mismatches(RangeReader, BatchSource)[0] == "commit: missing"


def test_real_instances_are_what_they_claim(
        kafka_bootstrap: str, topic: str, group_id: str, session_timeout_ms: int) -> None:
    decoder = Decoder((4,))
    made: list[Callable[[], object]] = [
        lambda: BatchConsumer(kafka_bootstrap, topic, group_id, decoder,
                              session_timeout_ms=session_timeout_ms),
        lambda: PrefetchingConsumer(kafka_bootstrap, topic, group_id, decoder, batch_size=4,
                                    max_wait_s=0.1, session_timeout_ms=session_timeout_ms),
    ]
    for make in made:
        source = make()
        try:
            assert isinstance(source, BatchSource) and isinstance(source, RangeSource)
            assert isinstance(source.rejections, Mapping)  # type: ignore[attr-defined]
        finally:
            source.close()  # type: ignore[attr-defined]
    reader = RangeReader(kafka_bootstrap, topic, decoder)
    try:
        assert isinstance(reader, RangeSource) and not isinstance(reader, BatchSource)
    finally:
        reader.close()
