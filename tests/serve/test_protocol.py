"""The Open Inference Protocol's messages: decoding what clients send, encoding what they read.

Encoded responses are read back with Triton's own client code (``InferResult``), requests are
built with Triton's ``InferInput``: the format is checked against an implementation nobody here
wrote. Arbitrary bytes are fuzzed with Hypothesis: the decoder raises ``ProtocolError`` (a 4xx)
or returns a request, never anything else.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.http._utils import _get_inference_request

from streamcl.serve.protocol import ProtocolError, decode_request, encode_response


def _triton_body(x: np.ndarray, datatype: str, binary: bool) -> tuple[bytes, str | None]:
    inp = triton.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    body, json_size = _get_inference_request([inp], "req-1", None, 0, False, False, 0, None,
                                             None)
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_tritons_requests_decode_exactly(binary: bool, datatype: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((3, 4), dtype=np.float32) if datatype == "FP32"
         else rng.integers(0, 256, (3, 4), dtype=np.uint8))
    body, header = _triton_body(x, datatype, binary)
    req = decode_request(body, header)
    assert req.id == "req-1" and list(req.inputs) == ["input"]
    got = req.inputs["input"]
    assert got.dtype == x.dtype and np.array_equal(got, x)
    assert req.binary_outputs and req.outputs is None  # Triton asks for binary outputs
    got[0, 0] = 0  # writable: the model may take it without a copy


def test_nested_data_and_requested_outputs() -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32",
                                   "data": [[1, 2], [3, 4]]}],
                       "outputs": [{"name": "label"},
                                   {"name": "probabilities",
                                    "parameters": {"binary_data": True}}]}).encode()
    req = decode_request(body, None)
    assert req.inputs["input"].tolist() == [[1, 2], [3, 4]]
    assert req.outputs == ["label", "probabilities"] and req.binary == {"probabilities"}


def test_gzip_request() -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                   "data": [1.5]}]}).encode()
    req = decode_request(gzip.compress(body), None, content_encoding="gzip")
    assert req.inputs["input"].tolist() == [1.5]


@pytest.mark.parametrize("binary", [set(), {"label", "probabilities"}, {"probabilities"}])
def test_responses_read_back_by_tritons_client(binary: set[str]) -> None:
    labels = np.array([3, -1, 7], dtype=np.int64)
    probs = np.random.default_rng(1).random((3, 5), dtype=np.float32)
    body, header = encode_response("m", "4", "req-9", {"label": labels,
                                                        "probabilities": probs}, binary)
    assert (header is None) == (not binary)
    result = triton.InferResult.from_response_body(body, header_length=header)
    assert np.array_equal(result.as_numpy("label"), labels)
    assert np.array_equal(result.as_numpy("probabilities"), probs)
    assert result.get_response()["model_version"] == "4"
    assert result.get_response()["id"] == "req-9"


_BINARY = (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", '
           b'"parameters": {"binary_data_size": 4}}]}')
#: (JSON, binary bytes after it or None for a plain JSON body, what the error must say)
BAD = [
    (b"not json", None, "not JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"inputs": []}', None, "non-empty"),
    (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}',
     None, "FP32 or UINT8"),
    (b'{"inputs": [{"name": "input", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}',
     None, "holds 3 values but data has 2"),
    (b'{"inputs": [{"name": "input", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
     None, "non-negative"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "UINT8", "data": [300]}]}',
     None, "0..255"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ["a"]}]}',
     None, "numbers"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
     None, "not JSON"),  # NaN is not JSON (Python's json module reads it; the protocol's no)
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1e300]}]}',
     None, "finite FP32"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32"}]}', None, "give 'data'"),
    (_BINARY.replace(b"[1]", b"[2]"), b"\x00" * 4, "takes 8 bytes"),
    (_BINARY, b"\x00" * 2, "bytes of binary data are left"),
    (_BINARY, b"\x00" * 6, "no input's binary_data_size"),
    (b'{"inputs": []}', b"", "but the body has"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}, '
     b'{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "twice"),
    (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}], '
     b'"outputs": [{"name": "label", "parameters": {"classification": 3}}]}', None,
     "classification"),
]


@pytest.mark.parametrize(("body", "tail", "message"), BAD)
def test_bad_requests_name_the_problem(body: bytes, tail: bytes | None, message: str) -> None:
    header = None if tail is None else str(len(body) if tail else 999)
    with pytest.raises(ProtocolError, match=message) as info:
        decode_request(body + (tail or b""), header)
    assert info.value.status == 400
    assert "\n" not in str(info.value)


def test_unknown_content_encoding_is_415() -> None:
    with pytest.raises(ProtocolError, match="not supported") as info:
        decode_request(b"{}", None, content_encoding="br")
    assert info.value.status == 415


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), header=st.one_of(st.none(), st.integers(-5, 400)))
def test_arbitrary_bytes_are_a_protocol_error_or_a_request(body: bytes, header: int | None
                                                           ) -> None:
    try:
        decode_request(body, None if header is None else str(header))
    except ProtocolError as exc:
        assert 400 <= exc.status < 500


@settings(max_examples=200, deadline=None)
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c,
                                                                            max_size=4),
                        max_leaves=20))
def test_arbitrary_json_is_a_protocol_error_or_a_request(doc: object) -> None:
    for body in (json.dumps(doc).encode(), json.dumps({"inputs": [doc]}).encode(),
                 json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                         "data": doc}]}).encode()):
        try:
            decode_request(body, None)
        except ProtocolError as exc:
            assert 400 <= exc.status < 500
