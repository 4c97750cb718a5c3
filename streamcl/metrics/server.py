"""The service's HTTP side door: ``/metrics``, ``/healthz`` and ``/readyz``.

A :class:`MetricsServer` runs a standard-library ``ThreadingHTTPServer`` on a daemon thread, so
a slow scraper never stalls the learning loop and a forgotten server never keeps the process
alive. The two probes mean different things, as Kubernetes expects:

* ``/healthz`` (liveness): 200 while ``live()`` is true. A 503 means "restart me": the loop is
  wedged or dead. It must not depend on Kafka being reachable, or a broker outage would make
  every replica restart at once.
* ``/readyz`` (readiness): 200 once ``ready()`` is true, i.e. the service has caught up after
  recovery; until then 503 with a JSON reason, so no traffic or rollout waits on a replica that
  is still replaying its journal.

Requests are not logged: a scraper every few seconds and probes every second would bury the
service's own log lines.

>>> from streamcl.metrics.prometheus import ServiceMetrics
>>> import urllib.request
>>> with MetricsServer(ServiceMetrics(), "127.0.0.1", 0, live=lambda: True,
...                    ready=lambda: True) as server:
...     urllib.request.urlopen(f"{server.url}/healthz").read()
b'{"status": "ok"}'
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from streamcl.metrics.prometheus import ServiceMetrics

log = logging.getLogger(__name__)

_JSON = "application/json"


class _Server(ThreadingHTTPServer):
    daemon_threads = True        # a hung client must not block interpreter exit
    allow_reuse_address = True   # restart on the same port without waiting out TIME_WAIT


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serve ``metrics`` and the two probes on ``host:port`` (port 0: any free port).

    ``live`` and ``ready`` are called on every probe, from the server's threads, so they must
    be cheap and thread-safe (reading a flag or a timestamp). A probe callback that raises
    answers 503 with the error, rather than 500, because "cannot tell" is not healthy.
    """

    def __init__(self, metrics: ServiceMetrics, host: str = "0.0.0.0", port: int = 9100, *,
                 live: Callable[[], bool], ready: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.host = host
        self._requested_port = int(port)
        self.live = live
        self.ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> MetricsServer:
        """Bind and start serving; raises ``OSError`` at once if the port is taken."""
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        cls = _Server6 if ":" in self.host else _Server
        self._server = cls((self.host, self._requested_port), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name=f"metrics-http-{self.port}", daemon=True)
        self._thread.start()
        log.info("metrics and health endpoints on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and free the port (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the one picked when constructed with 0); needs :meth:`start`."""
        if self._server is None:
            raise RuntimeError("MetricsServer not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return local_url(self.host, self.port)

    # -- requests ---------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "streamcl-metrics"

            def do_GET(self) -> None:
                self._respond(head=False)

            def do_HEAD(self) -> None:
                self._respond(head=True)

            def _respond(self, *, head: bool) -> None:
                try:
                    status, ctype, body = owner._route(urlsplit(self.path).path,
                                                       self.headers.get("Accept", ""))
                except Exception as exc:  # never let one request kill the server thread
                    log.exception("metrics endpoint %s failed", self.path)
                    status, ctype, body = 500, _JSON, _json({"status": "error",
                                                             "reason": repr(exc)})
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                # BaseHTTPRequestHandler writes every request (and errors) to stderr
                log.debug("%s - " + format, self.address_string(), *args)

        return Handler

    def _route(self, path: str, accept: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            # the scraper's Accept header picks the format (Prometheus prefers OpenMetrics)
            encoder, ctype = choose_encoder(accept)
            return 200, ctype, encoder(self.metrics.registry)
        if path == "/healthz":
            ok, reason = _probe(self.live)
            if ok:
                return 200, _JSON, _json({"status": "ok"})
            return 503, _JSON, _json({"status": "unhealthy", "reason": reason or "not live"})
        if path == "/readyz":
            ok, reason = _probe(self.ready)
            if ok:
                return 200, _JSON, _json({"status": "ready"})
            lag = self.metrics.value("streamcl_journal_lag_entries")
            return 503, _JSON, _json({
                "status": "not ready",
                "reason": reason or "recovering: not caught up with the journal yet",
                "journal_lag_entries": None if lag is None else int(lag)})
        return 404, _JSON, _json({"status": "not found", "endpoints": ["/metrics", "/healthz",
                                                                        "/readyz"]})


def local_url(host: str, port: int) -> str:
    """Base URL to reach a server listening on ``host:port`` from this host (a wildcard host
    maps to loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _probe(check: Callable[[], bool]) -> tuple[bool, str | None]:
    try:
        return bool(check()), None
    except Exception as exc:
        return False, f"probe failed: {exc!r}"


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


__all__ = ["MetricsServer", "local_url"]
