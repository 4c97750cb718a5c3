"""A :class:`~streamcl.stream.consumer.BatchConsumer` in its own process, one batch ahead.

Why a process: consuming with kafka-python (fetch parsing, CRC checks, decoding) and training
a small model are both mostly Python, so in one process they take turns on one interpreter lock
and the service runs at roughly the *harmonic* mean of the two. In a child process the consumer
fetches, validates, dead-letters and cuts the next micro-batches while the parent trains on the
current one.

The child runs an ordinary :class:`BatchConsumer` (same group, same dead-letter topic, same
batch cutting) and streams each batch to the parent over its stdout as one frame: a JSON header
(ranges, ids, shapes, rejection codes, lag) and the raw bytes of the labels, tasks and ``x``
arrays — no pickle. The pipe is the bounded prefetch queue: when it is full the child waits (its
group heartbeats run in kafka-python's own thread). Commands go the other way on stdin as JSON
lines, one handler each (:data:`_COMMANDS`): ``seek``, ``seek_to_beginning``, ``read``,
``commit``, ``close``. A seek starts a new *epoch*; frames of an older epoch (batches cut before
the seek took effect) are dropped by the parent.

The child never imports torch (about a second of start-up, and memory, for nothing: it only
decodes and copies bytes). It assembles numpy batches
(:class:`~streamcl.stream.consumer.ArrayBatch`); the parent makes the tensors, sharing the
frame's memory.

If the parent dies (``kill -9``), the child reads end-of-file on stdin, or a broken pipe on
stdout, and exits without committing anything: the journal stays the only truth.

Replay reads (:meth:`PrefetchingConsumer.read_ranges`) stay in the parent: they are needed
before the live stream starts, and use a :class:`~streamcl.stream.consumer.RangeReader` outside
the group.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, BinaryIO

import numpy as np

from streamcl.stream.consumer import ArrayBatch, BatchConsumer, MicroBatch, RangeReader
from streamcl.stream.messages import Decoder

_FRAME = struct.Struct("<II")  # header length, payload length
_F_SETPIPE_SZ = 1031           # fcntl command (Linux): resize a pipe's buffer
PIPE_BYTES = 1 << 20           # the prefetch bound: ~40 batches of 32 784-byte samples


class ConsumerProcessError(RuntimeError):
    """The consumer process failed or exited; the message says why."""


class PrefetchingConsumer:
    """The interface of :class:`BatchConsumer` (``poll_batch``, ``seek``,
    ``seek_to_beginning``, ``commit``, ``read_ranges``, ``rejections``, ``lag``, ``close``),
    with consumption running one process ahead: a
    :class:`~streamcl.stream.sources.BatchSource` and a
    :class:`~streamcl.stream.sources.RangeSource`.

    ``batch_size`` and ``max_wait_s`` are fixed at start (the child cuts batches before they are
    asked for); ``poll_batch`` must be called with the same ``max_records``. With
    ``hold_until_seek`` the child joins the group at once but fetches nothing before the first
    seek (a recovering service: its replay gets the CPU, and the live stream starts where the
    journal ends).
    """

    def __init__(self, bootstrap: str, topic: str, group_id: str, decoder: Decoder, *,
                 batch_size: int, max_wait_s: float, cut_at_task_change: bool = False,
                 client_config: dict[str, Any] | None = None,
                 session_timeout_ms: int = 10_000, hold_until_seek: bool = False,
                 replica: tuple[int, int] | None = None) -> None:
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
                  "session_timeout_ms": session_timeout_ms, "hold_until_seek": hold_until_seek,
                  "replica": None if replica is None else list(replica)}
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
            return _batch_from_frame(header, payload).to_torch()

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
            yield _batch_from_frame(header, payload).to_torch()

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
                    ) -> tuple[dict[str, Any], bytearray] | None:
        """The next frame within ``timeout_s`` (``None`` on timeout); with ``wanted``, skip to
        the first frame of that type and raise if it does not come in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            frame = _parse_frame(self._buf)
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


