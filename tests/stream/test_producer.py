"""produce_stream writes a data set into a topic, in order and decodable, at a capped rate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest

from streamcl.data import Stream
from streamcl.stream.messages import Decoder, Sample
from streamcl.stream.producer import TokenBucket, produce_stream


def _stream(n: int, shape: tuple[int, ...] = (1, 8, 8), dtype: str = "uint8") -> Stream:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *shape)).astype(dtype)
    return Stream(x, rng.integers(0, 10, n).astype(np.int64), np.arange(n) // 10)


@pytest.mark.parametrize(("encoding", "dtype"), [("binary", "uint8"), ("json", "uint8"),
                                                 ("binary", "float32"), ("json", "float32")])
def test_produced_stream_decodes_back_in_order(kafka_bootstrap: str, topic: str,
                                               read_topic: Callable, encoding: str,
                                               dtype: str) -> None:
    data = _stream(60, dtype=dtype)
    ticks: list[int] = []
    assert produce_stream(data, kafka_bootstrap, topic, encoding=encoding,  # type: ignore[arg-type]
                          progress=ticks.append) == 60
    assert sum(ticks) == 60
    decoder = Decoder(data.input_shape, dtypes=(dtype,))
    records = read_topic(topic, 60)
    samples = [decoder.decode(r.value, r.headers) for r in records]
    assert all(isinstance(s, Sample) for s in samples)
    np.testing.assert_array_equal(np.stack([s.x for s in samples]), data.x)
    assert [s.y for s in samples] == data.y.tolist()
    assert [s.task for s in samples] == data.task.tolist()  # type: ignore[union-attr]
    assert [s.id for s in samples] == [str(i) for i in range(60)]
    assert all(s.ts is not None and abs(s.ts - time.time()) < 600 for s in samples)


def test_produce_creates_the_topic_and_respects_the_rate(kafka_bootstrap: str,
                                                         read_topic: Callable) -> None:
    topic = f"streamcl-produce-{uuid.uuid4().hex[:12]}"  # created by produce_stream
    started = time.monotonic()
    assert produce_stream(_stream(40), kafka_bootstrap, topic, rate=200.0) == 40
    # a burst of rate/20 = 10 may go at once, the other 30 need 30/200 s at least
    assert time.monotonic() - started >= 0.14
    read_topic(topic, 40)


def test_token_bucket_paces_to_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(dt: float) -> None:
        slept.append(dt)
        now[0] += dt

    bucket = TokenBucket(100.0, burst=5, clock=lambda: now[0], sleep=sleep)
    for _ in range(105):
        bucket.take()
    assert now[0] == pytest.approx(1.0)  # 5 from the burst, 100 more at 100 per second
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_produce_refuses_an_unknown_encoding(kafka_bootstrap: str, topic: str) -> None:
    with pytest.raises(ValueError, match="encoding"):
        produce_stream(_stream(1), kafka_bootstrap, topic, encoding="avro")  # type: ignore[arg-type]
