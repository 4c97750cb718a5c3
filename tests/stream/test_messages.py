"""The message schema: both encodings round-trip, every bad message gets its reason, and no
input bytes or headers, however broken, make the decoder raise."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from streamcl.stream.messages import (
    H_DTYPE,
    H_ID,
    H_SHAPE,
    H_TASK,
    H_TS,
    H_Y,
    REASONS,
    Decoder,
    Rejection,
    Sample,
    encode_binary,
    encode_json,
)

SHAPE = (784,)
DTYPES = ("uint8", "float32")


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return Decoder(SHAPE, dtypes=DTYPES, max_bytes=1 << 20)


def _image() -> np.ndarray:
    return np.arange(784, dtype=np.uint8)


def _json(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _binary(x: np.ndarray | None = None, **headers: bytes | None) -> tuple[bytes, list]:
    value, base = encode_binary(_image() if x is None else x, 3)
    merged = dict(base)
    for key, raw in headers.items():
        name = "streamcl-" + key
        if raw is None:
            merged.pop(name, None)
        else:
            merged[name] = raw
    return value, list(merged.items())


# -- round trips ----------------------------------------------------------------------------------

CASES = [
    ((784,), "uint8"),
    ((1, 28, 28), "uint8"),
    ((64,), "float32"),
    ((3, 4, 5), "float64"),
    ((10,), "int16"),
    ((2, 3), "float16"),
]


@pytest.mark.parametrize(("shape", "dtype"), CASES)
@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_round_trip(shape: tuple[int, ...], dtype: str, encoding: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 200, shape) if np.dtype(dtype).kind in "iu"
         else rng.standard_normal(shape)).astype(dtype)
    dec = Decoder(shape, dtypes=(dtype,))
    meta = {"id": "row-17", "ts": 1700000000.25, "task": 4}
    if encoding == "binary":
        value, headers = encode_binary(x, 9, **meta)
    else:
        value, headers = encode_json(x, 9, **meta), []
    sample = dec.decode(value, headers)
    assert isinstance(sample, Sample), sample
    assert sample.x.dtype == np.dtype(dtype) and sample.x.shape == shape
    np.testing.assert_array_equal(sample.x, x)  # bit-exact, floats included
    assert (sample.y, sample.task, sample.id, sample.ts) == (9, 4, "row-17", 1700000000.25)


def test_optional_fields_absent(decoder: Decoder) -> None:
    for value, headers in (encode_binary(_image(), 0), (encode_json(_image(), 0), [])):
        sample = decoder.decode(value, headers)
        assert isinstance(sample, Sample)
        assert (sample.y, sample.task, sample.id, sample.ts) == (0, None, None, None)


def test_flat_input_fills_the_configured_shape() -> None:
    dec = Decoder((1, 28, 28), dtypes=("uint8",))
    flat = _image()
    from_binary = dec.decode(*encode_binary(flat, 1))       # header says "784"
    from_json = dec.decode(_json(x=flat.tolist(), y=1))    # a flat list
    from_nested = dec.decode(_json(x=flat.reshape(1, 28, 28).tolist(), y=1))
    for s in (from_binary, from_json, from_nested):
        assert isinstance(s, Sample) and s.x.shape == (1, 28, 28)
        np.testing.assert_array_equal(s.x.reshape(-1), flat)


def test_json_without_dtype_uses_json_dtype() -> None:
    as_float = Decoder((2,), dtypes=("uint8", "float32")).decode(_json(x=[1, 2], y=0))
    as_bytes = Decoder((2,), dtypes=("uint8",)).decode(_json(x=[1, 2], y=0))
    assert as_float.x.dtype == np.float32 and as_bytes.x.dtype == np.uint8


def test_encoders_refuse_bad_labels_and_non_numbers() -> None:
    with pytest.raises(TypeError):
        encode_binary(_image(), 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_json(_image(), -1)
    with pytest.raises(ValueError):
        encode_json(np.array(["a"]), 1)
    with pytest.raises(ValueError):  # NaN is not JSON: fail in the producer
        encode_json(np.array([math.nan], dtype=np.float32), 1)


def test_decoder_configuration_errors() -> None:
    with pytest.raises(ValueError, match="not numeric"):
        Decoder((4,), dtypes=("U4",))
    with pytest.raises(ValueError, match="json_dtype"):
        Decoder((4,), dtypes=("uint8",), json_dtype="float32")
    with pytest.raises(ValueError, match="input_shape"):
        Decoder((0,))


# -- every rejection reason -----------------------------------------------------------------------

NAN_X = np.zeros(784, dtype=np.float32)
NAN_X[5] = np.nan

REJECTIONS = [
    # (case id, value, headers, expected reason: exact, or a prefix ending in ": ")
    ("oversize", b"x" * ((1 << 20) + 1), [], "oversize: 1048577 bytes > max 1048576"),
    ("empty", None, [], "empty: message has no value"),
    ("bad_header", b"{}", [("streamcl-dtype",)], "bad_header: "),
    ("bad_json", b"nope", [], "bad_json: Expecting value at 1:1"),
    ("bad_json_utf8", b"\xff\xfe\xfa", [], "bad_json: "),
    ("bad_json_deep", b"[" * 100_000, [], "bad_json: "),
    ("bad_schema_list", b"[1, 2]", [], "bad_schema: expected a JSON object, got list"),
    ("bad_schema_x_missing", _json(y=1), [], "bad_schema: x missing"),
    ("bad_shape_json", _json(x=[0] * 783, y=1), [], "bad_shape: expected (784,), got (783,)"),
    ("bad_shape_ragged", _json(x=[[1, 2], [3]], y=1), [], "bad_shape: "),
    ("bad_shape_x_not_list", _json(x="abc", y=1), [], "bad_shape: "),
    ("bad_shape_header", *_binary(shape=b"783"), "bad_shape: expected (784,), got (783,)"),
    ("bad_shape_header_garbage", *_binary(shape=b"28x28"), "bad_shape: "),
    ("bad_shape_header_missing", *_binary(shape=None), "bad_shape: "),
    ("bad_shape_bytes", b"\x00" * 783, _binary()[1], "bad_shape: "),
    ("bad_dtype_not_accepted", *_binary(dtype=b"complex64"), "bad_dtype: "),
    ("bad_dtype_unknown", *_binary(dtype=b"\xff\x00"), "bad_dtype: "),
    ("bad_dtype_json_field", _json(x=[0] * 784, y=1, dtype="int64"), [], "bad_dtype: "),
    ("bad_dtype_json_strings", _json(x=["a"] * 784, y=1), [], "bad_dtype: "),
    ("bad_dtype_json_range", _json(x=[300] * 784, y=1, dtype="uint8"), [], "bad_dtype: "),
    ("bad_dtype_json_fraction", _json(x=[0.5] * 784, y=1, dtype="uint8"), [], "bad_dtype: "),
    ("non_finite_binary", *encode_binary(NAN_X, 1), "non_finite: x has NaN or inf"),
    ("non_finite_json", b'{"x": [NaN' + b", 0" * 783 + b'], "y": 1}', [],
     "non_finite: x has NaN or inf"),
    ("non_finite_overflow", _json(x=[1e300] * 784, y=1, dtype="float32"), [], "non_finite: "),
    ("bad_label_missing_json", _json(x=[0] * 784), [], "bad_label: y missing"),
    ("bad_label_missing_binary", *_binary(y=None), "bad_label: y missing"),
    ("bad_label_fraction", _json(x=[0] * 784, y=2.5), [],
     "bad_label: y must be a non-negative integer, got 2.5"),
    ("bad_label_fraction_binary", *_binary(y=b"2.5"),
     "bad_label: y must be a non-negative integer, got 2.5"),
    ("bad_label_negative", _json(x=[0] * 784, y=-1), [], "bad_label: "),
    ("bad_label_string", _json(x=[0] * 784, y="3"), [], "bad_label: "),
    ("bad_label_bool", _json(x=[0] * 784, y=True), [], "bad_label: "),
    ("bad_label_huge", *_binary(y=b"9" * 30), "bad_label: "),
    ("bad_task_json", _json(x=[0] * 784, y=1, task="a"), [], "bad_task: "),
    ("bad_task_binary", *_binary(task=b"one"), "bad_task: "),
    ("bad_meta_ts", _json(x=[0] * 784, y=1, ts="yesterday"), [], "bad_meta: "),
    ("bad_meta_id", _json(x=[0] * 784, y=1, id=5), [], "bad_meta: "),
    ("bad_meta_id_surrogate", _json(x=[0] * 784, y=1, id="a\ud800"), [],
     "bad_meta: id is not valid Unicode text, got 'a\\ud800'"),
    ("bad_meta_ts_binary", *_binary(ts=b"inf"), "bad_meta: "),
    ("bad_meta_id_binary", *_binary(id=b"\xff"), "bad_meta: "),
]


@pytest.mark.parametrize(("value", "headers", "expected"),
                         [pytest.param(v, h, e, id=i) for i, v, h, e in REJECTIONS])
def test_rejection_reason(decoder: Decoder, value: bytes | None, headers: list,
                          expected: str) -> None:
    result = decoder.decode(value, headers)
    assert isinstance(result, Rejection), result
    if expected.endswith(": "):
        assert result.reason.startswith(expected), result.reason
        assert len(result.reason) > len(expected)  # a detail follows the code
    else:
        assert result.reason == expected
    assert result.code in REASONS and result.code != "undecodable"


def test_every_reason_code_is_exercised() -> None:
    exercised = {e.split(":")[0] for *_, e in REJECTIONS}
    # label_cap is the learner's refusal, not the decoder's (tests/test_trainer.py)
    assert exercised == set(REASONS) - {"undecodable", "label_cap"}


@pytest.mark.parametrize("big", [1e300, -1e300, 3.5e38, float(np.finfo(np.float64).max)])
def test_float64_that_overflows_float32_is_refused(big: float) -> None:
    """Finite in float64 but inf in float32, the training dtype: refused in both encodings
    (issue 12: 1e300 reached training as inf)."""
    dec = Decoder((4,), dtypes=("float32", "float64"))
    x = np.array([0.0, 1.0, big, 2.0])
    for decoded in (dec.decode(*encode_binary(x, 1)), dec.decode(encode_json(x, 1)),
                    dec.decode(_json(x=x.tolist(), y=1))):
        assert isinstance(decoded, Rejection), decoded
        assert decoded.reason.startswith("non_finite: x overflows float32"), decoded.reason
    top = float(np.finfo(np.float32).max)  # the largest float32 still fits
    for decoded in (dec.decode(*encode_binary(x.clip(-top, top), 1)),
                    dec.decode(encode_json(x.clip(-top, top), 1))):
        assert isinstance(decoded, Sample), decoded
        assert np.isfinite(decoded.x.astype(np.float32)).all()


def test_forced_encoding() -> None:
    value, headers = encode_binary(_image(), 1)
    assert Decoder(SHAPE, dtypes=DTYPES, encoding="json").decode(value, headers).code == "bad_json"
    as_binary = Decoder(SHAPE, dtypes=DTYPES, encoding="binary").decode(encode_json(_image(), 1))
    assert as_binary.reason == f"bad_dtype: header {H_DTYPE} missing"


# -- fuzzing -------------------------------------------------------------------------------------

HEADER_NAMES = [H_DTYPE, H_SHAPE, H_Y, H_TASK, H_ID, H_TS, "other", ""]


def _garbage_headers(rng: random.Random) -> object:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, 5, "abc", b"xy", [("only-one",)], [(["unhashable"], b"")],
                           [(None, None)], {"streamcl-dtype": b"uint8"}])
    out = []
    for _ in range(rng.randint(0, 8)):
        value: object = rng.choice([
            None, rng.randbytes(rng.randint(0, 12)), b"uint8", b"float32", b"784", b"1,28,28",
            b"3", b"-3", b"1e400", b"nan", str(rng.random()).encode(), 42, "str", [b"3"],
            bytearray(b"uint8"), memoryview(b"784"), {"a": 1},
            str(rng.randint(-10**30, 10**30)).encode()])
        out.append((rng.choice(HEADER_NAMES), value))
    return out


def _garbage_value(rng: random.Random) -> bytes | None:
    roll = rng.random()
    if roll < 0.3:
        return rng.randbytes(rng.randint(0, 2000))
    if roll < 0.45:  # a valid message with some bytes flipped
        value = bytearray(encode_json(_image(), 3, id="a", ts=1.0, task=1)
                          if rng.random() < 0.5 else encode_binary(_image(), 3)[0])
        for _ in range(rng.randint(1, 5)):
            value[rng.randrange(len(value))] = rng.randrange(256)
        return bytes(value)
    if roll < 0.9:  # structurally JSON, with random field types
        pick = [None, True, -1, 0, 2.5, 1e400, "s", [], {}, [[1], [2, 3]], 10**40,
                [0] * 784, [0.5] * 784, [[0] * 28] * 28, ["a"] * 784, [[[]]], [None] * 784,
                [10**30] * 784, [-1] * 784]
        obj = {k: rng.choice(pick) for k in ("x", "y", "task", "id", "ts", "dtype")
               if rng.random() < 0.7}
        if "dtype" in obj and rng.random() < 0.5:
            obj["dtype"] = rng.choice(["uint8", "float32", "int64", "bogus", "U4"])
        return json.dumps(obj if rng.random() < 0.9 else list(obj.values())).encode()
    return rng.choice([None, b"", b"{", b"null", b"[]", b'"x"', b"{}", b"\x00" * 784])


def test_fuzz_never_raises(decoder: Decoder) -> None:
    rng = random.Random(1234)
    codes: set[str] = set()
    accepted = 0
    for _ in range(2000):
        result = decoder.decode(_garbage_value(rng), _garbage_headers(rng))  # type: ignore[arg-type]
        assert isinstance(result, Sample | Rejection)
        if isinstance(result, Rejection):
            assert result.code in REASONS and result.code != "undecodable", result.reason
            codes.add(result.code)
        else:
            assert result.x.shape == SHAPE and result.x.dtype.name in DTYPES
            assert isinstance(result.y, int) and result.y >= 0
            accepted += 1
    assert len(codes) >= 8 and accepted > 0  # the fuzzer reaches deep into the decoder
