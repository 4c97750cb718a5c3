"""Serving the refreshed model: ``streamcl serve``, the Open Inference Protocol, hot reload.

Data flows one way: HTTP request -> :mod:`~streamcl.serve.protocol` (decode) ->
:mod:`~streamcl.serve.app` (route, check against the model) -> :mod:`~streamcl.serve.batcher`
(join concurrent requests, one forward pass) -> response. Beside it,
:mod:`~streamcl.serve.versions` keeps the models: the alias's version, hot-swapped by the
registry's :class:`~streamcl.registry.ModelWatcher`, and a few by number.
:mod:`~streamcl.serve.server` runs it all under uvicorn.
"""

from streamcl.serve.app import InferenceApp
from streamcl.serve.batcher import Batcher
from streamcl.serve.protocol import InferenceRequest, ProtocolError, decode_request, encode_response
from streamcl.serve.server import InferenceServer
from streamcl.serve.versions import ServedModels, VersionUnavailable

__all__ = ["Batcher", "InferenceApp", "InferenceRequest", "InferenceServer", "ProtocolError",
           "ServedModels", "VersionUnavailable", "decode_request", "encode_response"]
