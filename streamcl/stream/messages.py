"""The sample message: its schema, two wire encodings, and a decoder that never raises.

A topic carries one labelled sample per message, in either encoding:

* **JSON**, easy to produce from anything: the value is
  ``{"x": [...], "y": 3, "id": "...", "ts": 1700000000.0, "task": 2}``; ``x`` is a flat list or
  nested lists matching the input shape; ``id``, ``ts`` (producer time, seconds since the
  epoch) and ``task`` are optional. An optional ``"dtype"`` (e.g. ``"uint8"``) says how to read
  ``x``: uint8 inputs are image bytes that the trainer scales to [0, 1], so a JSON producer of
  image data must say so or its samples would be read as unscaled floats. :func:`encode_json`
  always writes it.
* **binary**, for speed: the value is ``x``'s raw little-endian bytes (C order), described by the
  Kafka headers ``streamcl-dtype`` (``b"uint8"``), ``streamcl-shape`` (``b"784"`` or
  ``b"1,28,28"``), ``streamcl-y`` (``b"3"``) and optionally ``streamcl-task``, ``streamcl-id``,
  ``streamcl-ts``. Decoding is one ``numpy.frombuffer``, with no per-element Python.

:class:`Decoder` turns ``(value, headers)`` into a :class:`Sample` or a :class:`Rejection` whose
``reason`` starts with a short code from :data:`REASONS` (``"bad_shape: expected (784,), got
(783,)"``). It never raises on message content: a streaming learner must survive anything a
producer sends, and the reason goes with the message to the dead-letter topic. With
``encoding="auto"`` (the default) a message with a ``streamcl-dtype`` header is binary, any other
is JSON, so one topic may carry both.

>>> import numpy as np
>>> decoder = Decoder((4,), dtypes=("uint8",))
>>> value, headers = encode_binary(np.arange(4, dtype=np.uint8), 3, task=1)
>>> sample = decoder.decode(value, headers)
>>> sample.x.tolist(), sample.y, sample.task
([0, 1, 2, 3], 3, 1)
>>> decoder.decode(b'{"x": [1, 2, 3], "y": 3}')
Rejection(reason='bad_shape: expected (4,), got (3,)')
>>> decoder.decode(b'{"x": [1, 2, 3, 4], "y": 2.5}').code
'bad_label'
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

H_DTYPE = "streamcl-dtype"
H_SHAPE = "streamcl-shape"
H_Y = "streamcl-y"
H_TASK = "streamcl-task"
H_ID = "streamcl-id"
H_TS = "streamcl-ts"

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

#: Rejection codes (the part of ``Rejection.reason`` before the colon) and what they mean.
REASONS: dict[str, str] = {
    "oversize": "the value is larger than the decoder's max_bytes",
    "empty": "the message has no value (a tombstone)",
    "bad_header": "the Kafka headers are not (name, bytes) pairs",
    "bad_json": "the value is not UTF-8 JSON text",
    "bad_schema": "the JSON is not an object with an x field",
    "bad_shape": "x does not have the configured input shape, or its bytes do not match it",
    "bad_dtype": "x's element type is missing, not accepted, or its values do not fit it",
    "non_finite": "x holds NaN or infinite values, or values that overflow float32 (the "
                  "training dtype)",
    "bad_label": "y is missing or not an integer >= 0",
    "bad_task": "task is not an integer",
    "bad_meta": "id is not a string (of valid Unicode), or ts is not a finite number",
    "undecodable": "an unexpected failure while decoding (a bug: please report it)",
    # not the decoder's: the learner refuses it (a function of its state), the service sends it
    "label_cap": "y is a new label and the head already has learner.max_classes classes",
}

Encoding = Literal["auto", "json", "binary"]

@dataclass(frozen=True, slots=True)
class Sample:
    """One valid sample. ``x`` has the decoder's input shape; from a binary message it is a
    read-only view of the message bytes (copy it before writing to it)."""

    x: np.ndarray
    y: int
    task: int | None = None
    id: str | None = None
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message cannot be used: ``"code: detail"``, the code one of :data:`REASONS`."""

    reason: str

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


