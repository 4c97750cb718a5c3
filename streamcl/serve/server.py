"""``streamcl serve``: one process that serves the registry's newest gated model over HTTP.

:class:`InferenceServer` puts the pieces together — :class:`~streamcl.serve.versions.ServedModels`
(the watcher that follows ``<name>.models`` and hot-swaps verified versions),
:class:`~streamcl.serve.batcher.Batcher` (one thread that runs the model on joined requests),
:class:`~streamcl.serve.app.InferenceApp` (the protocol) — and runs them under uvicorn.
:meth:`InferenceServer.run` is the command's foreground loop: SIGTERM or Ctrl-C stops taking
connections, lets requests in flight finish (up to ``grace_s``), then ends the batcher and the
watcher, so a rolling update drops nothing. :meth:`start`/:meth:`stop` run the same server on
a background thread, for tests and benchmarks.

The socket is bound before anything else starts, so a port in use fails at once with a clear
error instead of after the model loads.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import torch
import uvicorn

from streamcl.metrics.server import local_url
from streamcl.metrics.serving import ServingMetrics
from streamcl.registry.registry import PRODUCTION, ModelRegistry
from streamcl.serve.app import MAX_BODY_BYTES, InferenceApp
from streamcl.serve.batcher import Batcher
from streamcl.serve.versions import ServedModels

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn, except that a SIGTERM or SIGINT it drained for is not raised again afterwards:
    uvicorn re-raises it so the process dies of the signal, but a server that finished every
    request it had was stopped as asked, and ``streamcl serve`` exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class InferenceServer:
    """Serve ``name``'s model from ``registry`` (the version ``alias`` names) on ``host:port``.

    ``bootstrap``: follow the ``<name>.models`` announcements on that Kafka cluster
    (``client_config``: its security settings); without it the alias is polled every
    ``poll_s`` seconds. ``max_batch`` samples and ``max_wait_ms`` bound a batch (see
    :class:`Batcher`); ``keep_versions`` models stay loaded for requests that name a version;
    ``threads`` is torch's intra-op thread count for the model (1 leaves a core to the event
    loop on a small machine).
    """

    def __init__(self, registry: ModelRegistry | str, name: str, *, alias: str = PRODUCTION,
                 bootstrap: str | None = None, client_config: dict[str, Any] | None = None,
                 host: str = "0.0.0.0", port: int = 8000, max_batch: int = 64,
                 max_wait_ms: float = 0.0, keep_versions: int = 3,
                 max_body_bytes: int = MAX_BODY_BYTES, poll_s: float = 1.0,
                 threads: int | None = 1, grace_s: int = 10) -> None:
        self.registry = registry if isinstance(registry, ModelRegistry) else \
            ModelRegistry(registry)
        self.name = name
        self.host = host
        self.metrics = ServingMetrics()
        self.models = ServedModels(self.registry, alias=alias, bootstrap=bootstrap, name=name,
                                   client_config=client_config, poll_s=poll_s,
                                   keep=keep_versions, metrics=self.metrics)
        self.batcher = Batcher(max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0,
                               on_batch=self.metrics.batch)
        self.app = InferenceApp(name, self.models, self.batcher, metrics=self.metrics,
                                max_body_bytes=max_body_bytes)
        self.threads = threads
        self._config = uvicorn.Config(self.app, host=host, port=port, lifespan="off",
                                      log_config=None, access_log=False,
                                      timeout_graceful_shutdown=grace_s, timeout_keep_alive=30)
        self._server = _Uvicorn(self._config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- lifetime -------------------------------------------------------------------------------
    def _bind(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        # bound here, not by uvicorn (which logs and exits 3): a taken port raises OSError now
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it the response's two writes (head, body) meet the client's delayed ACK:
        # measured 44 ms per request instead of 0.6 ms
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((self.host, self._config.port))
        except OSError:
            self._socket.close()
            self._socket = None
            raise
        self._socket.listen(self._config.backlog)  # connections wait in the backlog from now
        self.models.start()
        self.batcher.start()

    def _close(self) -> None:
        self.batcher.stop()
        self.models.stop()
        if self._socket is not None:
            self._socket.close()

    def run(self) -> None:
        """Serve in the foreground until SIGTERM/SIGINT, then drain and stop."""
        self._bind()
        log.info("serving %r (alias %r) on %s", self.name, self.models.alias, self.url)
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._close()

    def start(self) -> InferenceServer:
        """Serve on a background thread; returns once the socket is listening (connections
        made before the loop runs wait in the backlog)."""
        self._bind()
        self._thread = threading.Thread(target=self._server.run, args=([self._socket],),
                                        name="streamcl-serve-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self._close()

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- where ------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)
