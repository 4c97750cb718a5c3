"""The Open Inference Protocol's REST endpoints, as one small ASGI application.

Routes (``{name}`` is the one model this server serves; ``/versions/{v}`` may be added after it
to address a version by number)::

    GET  /v2/health/live                 200 {"live": true} while the process serves HTTP
    GET  /v2/health/ready                200 once a version is loaded; 400 {"ready": false, ...}
    GET  /v2                             server metadata (extensions: binary_tensor_data)
    GET  /v2/models/{name}               model metadata: inputs, outputs, versions, labels
    GET  /v2/models/{name}/ready         200 / 400, as the protocol has it
    POST /v2/models/{name}/infer         inference (JSON, or the binary tensor extension)
    GET  /metrics                        Prometheus exposition

Every error is the protocol's ``{"error": "..."}`` with a 4xx status saying whose problem it is:
400 a malformed or mismatched request, 404 an unknown model, version or route, 405 a wrong
method, 413 a body over ``max_body_bytes``, 415 an unknown content encoding; 503 only when no
version is loaded yet. A model call that fails is a 500 — a bug, which the tests look for.

Why not KServe's own model server (``kserve`` on PyPI), the well-kept implementation one would
reach for first: measured here on a no-op model it answers ~900 requests/s at 8 or 64 clients
(FastAPI and pydantic validation per request), a tenth of one single-sample call of the
benchmark MLP, so it could not reach half of the raw model's throughput; it answers every
``/versions/{v}`` route with "not supported"; its ``/v2/health/ready`` is true before any model
is loaded; and it parses the process's command line when imported. This module is the
protocol's thin layer over uvicorn, the ASGI server KServe itself runs on (measured ~8,000-10,000
requests/s here at 8-64 clients), and its conformance is tested with Triton's official client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
from prometheus_client.exposition import choose_encoder

from streamcl import __version__
from streamcl.metrics.serving import ServingMetrics
from streamcl.registry.model import InferenceModel
from streamcl.serve.batcher import Batcher
from streamcl.serve.protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response
from streamcl.serve.versions import ServedModels, VersionUnavailable

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: the input tensor's name, and the outputs a request may ask for
INPUT = "input"
OUTPUTS = ("label", "probabilities")
#: the default limit on a request body (16 MiB: ~5,000 samples of 784 FP32 features)
MAX_BODY_BYTES = 16 << 20
_JSON = b"application/json"
#: status, body, content type, extra headers
_Response = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]
_OUTCOME = {400: "bad_request", 404: "not_found", 405: "bad_request", 413: "too_large",
            415: "bad_request", 503: "unavailable"}


class _Answer(Exception):
    """Ends a request early with ``status`` and a JSON body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error"))
        self.status, self.body = status, body


def _error(status: int, message: str) -> _Answer:
    return _Answer(status, {"error": message})


