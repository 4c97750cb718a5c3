"""A TCP proxy that can cut the network between clients and a broker, for outage tests.

The broker stays up (and keeps its in-memory log); the proxy plays the network. The broker
advertises the proxy's address (``EmbeddedBroker(advertised=...)``), so every client connection,
bootstrap and partition leader alike, goes through it. ``cut()`` refuses new connections and
resets the open ones, as a partition or a dead host would; ``restore()`` listens again on the
same port. Used by tests/stream/test_outage.py and bench/outage.py.

>>> with Proxy(("127.0.0.1", 9)) as proxy:
...     proxy.cut(); proxy.restore()
...     proxy.port > 0
True
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from types import TracebackType


class Proxy:
    """Forward ``127.0.0.1:port`` to ``target`` until :meth:`cut`; again after :meth:`restore`."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self._listener: socket.socket | None = None
        self.port = port
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="netproxy", daemon=True)
        self._thread.start()
        self.restore()

    def restore(self) -> None:
        """Listen (again) on :attr:`port`."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock
            self._selector.register(sock, selectors.EVENT_READ, "accept")
        self._wake()

    def cut(self) -> None:
        """Stop listening and reset every open connection (RST, not a polite FIN)."""
        with self._lock:
            if self._listener is not None:
                self._selector.unregister(self._listener)
                self._listener.close()
                self._listener = None
            pairs, self._pairs = self._pairs, set()
            for a, b in pairs:
                for sock in (a, b):
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(sock)
                    _reset(sock)
        self._wake()

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def close(self) -> None:
        self.cut()
        self._closed = True
        self._wake()
        self._thread.join(5)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=1.0):
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif key.data == "accept":
                    self._accept(key.fileobj)  # type: ignore[arg-type]
                else:
                    self._pump(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket) -> None:
        with self._lock:
            if listener is not self._listener:
                return
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                return
            for sock in (client, upstream):
                sock.setblocking(True)
                sock.settimeout(None)
            pair = (client, upstream)
            self._pairs.add(pair)
            self._selector.register(client, selectors.EVENT_READ, (upstream, pair))
            self._selector.register(upstream, selectors.EVENT_READ, (client, pair))

    def _pump(self, source: socket.socket, data: tuple[socket.socket, tuple]) -> None:
        sink, pair = data
        try:
            chunk = source.recv(65536)
            if chunk:
                sink.sendall(chunk)
                return
        except OSError:
            pass
        with self._lock:  # one side closed: close both
            if pair in self._pairs:
                self._pairs.discard(pair)
                for sock in pair:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(sock)
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (linger 0): the peer sees "connection reset", as when a host dies."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
