"""A :class:`~streamcl.stream.consumer.BatchConsumer` in its own process, one batch ahead.

Why a process: consuming with kafka-python (fetch parsing, CRC checks, decoding) and training
a small model are both mostly Python, so in one process they take turns on one interpreter lock
and the service runs at roughly the *harmonic* mean of the two. In a child process the consumer
fetches, validates, dead-letters and cuts the next micro-batches while the parent trains on the
current one.

The child runs an ordinary :class:`BatchConsumer` (same group, same dead-letter topic, same
batch cutting) and streams each batch to the parent over its stdout as one frame: a JSON header
(ranges, labels, tasks, ids, rejection codes, lag) and the raw bytes of ``x`` — no pickle. The
pipe is the bounded prefetch queue: when it is full the child waits (its group heartbeats run
in kafka-python's own thread). Commands go the other way on stdin as JSON lines: ``seek``,
``seek_to_beginning``, ``commit``, ``close``. A seek starts a new *epoch*; frames of an older
epoch (batches cut before the seek took effect) are dropped by the parent.

If the parent dies (``kill -9``), the child reads end-of-file on stdin, or a broken pipe on
stdout, and exits without committing anything: the journal stays the only truth.

Replay reads (:meth:`PrefetchingConsumer.read_ranges`) stay in the parent: they are needed
before the live stream starts, and use a :class:`~streamcl.stream.consumer.RangeReader` outside
the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import IO, Any

import numpy as np
import torch

from streamcl.stream.consumer import BatchConsumer, MicroBatch, RangeReader
from streamcl.stream.messages import Decoder

_FRAME = struct.Struct("<II")  # header length, payload length
_F_SETPIPE_SZ = 1031           # fcntl command (Linux): resize a pipe's buffer
PIPE_BYTES = 1 << 20           # the prefetch bound: ~40 batches of 32 784-byte samples


class ConsumerProcessError(RuntimeError):
    """The consumer process failed or exited; the message says why."""


class PrefetchingConsumer:
    """The interface of :class:`BatchConsumer` (``poll_batch``, ``seek``,
    ``seek_to_beginning``, ``commit``, ``read_ranges``, ``rejections``, ``lag``, ``close``),
    with consumption running one process ahead.

    ``batch_size`` and ``max_wait_s`` are fixed at start (the child cuts batches before they are
    asked for); ``poll_batch`` must be called with the same ``max_records``. With
    ``hold_until_seek`` the child joins the group at once but fetches nothing before the first
    seek (a recovering service: its replay gets the CPU, and the live stream starts where the
    journal ends).
    """

    def __init__(self, bootstrap: str, topic: str, group_id: str, decoder: Decoder, *,
                 batch_size: int, max_wait_s: float, cut_at_task_change: bool = False,
                 client_config: dict[str, Any] | None = None,
                 session_timeout_ms: int = 10_000, hold_until_seek: bool = False) -> None:
        self.bootstrap, self.topic, self.decoder = bootstrap, topic, decoder
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.client_config = dict(client_config or {})
        #: rejected messages seen by the live stream, by reason code
        self.rejections: Counter[str] = Counter()
        self._lag: dict[int, int] = {}
        self._epoch = 0
        self._buf = bytearray()
        self._replay: RangeReader | None = None
        self._closed = False
        config = {"bootstrap": bootstrap, "topic": topic, "group_id": group_id,
                  "decoder": decoder.spec(), "batch_size": batch_size, "max_wait_s": max_wait_s,
                  "cut_at_task_change": cut_at_task_change, "client_config": self.client_config,
                  "session_timeout_ms": session_timeout_ms, "hold_until_seek": hold_until_seek}
        # the config (it may hold credentials) goes on stdin, not on the command line
        # one thread for the child's numeric libraries: it decodes and copies, and an OpenMP
        # pool there would spin on the core the trainer counts on (streamcl.threads)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._proc = subprocess.Popen([sys.executable, "-m", "streamcl.stream.prefetch"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                      env=env)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._fd = self._proc.stdout.fileno()
        # not waiting for the child's "ready": its start (imports, group join) overlaps with
        # the parent's recovery; a child that fails to start reports it at the first poll
        self._send({"op": "start", **config})

    # -- the live stream ------------------------------------------------------------------
    def poll_batch(self, max_records: int, max_wait_s: float) -> MicroBatch | None:
        """The next prefetched micro-batch, or ``None`` if none arrives within ``max_wait_s``."""
        if max_records != self.batch_size:
            raise ValueError(f"this consumer cuts batches of {self.batch_size}, "
                             f"asked for {max_records}")
        deadline = time.monotonic() + max_wait_s
        while True:
            frame = self._next_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                return None
            header, payload = frame
            if header["type"] != "batch" or header["epoch"] != self._epoch:
                continue  # cut before the last seek took effect
            self.rejections.update(header["rejected_codes"])
            self._lag = {int(p): n for p, n in header["lag"].items()}
            return _batch_from_frame(header, payload, self.decoder)

    def lag(self) -> dict[int, int]:
        """Messages behind each partition's end, as of the newest batch received."""
        return dict(self._lag)

    def seek(self, offsets: dict[int, int]) -> None:
        """Continue at these next-offsets; batches already prefetched are dropped."""
        self._epoch += 1
        self._send({"op": "seek", "epoch": self._epoch,
                    "offsets": {str(p): o for p, o in offsets.items()}})

    def seek_to_beginning(self, timeout_s: float = 30.0) -> dict[int, int]:
        """Continue at each partition's log start; returns the offsets sought."""
        self._epoch += 1
        self._send({"op": "seek_to_beginning", "epoch": self._epoch, "timeout_s": timeout_s})
        header, _ = self._next_frame(timeout_s + 10, wanted="sought")
        return {int(p): o for p, o in header["offsets"].items()}

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit next-offsets in the group (asynchronously: the journal is the truth)."""
        self._send({"op": "commit", "offsets": {str(p): o for p, o in offsets.items()}})

    def read_many(self, many: Iterable[dict[int, tuple[int, int]]],
                  timeout_s: float = 30.0) -> Iterator[MicroBatch]:
        """The batches of these offset ranges, in order, read by the child process while this
        one trains on the previous ones (journal replay at the speed of training)."""
        requests = list(many)
        for k, ranges in enumerate(requests):
            self._send({"op": "read", "id": k, "timeout_s": timeout_s,
                        "ranges": {str(p): list(r) for p, r in ranges.items()}})
        for k in range(len(requests)):
            header, payload = self._next_frame(timeout_s + 10, wanted="range")
            if header["id"] != k:
                raise ConsumerProcessError(f"replay read {header['id']} came before {k}")
            yield _batch_from_frame(header, payload, self.decoder)

    def read_ranges(self, ranges: dict[int, tuple[int, int]],
                    timeout_s: float = 30.0) -> MicroBatch:
        """Rebuild the batch of these offset ranges (journal replay), in this process."""
        if self._replay is None:
            self._replay = RangeReader(self.bootstrap, self.topic, self.decoder,
                                       client_config=self.client_config)
        return self._replay.read_ranges(ranges, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Commit what was asked, leave the group, stop the child (killed after timeout_s)."""
        if self._closed:
            return
        self._closed = True
        if self._replay is not None:
            self._replay.close()
        try:
            self._send({"op": "close"})
            self._stdin.close()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:  # drain until the child says it is done
                frame = self._next_frame(deadline - time.monotonic())
                if frame is None or frame[0]["type"] == "closed":
                    break
        except ConsumerProcessError:
            pass  # it is gone already
        finally:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()  # type: ignore[union-attr]

    def __enter__(self) -> PrefetchingConsumer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- framing ----------------------------------------------------------------------------
    def _send(self, command: dict[str, Any]) -> None:
        try:
            self._stdin.write(json.dumps(command).encode() + b"\n")
        except (BrokenPipeError, ValueError) as exc:
            raise ConsumerProcessError(f"consumer process is gone (exit code "
                                       f"{self._proc.poll()})") from exc

    def _next_frame(self, timeout_s: float, wanted: str | None = None
                    ) -> tuple[dict[str, Any], bytes] | None:
        """The next frame within ``timeout_s`` (``None`` on timeout); with ``wanted``, skip to
        the first frame of that type and raise if it does not come in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            frame = self._parse()
            if frame is not None:
                if frame[0]["type"] == "error":
                    raise ConsumerProcessError(f"consumer process failed: {frame[0]['error']}")
                if wanted is None or frame[0]["type"] == wanted:
                    return frame
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if wanted is not None:
                    raise ConsumerProcessError(f"consumer process sent no {wanted!r} within "
                                               f"{timeout_s:g} s")
                return None
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 1 << 20)
                if not chunk:
                    raise ConsumerProcessError(f"consumer process exited (code "
                                               f"{self._proc.wait()})")
                self._buf += chunk

    def _parse(self) -> tuple[dict[str, Any], bytearray] | None:
        if len(self._buf) < _FRAME.size:
            return None
        hlen, plen = _FRAME.unpack_from(self._buf)
        end = _FRAME.size + hlen + plen
        if len(self._buf) < end:
            return None
        header = json.loads(bytes(self._buf[_FRAME.size:_FRAME.size + hlen]))
        payload = self._buf[_FRAME.size + hlen:end]  # a copy, writable: torch can own it
        del self._buf[:end]
        return header, payload


def _batch_from_frame(header: dict[str, Any], payload: bytearray,
                      decoder: Decoder) -> MicroBatch:
    shape = header["shape"]
    if shape[0]:
        x = torch.from_numpy(np.frombuffer(payload, dtype=header["dtype"]).reshape(shape))
    else:
        x = torch.empty((0, *decoder.input_shape), dtype=torch.float32)
    task = header["task"]
    return MicroBatch(x, torch.tensor(header["y"], dtype=torch.long),
                      None if task is None else torch.tensor(task, dtype=torch.long),
                      {int(p): (r[0], r[1]) for p, r in header["ranges"].items()},
                      header["rejected"], header["timestamp_ms"], header["ids"])


def _batch_frame(batch: MicroBatch, kind: str) -> tuple[dict[str, Any], bytes]:
    x = batch.x.numpy()
    return {"type": kind, "dtype": x.dtype.name, "shape": list(x.shape), "y": batch.y.tolist(),
            "task": None if batch.task is None else batch.task.tolist(),
            "ranges": {str(p): list(r) for p, r in batch.ranges.items()},
            "rejected": batch.rejected, "timestamp_ms": batch.timestamp_ms,
            "ids": batch.ids}, x.tobytes()


def _frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return _FRAME.pack(len(head), len(payload)) + head + payload


# -- the child process ------------------------------------------------------------------------
def _child() -> int:
    out = sys.stdout.buffer
    with contextlib.suppress(OSError):
        import fcntl

        fcntl.fcntl(out.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
    commands: queue.Queue[dict[str, Any] | None] = queue.Queue()
    pending = threading.Event()  # a command waits: end the current poll early

    def read_commands() -> None:
        for line in sys.stdin.buffer:
            commands.put(json.loads(line))
            pending.set()
        commands.put(None)  # end of file: the parent is gone or closing
        pending.set()

    start = json.loads(sys.stdin.buffer.readline())
    threading.Thread(target=read_commands, daemon=True).start()
    consumer = BatchConsumer(
        start["bootstrap"], start["topic"], start["group_id"], Decoder(**start["decoder"]),
        cut_at_task_change=start["cut_at_task_change"], client_config=start["client_config"],
        session_timeout_ms=start["session_timeout_ms"], hold_until_seek=start["hold_until_seek"])
    out.write(_frame({"type": "ready"}))
    out.flush()
    epoch, seen = 0, Counter[str]()
    reader: RangeReader | None = None
    try:
        while True:
            pending.clear()
            while True:  # apply every pending command before cutting the next batch
                try:
                    cmd = commands.get_nowait()
                except queue.Empty:
                    break
                if cmd is None:
                    os._exit(0)  # parent gone: leave without committing anything
                op = cmd["op"]
                if op == "seek":
                    epoch = cmd["epoch"]
                    consumer.seek({int(p): o for p, o in cmd["offsets"].items()})
                elif op == "seek_to_beginning":
                    epoch = cmd["epoch"]
                    offsets = consumer.seek_to_beginning(cmd["timeout_s"])
                    out.write(_frame({"type": "sought",
                                      "offsets": {str(p): o for p, o in offsets.items()}}))
                elif op == "read":
                    if reader is None:
                        reader = RangeReader(start["bootstrap"], start["topic"],
                                             consumer.decoder,
                                             client_config=start["client_config"])
                    got = reader.read_ranges({int(p): (r[0], r[1])
                                              for p, r in cmd["ranges"].items()},
                                             cmd["timeout_s"])
                    header, data = _batch_frame(got, "range")
                    out.write(_frame({**header, "id": cmd["id"]}, data))
                    out.flush()
                elif op == "commit":
                    consumer.commit({int(p): o for p, o in cmd["offsets"].items()})
                elif op == "close":
                    if reader is not None:
                        reader.close()
                    consumer.close()
                    out.write(_frame({"type": "closed"}))
                    out.flush()
                    return 0
            batch = consumer.poll_batch(start["batch_size"], start["max_wait_s"], pending)
            if batch is None:
                out.flush()
                continue
            codes = consumer.rejections - seen
            seen = Counter(consumer.rejections)
            header, data = _batch_frame(batch, "batch")
            header.update(epoch=epoch, rejected_codes=dict(codes),
                          lag={str(p): n for p, n in consumer.lag().items()})
            out.write(_frame(header, data))
            out.flush()
    except BrokenPipeError:
        os._exit(0)  # parent gone
    except BaseException as exc:
        with contextlib.suppress(Exception):
            out.write(_frame({"type": "error", "error": f"{type(exc).__name__}: {exc}"}))
            out.flush()
        raise


if __name__ == "__main__":
    sys.exit(_child())
