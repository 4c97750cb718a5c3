"""`streamcl produce` end to end: an NPZ file into a real topic, read back message by message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamcl.cli import main
from streamcl.data import Stream
from streamcl.stream.messages import Decoder, Sample


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_produce_sends_every_row_in_order(tmp_path: Path, kafka_bootstrap: str, topic: str,
                                          read_topic: Callable, capsys, encoding: str) -> None:
    rng = np.random.default_rng(1)
    data = Stream(rng.integers(0, 256, (40, 16), dtype=np.uint8),
                  rng.integers(0, 5, 40).astype(np.int64), np.arange(40) // 20)
    data.save(tmp_path / "s.npz")
    code = main(["produce", "--data", str(tmp_path / "s.npz"), "--topic", topic,
                 "--bootstrap", kafka_bootstrap, "--encoding", encoding])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"40 messages sent to {topic}"
    decoder = Decoder((16,), dtypes=("uint8",))
    samples = [decoder.decode(r.value, r.headers) for r in read_topic(topic, 40)]
    assert all(isinstance(s, Sample) for s in samples)
    np.testing.assert_array_equal(np.stack([s.x for s in samples]), data.x)
    assert [s.y for s in samples] == data.y.tolist()
    assert [s.task for s in samples] == data.task.tolist()


def test_produce_refuses_a_bad_rate_in_one_line(tmp_path: Path, capsys) -> None:
    Stream(np.zeros((2, 4), np.uint8), np.zeros(2, np.int64)).save(tmp_path / "s.npz")
    code = main(["produce", "--data", str(tmp_path / "s.npz"), "--topic", "t",
                 "--bootstrap", "127.0.0.1:1", "--rate", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("streamcl: error: --rate")
