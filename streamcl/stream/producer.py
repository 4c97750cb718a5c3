"""Write a labelled stream (an NPZ file's rows, in order) into a topic, optionally rate-limited.

This backs ``streamcl produce``: a way to replay a data set as live traffic for a demo, a load
test or an end-to-end test. Each row becomes one message (:mod:`streamcl.stream.messages`) with
``id`` = its row index and ``ts`` = the time it was sent, so end-to-end latency can be measured
downstream. Messages carry no key; keep the topic at one partition for the stream's order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, Literal

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamcl.data import Stream
from streamcl.stream.broker import ensure_topics
from streamcl.stream.messages import encode_binary, encode_json

PROGRESS_EVERY = 1000


class TokenBucket:
    """Allow ``rate`` events per second on average, with bursts of up to ``burst`` events.

    A bucket rather than a fixed sleep per message: sleeping is coarse (about a millisecond),
    so at thousands of messages per second a per-message sleep would undershoot the rate; the
    bucket sleeps only when it runs dry and lets the sender catch up after a stall.

    >>> bucket = TokenBucket(1e9)
    >>> bucket.take()
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 messages per second, got {rate}")
        self.rate = float(rate)
        self.burst = max(1.0, self.rate / 20) if burst is None else float(burst)
        self.clock, self.sleep = clock, sleep
        self.tokens = self.burst
        self.stamp = clock()

    def take(self, n: float = 1.0) -> None:
        """Spend ``n`` events, sleeping off any debt (the sleep's time refills the bucket on the
        next call, so oversleeping is not lost and the loop never spins on rounding)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        if self.tokens < 0:
            self.sleep(-self.tokens / self.rate)


def produce_stream(stream: Stream, bootstrap: str, topic: str,
                   encoding: Literal["binary", "json"] = "binary", rate: float | None = None,
                   progress: Callable[[int], Any] | None = None, *,
                   client_config: dict[str, Any] | None = None) -> int:
    """Send every row of ``stream`` to ``topic``; return how many were sent.

    ``rate`` caps messages per second (a token bucket); ``progress(n)`` is called with the
    number of messages sent since its last call (so ``tqdm(...).update`` fits). Returns after
    ``flush()``, raising the first delivery error if any message was not acknowledged. The topic
    is created (one partition) when missing.
    """
    if encoding not in ("binary", "json"):
        raise ValueError(f"encoding must be binary or json, got {encoding!r}")
    config = dict(client_config or {})
    with contextlib.suppress(KafkaError):  # may lack the right to create: it may exist already
        ensure_topics(bootstrap, [topic], client_config=config)
    record_bytes = stream.x[0].nbytes if len(stream) else 0
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             batch_size=1 << 20, max_request_size=max(1 << 20, 4 * record_bytes
                                                                      + (64 << 10)),
                             **config)
    errors: list[BaseException] = []
    bucket = TokenBucket(rate) if rate else None
    tasks = stream.task
    sent = reported = 0
    try:
        for i in range(len(stream)):
            if bucket is not None:
                bucket.take()
            task = None if tasks is None else int(tasks[i])
            x, y = stream.x[i], int(stream.y[i])
            if encoding == "binary":
                value, headers = encode_binary(x, y, id=str(i), ts=time.time(), task=task)
            else:
                value, headers = encode_json(x, y, id=str(i), ts=time.time(), task=task), []
            producer.send(topic, value=value, headers=headers).add_errback(errors.append)
            sent += 1
            if progress is not None and sent - reported >= PROGRESS_EVERY:
                progress(sent - reported)
                reported = sent
            if errors:
                break
        producer.flush()
    finally:
        producer.close()
    if errors:
        raise errors[0]
    if progress is not None and sent > reported:
        progress(sent - reported)
    return sent