# -- frames -----------------------------------------------------------------------------------
def _batch_frame(batch: ArrayBatch, kind: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A batch as a frame's header and payload arrays: labels, tasks if any, then ``x`` (each
    array starts at a multiple of its element size, so the parent's views of it are aligned)."""
    header = {"type": kind, "n": len(batch), "task": batch.task is not None,
              "dtype": batch.x.dtype.name, "shape": list(batch.x.shape),
              "ranges": {str(p): list(r) for p, r in batch.ranges.items()},
              "rejected": batch.rejected, "timestamp_ms": batch.timestamp_ms, "ids": batch.ids}
    arrays = [batch.y] if batch.task is None else [batch.y, batch.task]
    return header, [*arrays, batch.x]


def _batch_from_frame(header: dict[str, Any], payload: bytearray) -> ArrayBatch:
    """The batch of a frame, its arrays views of ``payload`` (no copy)."""
    n = header["n"]
    y = np.frombuffer(payload, np.int64, n)
    task = np.frombuffer(payload, np.int64, n, y.nbytes) if header["task"] else None
    shape = header["shape"]
    offset = y.nbytes if task is None else y.nbytes + task.nbytes
    x = np.frombuffer(payload, header["dtype"], math.prod(shape), offset).reshape(shape)
    return ArrayBatch(x, y, task, {int(p): (r[0], r[1]) for p, r in header["ranges"].items()},
                      header["rejected"], header["timestamp_ms"], header["ids"])


def _parse_frame(buf: bytearray) -> tuple[dict[str, Any], bytearray] | None:
    """Take the first whole frame off ``buf``: its header and payload (``None``: not yet)."""
    if len(buf) < _FRAME.size:
        return None
    hlen, plen = _FRAME.unpack_from(buf)
    end = _FRAME.size + hlen + plen
    if len(buf) < end:
        return None
    header = json.loads(bytes(buf[_FRAME.size:_FRAME.size + hlen]))
    payload = buf[_FRAME.size + hlen:end]  # a copy, writable: the tensors can own it
    del buf[:end]
    return header, payload


def _write_frame(out: BinaryIO, header: dict[str, Any], arrays: Iterable[np.ndarray] = ()
                 ) -> None:
    """One frame: lengths, the JSON header, then each array's bytes as they lie in memory."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = json.dumps(header).encode()
    out.write(_FRAME.pack(len(head), sum(a.nbytes for a in arrays)) + head)
    for a in arrays:
        out.write(a)  # the buffer itself, not a bytes copy of it


# -- the child process ------------------------------------------------------------------------
@dataclass
class _Child:
    """What the consumer process's commands act on."""

    start: dict[str, Any]       # the parent's "start" command: the configuration
    consumer: BatchConsumer
    out: BinaryIO               # frames to the parent
    epoch: int = 0              # of the last seek: stamped on every batch frame
    reader: RangeReader | None = None  # for "read" (journal replay), made at the first one
    closed: bool = False


def _seek(child: _Child, cmd: dict[str, Any]) -> None:
    child.epoch = cmd["epoch"]
    child.consumer.seek({int(p): o for p, o in cmd["offsets"].items()})


def _seek_to_beginning(child: _Child, cmd: dict[str, Any]) -> None:
    child.epoch = cmd["epoch"]
    offsets = child.consumer.seek_to_beginning(cmd["timeout_s"])
    _write_frame(child.out, {"type": "sought",
                             "offsets": {str(p): o for p, o in offsets.items()}})
    child.out.flush()  # the parent waits for it


def _read(child: _Child, cmd: dict[str, Any]) -> None:
    if child.reader is None:
        child.reader = RangeReader(child.start["bootstrap"], child.start["topic"],
                                   child.consumer.decoder,
                                   client_config=child.start["client_config"])
    got = child.reader.read_arrays({int(p): (r[0], r[1]) for p, r in cmd["ranges"].items()},
                                   cmd["timeout_s"])
    header, arrays = _batch_frame(got, "range")
    _write_frame(child.out, {**header, "id": cmd["id"]}, arrays)
    child.out.flush()


def _commit(child: _Child, cmd: dict[str, Any]) -> None:
    child.consumer.commit({int(p): o for p, o in cmd["offsets"].items()})


def _close(child: _Child, cmd: dict[str, Any]) -> None:
    if child.reader is not None:
        child.reader.close()
    child.consumer.close()
    _write_frame(child.out, {"type": "closed"})
    child.out.flush()
    child.closed = True


#: the parent's commands (``{"op": name, ...}`` lines on stdin) and the child's handler of each
_COMMANDS: dict[str, Callable[[_Child, dict[str, Any]], None]] = {
    "seek": _seek,
    "seek_to_beginning": _seek_to_beginning,
    "read": _read,
    "commit": _commit,
    "close": _close,
}


def _child() -> int:
    # the parent decides when this process ends (it closes stdin): a signal sent to the whole
    # process group (Ctrl-C in a terminal, torchrun stopping its workers) must let the parent
    # drain through it, not cut the input from under it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        session_timeout_ms=start["session_timeout_ms"], hold_until_seek=start["hold_until_seek"],
        replica=None if start.get("replica") is None else tuple(start["replica"]))
    child = _Child(start, consumer, out)
    _write_frame(out, {"type": "ready"})
    out.flush()
    seen = Counter[str]()
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
                handler = _COMMANDS.get(cmd["op"])
                if handler is None:
                    raise ValueError(f"unknown command {cmd['op']!r}")
                handler(child, cmd)
                if child.closed:
                    return 0
            batch = consumer.poll_arrays(start["batch_size"], start["max_wait_s"], pending)
            if batch is None:
                out.flush()
                continue
            codes = consumer.rejections - seen
            seen = Counter(consumer.rejections)
            header, arrays = _batch_frame(batch, "batch")
            header.update(epoch=child.epoch, rejected_codes=dict(codes),
                          lag={str(p): n for p, n in consumer.lag().items()})
            _write_frame(out, header, arrays)
            out.flush()
    except BrokenPipeError:
        os._exit(0)  # parent gone
    except BaseException as exc:
        with contextlib.suppress(Exception):
            _write_frame(out, {"type": "error", "error": f"{type(exc).__name__}: {exc}"})
            out.flush()
        raise


if __name__ == "__main__":
    sys.exit(_child())