class _Reject(Exception):
    """Internal control flow: raised by the parsers, turned into a Rejection by decode()."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


# -- encoding -----------------------------------------------------------------------------------

def encode_json(x: np.ndarray, y: int, *, id: str | None = None, ts: float | None = None,
                task: int | None = None) -> bytes:
    """One sample as a JSON message value (``x`` nested as its shape, plus its ``dtype``).

    >>> encode_json(np.array([1, 2], dtype=np.uint8), 3, task=0)
    b'{"x":[1,2],"y":3,"dtype":"uint8","task":0}'
    """
    x = _numeric(x)
    obj: dict[str, Any] = {"x": x.tolist(), "y": _label(y), "dtype": x.dtype.name}
    if id is not None:
        obj["id"] = str(id)
    if ts is not None:
        obj["ts"] = float(ts)
    if task is not None:
        obj["task"] = operator.index(task)
    # allow_nan=False: NaN is not JSON; better to fail in the producer than in the DLQ
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def encode_binary(x: np.ndarray, y: int, *, id: str | None = None, ts: float | None = None,
                  task: int | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """One sample as ``(value, headers)``: ``x``'s little-endian C-order bytes and its metadata.

    >>> encode_binary(np.zeros((1, 2), dtype=np.float32), 7)
    (b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00', [('streamcl-dtype', b'float32'), \
('streamcl-shape', b'1,2'), ('streamcl-y', b'7')])
    """
    x = _numeric(x)
    value = x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
    headers = [(H_DTYPE, x.dtype.name.encode()),
               (H_SHAPE, ",".join(map(str, x.shape)).encode()),
               (H_Y, b"%d" % _label(y))]
    if task is not None:
        headers.append((H_TASK, b"%d" % operator.index(task)))
    if id is not None:
        headers.append((H_ID, str(id).encode()))
    if ts is not None:
        headers.append((H_TS, repr(float(ts)).encode()))
    return value, headers


def _numeric(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "uif":
        raise ValueError(f"x must be a numeric array, got dtype {x.dtype}")
    return x


def _label(y: Any) -> int:
    y = operator.index(y)  # TypeError for 2.5: a float label is a producer bug
    if not 0 <= y <= INT64_MAX:
        raise ValueError(f"y must be an integer >= 0, got {y}")
    return y


# -- decoding -----------------------------------------------------------------------------------

class Decoder:
    """Validate messages against one input shape and a set of accepted element types.

    ``dtypes`` are the element types a binary message (or a JSON message's ``"dtype"``) may
    declare; ``json_dtype`` is how a JSON ``x`` without ``"dtype"`` is read (default: float32
    when accepted, else the first accepted type). ``max_bytes`` bounds a message's value before
    anything is parsed, so one huge message cannot exhaust memory. ``encoding`` forces one
    encoding instead of choosing by the ``streamcl-dtype`` header.
    """

    def __init__(self, input_shape: Sequence[int], *,
                 dtypes: Iterable[str] = ("uint8", "float32", "float64"),
                 json_dtype: str | None = None, max_bytes: int = 1 << 20,
                 encoding: Encoding = "auto") -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        if not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be non-empty positive sizes, got {input_shape}")
        self.size = math.prod(self.input_shape)
        self.dtypes: dict[str, np.dtype] = {}
        for name in dtypes:
            dt = np.dtype(name)
            if dt.kind not in "uif":
                raise ValueError(f"dtype {name!r} is not numeric")
            self.dtypes[dt.name] = dt.newbyteorder("<")
        if not self.dtypes:
            raise ValueError("dtypes must name at least one element type")
        if json_dtype is None:
            json_dtype = "float32" if "float32" in self.dtypes else next(iter(self.dtypes))
        if np.dtype(json_dtype).name not in self.dtypes:
            raise ValueError(f"json_dtype {json_dtype!r} is not among dtypes {list(self.dtypes)}")
        self.json_dtype = self.dtypes[np.dtype(json_dtype).name]
        if encoding not in ("auto", "json", "binary"):
            raise ValueError(f"encoding must be auto, json or binary, got {encoding!r}")
        self.encoding = encoding
        self.max_bytes = int(max_bytes)
        self._accepted = ", ".join(self.dtypes)
        self._dtype_by_bytes = {name.encode(): dt for name, dt in self.dtypes.items()}
        self._shape_bytes = {",".join(map(str, self.input_shape)).encode(),
                             str(self.size).encode()}

    def spec(self) -> dict[str, Any]:
        """The constructor's arguments as JSON: ``Decoder(**d.spec())`` decodes the same way
        (how the prefetching consumer process gets its decoder without pickle)."""
        return {"input_shape": list(self.input_shape), "dtypes": list(self.dtypes),
                "json_dtype": self.json_dtype.name, "max_bytes": self.max_bytes,
                "encoding": self.encoding}

    def decode(self, value: bytes | None,
               headers: Sequence[tuple[str, bytes | None]] | None = None) -> Sample | Rejection:
        """Decode one message; return a :class:`Rejection` rather than raise, whatever it holds."""
        try:
            if value is None:
                return Rejection("empty: message has no value")
            if len(value) > self.max_bytes:
                return Rejection(f"oversize: {len(value)} bytes > max {self.max_bytes}")
            hdr = _header_map(headers)
            if self.encoding == "binary" or (self.encoding == "auto" and H_DTYPE in hdr):
                return self._binary(value, hdr)
            return self._json(value)
        except _Reject as rej:
            return Rejection(rej.reason)
        except Exception as exc:  # a safety net: one message must never stop the stream
            return Rejection(f"undecodable: {type(exc).__name__}: {_clip(str(exc))}")

    # -- binary -------------------------------------------------------------------------------
    def _binary(self, value: bytes, hdr: dict[str, Any]) -> Sample:
        # Fast path: well-formed headers are looked up as raw bytes (no decoding, no parsing);
        # anything else goes through the slow parsers, which also word the rejection.
        raw = hdr.get(H_DTYPE)
        dt = self._dtype_by_bytes.get(raw) if type(raw) is bytes else None
        if dt is None:
            dt = self._binary_dtype(hdr)
        raw = hdr.get(H_SHAPE)
        if type(raw) is not bytes or raw not in self._shape_bytes:
            self._check_shape(_parse_shape(_header_text(hdr, H_SHAPE, "bad_shape")))
        need = self.size * dt.itemsize
        if len(value) != need:
            raise _Reject(f"bad_shape: value has {len(value)} bytes, "
                          f"{dt.name} x of shape {self.input_shape} needs {need}")
        x = np.frombuffer(value, dtype=dt).reshape(self.input_shape)
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if dt.kind == "f":
            if not np.isfinite(x).all():
                raise _Reject("non_finite: x has NaN or inf")
            _check_float32(x)
        raw = hdr.get(H_Y)
        if type(raw) is bytes and raw.isdigit() and len(raw) < 19:
            y = int(raw)
        else:
            text = _header_text(hdr, H_Y, "bad_label")
            if text is None:
                raise _Reject("bad_label: y missing")
            y = _parse_int(text, "bad_label", "y must be a non-negative integer", signed=False)
        task = sid = ts = None
        if len(hdr) > 3:  # the optional headers (or foreign ones)
            task_text = _header_text(hdr, H_TASK, "bad_task")
            if task_text is not None:
                task = _parse_int(task_text, "bad_task", "task must be an integer", signed=True)
            sid = _header_text(hdr, H_ID, "bad_meta", encoding="utf-8")
            ts_text = _header_text(hdr, H_TS, "bad_meta")
            ts = None if ts_text is None else _parse_ts(ts_text)
        return Sample(x, y, task, sid, ts)

    def _binary_dtype(self, hdr: dict[str, Any]) -> np.dtype:
        name = _header_text(hdr, H_DTYPE, "bad_dtype")
        if name is None:
            raise _Reject(f"bad_dtype: header {H_DTYPE} missing")
        dt = self.dtypes.get(name.strip())
        if dt is None:
            raise _Reject(f"bad_dtype: {_clip(name)!r} not accepted (accepted: {self._accepted})")
        return dt

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if shape != self.input_shape and shape != (self.size,):
            raise _Reject(f"bad_shape: expected {self.input_shape}, got {shape}")

    # -- JSON ---------------------------------------------------------------------------------
    def _json(self, value: bytes) -> Sample:
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Reject(f"bad_json: {exc.msg} at {exc.lineno}:{exc.colno}") from None
        except UnicodeDecodeError:
            raise _Reject("bad_json: value is not UTF-8 text") from None
        except RecursionError:
            raise _Reject("bad_json: nested too deeply") from None
        if not isinstance(obj, dict):
            raise _Reject(f"bad_schema: expected a JSON object, got {type(obj).__name__}")
        from streamcl.stream.schema import (  # at the first JSON message
            SampleMessage,
            ValidationError,
            schema_reason,
        )

        try:
            msg = SampleMessage.model_validate(obj)
        except ValidationError as exc:
            raise _Reject(schema_reason(exc)) from None
        if msg.id is not None and not msg.id.isascii():
            try:  # JSON may escape a lone surrogate ("\ud800"): valid JSON, not valid text
                msg.id.encode("utf-8")
            except UnicodeEncodeError:
                raise _Reject(f"bad_meta: id is not valid Unicode text, got "
                              f"{_clip(ascii(msg.id))}") from None
        if msg.dtype is None:
            dt = self.json_dtype
        else:
            dt = self.dtypes.get(msg.dtype)
            if dt is None:
                raise _Reject(f"bad_dtype: {_clip(msg.dtype)!r} not accepted "
                              f"(accepted: {self._accepted})")
        try:
            arr = np.asarray(msg.x)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise _Reject("bad_shape: x is not a regular array (ragged nested lists)") from None
        if arr.dtype.kind not in "iuf":
            raise _Reject(f"bad_dtype: x must hold numbers only, got {arr.dtype}")
        if arr.shape != self.input_shape:
            if arr.ndim == 1 and arr.size == self.size:
                arr = arr.reshape(self.input_shape)
            else:
                raise _Reject(f"bad_shape: expected {self.input_shape}, got {arr.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise _Reject("non_finite: x has NaN or inf")
        return Sample(_cast(arr, dt), msg.y, msg.task, msg.id, msg.ts)


def _check_float32(x: np.ndarray) -> None:
    """Refuse finite values that become inf in float32, the dtype the trainer computes in: a
    float64 1e300 is valid here but would reach training as inf and poison the weights."""
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        with np.errstate(over="ignore"):
            if not np.isfinite(x.astype(np.float32)).all():
                raise _Reject(f"non_finite: x overflows float32 (the training dtype), max "
                              f"|x| is {float(np.abs(x).max()):.3g}")


def _cast(arr: np.ndarray, dt: np.dtype) -> np.ndarray:
    """JSON numbers as ``dt``, refusing what would change their value (2.5 or 300 as uint8)."""
    dt = dt.newbyteorder("=")
    if dt.kind == "f":
        with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
            out = arr.astype(dt)
        if not np.isfinite(out).all():
            raise _Reject(f"non_finite: x overflows {dt.name}")
        _check_float32(out)
        return out
    if arr.dtype.kind == "f" and not (arr == np.floor(arr)).all():
        raise _Reject(f"bad_dtype: x has non-integral values, {dt.name} needs integers")
    info = np.iinfo(dt)
    lo, hi = arr.min(), arr.max()
    if lo < info.min or hi > info.max:
        raise _Reject(f"bad_dtype: x out of range for {dt.name} [{info.min}, {info.max}]")
    return arr.astype(dt)


# -- header parsing -----------------------------------------------------------------------------

def _header_map(headers: Any) -> dict[str, Any]:
    if not headers:
        return {}
    try:
        return dict(headers)
    except (TypeError, ValueError):
        raise _Reject("bad_header: headers must be (name, bytes) pairs") from None


def _header_text(hdr: dict[str, Any], key: str, code: str,
                 encoding: str = "ascii") -> str | None:
    raw = hdr.get(key)
    if raw is None:
        return None
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise _Reject(f"{code}: header {key} must be bytes, got {type(raw).__name__}")
    try:
        return bytes(raw).decode(encoding)
    except UnicodeDecodeError:
        raise _Reject(f"{code}: header {key} is not {encoding} text") from None


def _parse_shape(text: str | None) -> tuple[int, ...]:
    if text is None:
        raise _Reject(f"bad_shape: header {H_SHAPE} missing")
    parts = text.split(",")
    if len(parts) > 32 or not all(p.strip().isdigit() and len(p.strip()) <= 12 for p in parts):
        raise _Reject(f"bad_shape: header {H_SHAPE} must be sizes like 784 or 1,28,28, "
                      f"got {_clip(text)!r}")
    return tuple(int(p) for p in parts)


def _parse_int(text: str, code: str, rule: str, *, signed: bool) -> int:
    body = text.strip()
    digits = body[1:] if signed and body[:1] == "-" else body
    if digits.isascii() and digits.isdigit() and len(digits) <= 19:
        value = int(body)
        if INT64_MIN <= value <= INT64_MAX:
            return value
    raise _Reject(f"{code}: {rule}, got {_clip(text)}")


def _parse_ts(text: str) -> float:
    try:
        ts = float(text)
    except ValueError:
        ts = math.nan
    if not math.isfinite(ts):
        raise _Reject(f"bad_meta: ts must be a finite number, got {_clip(text)}")
    return ts


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