class InferenceApp:
    """The ASGI application: routes, body limit, decoding, batching, encoding, metrics."""

    def __init__(self, name: str, models: ServedModels, batcher: Batcher, *,
                 metrics: ServingMetrics | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.name = name
        self.models = models
        self.batcher = batcher
        self.metrics = metrics or models.metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        start = time.perf_counter()
        served = {"version": "none"}  # the version that answered, once the request picked one
        headers: list[tuple[bytes, bytes]] = []
        try:
            status, body, ctype, headers = await self._route(scope, receive, served)
        except _Answer as answer:
            status, body, ctype = answer.status, json.dumps(answer.body).encode(), _JSON
        except ProtocolError as exc:
            status, body, ctype = exc.status, json.dumps({"error": str(exc)}).encode(), _JSON
        except Exception as exc:  # a bug: answered in the protocol's shape, logged in full
            log.exception("%s %s failed", scope["method"], scope["path"])
            status, ctype = 500, _JSON
            body = json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}).encode()
        if scope["path"].endswith("/infer"):
            outcome = "ok" if status == 200 else _OUTCOME.get(status, "error")
            self.metrics.request(served["version"], outcome, time.perf_counter() - start)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: Receive, served: dict[str, str]
                     ) -> _Response:
        method, parts = scope["method"], scope["path"].strip("/").split("/")
        if parts == ["metrics"]:
            self._method(method, "GET")
            encoder, ctype = choose_encoder(_header(scope, b"accept") or "")
            return 200, encoder(self.metrics.registry), ctype.encode(), []
        if not parts or parts[0] != "v2":
            raise _error(404, f"no endpoint {scope['path']}; the Open Inference Protocol's "
                              "endpoints are under /v2")
        rest = parts[1:]
        if rest == []:
            self._method(method, "GET")
            return self._json(200, {"name": "streamcl", "version": __version__,
                                    "extensions": ["binary_tensor_data"]})
        if rest == ["health", "live"]:
            self._method(method, "GET")
            return self._json(200, {"live": True})
        if rest == ["health", "ready"]:
            self._method(method, "GET")
            return self._ready()
        if len(rest) < 2 or rest[0] != "models":
            raise _error(404, f"no endpoint {scope['path']}")
        if rest[1] != self.name:
            raise _error(404, f"unknown model {rest[1]!r}: this server serves {self.name!r}")
        tail = rest[2:]
        pinned: int | None = None
        if tail[:1] == ["versions"]:
            if len(tail) < 2:
                raise _error(404, f"no endpoint {scope['path']}: give /versions/<number>")
            pinned = _version_number(tail[1])
            tail = tail[2:]
        if tail == []:
            self._method(method, "GET")
            model = await self._model(pinned)
            return self._json(200, self._metadata(model))
        if tail == ["ready"]:
            self._method(method, "GET")
            if pinned is None:
                return self._ready()
            await self._model(pinned)
            return self._json(200, {"name": self.name, "ready": True})
        if tail == ["infer"]:
            self._method(method, "POST")
            return await self._infer(scope, receive, pinned, served)
        raise _error(404, f"no endpoint {scope['path']}")

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise _error(405, f"{method} is not allowed here; use {allowed}")

    @staticmethod
    def _json(status: int, doc: dict[str, Any]
              ) -> _Response:
        return status, json.dumps(doc).encode(), _JSON, []

    def _ready(self) -> _Response:
        if self.models.current is not None:
            return self._json(200, {"ready": True})
        return self._json(400, {"ready": False, "error": self.models.waiting_for or
                                "no version loaded yet"})

    async def _model(self, pinned: int | None) -> InferenceModel:
        """The model a request addresses: the alias's current one, or a version by number."""
        if pinned is None:
            model = self.models.current
            if model is None:
                raise _error(503, f"model {self.name!r} is not ready: "
                                  f"{self.models.waiting_for or 'no version loaded yet'}")
            return model
        kept = self.models.peek(pinned)
        if kept is not None:
            return kept
        try:  # a load (read, verify, rebuild) is off the event loop
            return await asyncio.to_thread(self.models.get, pinned)
        except VersionUnavailable as exc:
            raise _error(404, str(exc)) from None

    def _metadata(self, model: InferenceModel) -> dict[str, Any]:
        shape = [-1, *model.input_shape]
        return {
            "name": self.name,
            "versions": [str(v) for v in self.models.loaded_versions()],
            "platform": "streamcl_pytorch",
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": shape}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, model.n_classes]}],
            "parameters": {"version": str(model.version), "labels": model.labels,
                           "accepted_input_datatypes": ["FP32", "UINT8"],
                           "alias": self.models.alias},
        }

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _error(413, f"the body has {int(declared)} bytes, over the limit of "
                              f"{self.max_body_bytes}; send fewer samples per request")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _error(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _error(413, f"the body is over the limit of {self.max_body_bytes} bytes; "
                                  "send fewer samples per request")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _infer(self, scope: Scope, receive: Receive, pinned: int | None,
                     served: dict[str, str]) -> _Response:
        body = await self._body(scope, receive)
        request = decode_request(body, _header(scope, HEADER_LENGTH.encode()),
                                 content_encoding=_header(scope, b"content-encoding"))
        model = await self._model(pinned)
        version = served["version"] = str(model.version)
        x = self._input(request.inputs, model)
        wanted = request.outputs if request.outputs is not None else list(OUTPUTS)
        unknown = [o for o in wanted if o not in OUTPUTS]
        if unknown:
            raise _error(400, f"unknown output {unknown[0]!r}; this model's outputs are "
                              f"{', '.join(OUTPUTS)}")
        if len(x):
            labels, probs = await self.batcher.submit(model, x)
        else:
            labels = np.zeros(0, np.int64)
            probs = np.zeros((0, model.n_classes), np.float32)
        values = {"label": labels.astype(np.int64, copy=False),
                  "probabilities": probs.astype(np.float32, copy=False)}
        binary = set(wanted) if request.binary_outputs else request.binary & set(wanted)
        out, header_len = encode_response(self.name, version, request.id,
                                          {o: values[o] for o in wanted}, binary)
        if header_len is None:
            return 200, out, _JSON, []
        return (200, out, b"application/octet-stream",
                [(HEADER_LENGTH.encode(), str(header_len).encode())])

    @staticmethod
    def _input(inputs: dict[str, np.ndarray], model: InferenceModel) -> np.ndarray:
        expected = [-1, *model.input_shape]
        if set(inputs) != {INPUT}:
            raise _error(400, f"this model takes one input named {INPUT!r} of shape "
                              f"{expected}; got {sorted(inputs)}")
        x = inputs[INPUT]
        if x.ndim != len(expected) or tuple(x.shape[1:]) != model.input_shape:
            raise _error(400, f"input {INPUT!r} has shape {list(x.shape)}; this model takes "
                              f"{expected} (a batch of samples of shape "
                              f"{list(model.input_shape)})")
        return x


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _version_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _error(400, f"version {text!r} is not a version number (1, 2, ...)")
    return int(text)
