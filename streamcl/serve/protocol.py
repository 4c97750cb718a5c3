"""The Open Inference Protocol's REST messages (KServe "v2"), read and written.

A request is JSON: ``{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype",
"data" | "parameters": {"binary_data_size": n}}], "outputs"?: [{"name", "parameters"?:
{"binary_data": bool}}]}``. With the *binary tensor data* extension (what Triton's clients send
by default) the body is that JSON header followed by the raw little-endian bytes of every input
that declares ``binary_data_size``, in input order, and the header's length travels in the
``Inference-Header-Content-Length`` HTTP header. A response takes the same shape: an output is
JSON ``data`` unless the request asked for it in binary (``"binary_data": true`` on the output,
or ``"binary_data_output": true`` for all), in which case its bytes follow the JSON header.

Only what a classifier needs is accepted: FP32 and UINT8 inputs (UINT8 is read as image bytes
and scaled to [0, 1], as in training), row-major ``data`` flat or nested. Anything else is a
:class:`ProtocolError` carrying the HTTP status and one line saying what to send instead; the
server answers it as the protocol's ``{"error": "..."}``. Nothing here touches a model.

>>> req = decode_request(b'{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",'
...                      b' "data": [0.5, 1.0]}]}', None)
>>> req.inputs["input"].tolist(), req.binary_outputs
([[0.5, 1.0]], False)
>>> body, header_len = encode_response("m", "3", None, {"label": np.array([7])}, set())
>>> header_len is None, orjson.loads(body)["outputs"][0]["data"]
(True, [7])
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

#: the header that says how long the JSON part of a binary-extension body is
HEADER_LENGTH = "inference-header-content-length"

#: input datatypes accepted, and the numpy type their bytes are read as
INPUT_TYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
#: numpy types of the outputs, named as the protocol names them
OUTPUT_TYPES: dict[np.dtype, str] = {np.dtype("int64"): "INT64", np.dtype("float32"): "FP32"}


class ProtocolError(Exception):
    """A request the protocol or this model cannot take: ``status`` is the HTTP status (4xx),
    the message one line naming the field and what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InferenceRequest:
    """A decoded request: its tensors by name, the outputs asked for, and in which encoding."""

    id: str | None
    inputs: dict[str, np.ndarray]
    #: the outputs asked for, in order (``None``: every output)
    outputs: list[str] | None = None
    #: the outputs to send as binary data
    binary: set[str] = field(default_factory=set)
    #: every output in binary (the request's ``binary_data_output`` parameter)
    binary_outputs: bool = False


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def _inflate(body: bytes, encoding: str | None) -> bytes:
    """Undo a request's ``Content-Encoding`` (Triton's clients can gzip or deflate requests)."""
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            return zlib.decompress(body, wbits=16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            return zlib.decompress(body)
    except zlib.error as exc:
        raise _bad(f"the body is not valid {encoding} ({exc})") from None
    raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported; send gzip, "
                             "deflate or none")


def decode_request(body: bytes, header_length: str | None, *,
                   content_encoding: str | None = None) -> InferenceRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors)."""
    body = _inflate(body, content_encoding)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"Inference-Header-Content-Length is {header_length!r}, not a byte "
                       "count") from None
        if not 0 < n <= len(body):
            raise _bad(f"Inference-Header-Content-Length is {n} but the body has {len(body)} "
                       "bytes")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:  # orjson: 9x faster than json on a sample of 784 floats here (32 us against 280 us)
        doc = orjson.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the request is not JSON ({exc}); send the Open Inference Protocol's "
                   "inference request") from None
    if not isinstance(doc, dict):
        raise _bad("the request must be a JSON object with an 'inputs' list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, spec in enumerate(inputs):
        name, array, used = _decode_tensor(i, spec, binary[offset:])
        if name in tensors:
            raise _bad(f"inputs[{i}]: input {name!r} is given twice")
        tensors[name] = array
        offset += used
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data follow the inputs that no "
                   "input's binary_data_size accounts for")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    wanted, binary_out = None, set()
    if "outputs" in doc:
        wanted = []
        if not isinstance(doc["outputs"], list):
            raise _bad("'outputs' must be a list of {\"name\": ...}")
        for j, out in enumerate(doc["outputs"]):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise _bad(f"outputs[{j}] must be an object with a 'name'")
            p = out.get("parameters") or {}
            if p.get("classification"):
                raise _bad(f"outputs[{j}]: the classification extension is not supported; ask "
                           "for 'label' and 'probabilities'")
            wanted.append(out["name"])
            if p.get("binary_data"):
                binary_out.add(out["name"])
    request_id = doc.get("id")
    return InferenceRequest(id=None if request_id is None else str(request_id), inputs=tensors,
                            outputs=wanted, binary=binary_out,
                            binary_outputs=bool(params.get("binary_data_output")))


def _decode_tensor(i: int, spec: Any, binary: memoryview) -> tuple[str, np.ndarray, int]:
    """One input tensor; returns its name, the array, and the binary bytes it took."""
    if not isinstance(spec, dict):
        raise _bad(f"inputs[{i}] must be an object with name, shape, datatype and data")
    name, shape, dtype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str):
        raise _bad(f"inputs[{i}].name must be a string")
    if (not isinstance(shape, list) or
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers, got "
                   f"{shape!r}")
    if dtype not in INPUT_TYPES:
        raise _bad(f"input {name!r}: datatype {dtype!r} is not accepted; send FP32 or UINT8")
    np_type = INPUT_TYPES[dtype]
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != count * np_type.itemsize:
            raise _bad(f"input {name!r}: binary_data_size is {size!r}, but shape {shape} of "
                       f"{dtype} takes {count * np_type.itemsize} bytes")
        if size > len(binary):
            raise _bad(f"input {name!r}: binary_data_size {size} but only {len(binary)} bytes "
                       "of binary data are left")
        array = np.frombuffer(binary[:size], dtype=np_type).reshape(shape).copy()  # writable
        return name, array, size
    if "data" not in spec:
        raise _bad(f"input {name!r}: give 'data', or binary data with "
                   "parameters.binary_data_size")
    try:
        array = np.asarray(spec["data"], dtype=np.float64 if dtype == "FP32" else np.int64)
    except (TypeError, ValueError):
        raise _bad(f"input {name!r}: data must be a (nested) list of numbers") from None
    if array.size != count:
        raise _bad(f"input {name!r}: shape {shape} holds {count} values but data has "
                   f"{array.size}")
    if dtype == "UINT8" and array.size and (array.min() < 0 or array.max() > 255):
        raise _bad(f"input {name!r}: UINT8 data must lie in 0..255")
    with np.errstate(over="ignore"):  # a value beyond FP32's range becomes inf: refused below
        out = array.astype(np_type).reshape(shape)
    if dtype == "FP32" and not np.isfinite(out).all():
        raise _bad(f"input {name!r}: data holds a value that is not a finite FP32 number")
    return name, out, 0


def encode_response(model_name: str, version: str, request_id: str | None,
                    outputs: Mapping[str, np.ndarray],
                    binary: set[str]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when outputs follow in binary."""
    specs, chunks = [], []
    for name, array in outputs.items():
        spec: dict[str, Any] = {"name": name, "shape": list(array.shape),
                                "datatype": OUTPUT_TYPES[array.dtype]}
        if name in binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            spec["data"] = array.ravel().tolist()
        specs.append(spec)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": specs}
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
