"""``InferenceServer`` end to end: Triton's client and plain HTTP against a real server.

Each test publishes real models into a real registry directory and talks HTTP to a server on a
free port. Predictions are compared with :class:`InferenceModel` on the same inputs; the swap
test runs over the session's real Kafka-protocol broker with concurrent clients and counts
failed requests (there must be none).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton

from streamcl.registry import Announcer, InferenceModel, ModelRegistry, announcement

Publish = Callable[..., dict[str, Any]]


def _client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.split("//", 1)[1], connection_timeout=30,
                                        network_timeout=30)


def _infer(client: triton.InferenceServerClient, x: np.ndarray, *, binary: bool = True,
           datatype: str = "FP32", version: str = "") -> triton.InferResult:
    inp = triton.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary)
               for n in ("label", "probabilities")]
    return client.infer("digits", [inp], outputs=outputs, model_version=version)


def _expected(registry: ModelRegistry, version: int, x: torch.Tensor
              ) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = InferenceModel(*registry.load(version)).predict_proba(x)
    return labels.numpy(), probs.numpy()


@pytest.mark.parametrize("binary", [True, False])
def test_tritons_client_metadata_and_inference(registry: ModelRegistry, publish: Publish,
                                               serving: Any, probe: torch.Tensor,
                                               binary: bool) -> None:
    publish(registry, 0)
    publish(registry, 1, aliases=["production"])
    with serving(registry) as server:
        client = _client(server.url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits")
        meta = client.get_model_metadata("digits")
        assert meta["name"] == "digits" and meta["parameters"]["version"] == "2"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        labels_row = meta["parameters"]["labels"]
        assert meta["outputs"][1]["shape"] == [-1, len(labels_row)] and len(labels_row) == 6
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]

        result = _infer(client, probe.numpy(), binary=binary)
        labels, probs = _expected(registry, 2, probe)
        # one request alone is one batch: the very same computation as InferenceModel's
        assert np.array_equal(result.as_numpy("label"), labels)
        assert np.array_equal(result.as_numpy("probabilities"), probs)
        assert result.get_response()["model_version"] == "2"
        assert set(np.unique(labels)) - {0, 1}, "the 6-class model predicts new classes"
        # the probabilities' columns follow metadata's labels, and the label is the argmax
        assert np.array_equal(np.asarray(labels_row)[probs.argmax(1)], labels)

        # UINT8 is read as image bytes, as the trainer reads it
        raw = (probe * 255).round().to(torch.uint8)
        got = _infer(client, raw.numpy(), binary=binary, datatype="UINT8")
        assert np.array_equal(got.as_numpy("label"), _expected(registry, 2, raw)[0])

        # a version by number, beside the alias's
        old = _infer(client, probe.numpy(), binary=binary, version="1")
        assert old.get_response()["model_version"] == "1"
        assert np.array_equal(old.as_numpy("label"), _expected(registry, 1, probe)[0])
        assert client.get_model_metadata("digits", "1")["parameters"]["version"] == "1"
        assert sorted(client.get_model_metadata("digits")["versions"]) == ["1", "2"]


def test_il2m_model_predicts_rectified_classes(registry: ModelRegistry, publish: Publish,
                                               serving: Any, probe: torch.Tensor,
                                               exports: list[Any]) -> None:
    assert exports[2][1]["rectifier"] == "il2m"
    publish(registry, 2, aliases=["production"])
    model = InferenceModel(*registry.load(1))
    with serving(registry) as server:
        got = _infer(_client(server.url), probe.numpy())
    assert np.array_equal(got.as_numpy("label"), model.predict(probe).numpy())
    # the probabilities are those of the rectified scores, not of the raw logits
    rectified, raw = model.predict_scores(probe), model.model(probe)
    assert not torch.allclose(rectified, raw)
    assert np.array_equal(got.as_numpy("probabilities"), rectified.softmax(1).numpy())


def test_bad_requests_are_4xx_protocol_errors(registry: ModelRegistry, publish: Publish,
                                              serving: Any, probe: torch.Tensor,
                                              http: Any) -> None:
    publish(registry, 1, aliases=["production"])
    with serving(registry, max_body_bytes=64 << 10) as server:
        url = f"{server.url}/v2/models/digits"
        x = probe[:2]
        cases = {
            "wrong shape": (f"{url}/infer", http.infer_json(x[:, :10]), 400, "shape"),
            "wrong rank": (f"{url}/infer", http.infer_json(x.reshape(2, 8, 8)), 400, "shape"),
            "wrong datatype": (f"{url}/infer", http.infer_json(x, "FP64"), 400, "FP32 or UINT8"),
            "wrong input name": (f"{url}/infer", http.infer_json(x).replace(
                b'"name": "input"', b'"name": "x"'), 400, "one input named 'input'"),
            "unknown output": (f"{url}/infer", http.infer_json(x, outputs=[{"name": "boxes"}]),
                               400, "unknown output"),
            "not json": (f"{url}/infer", b"{", 400, "not JSON"),
            "unknown model": (f"{server.url}/v2/models/other/infer", http.infer_json(x), 404,
                              "unknown model 'other'"),
            "unknown version": (f"{url}/versions/9/infer", http.infer_json(x), 404, "no v9"),
            "bad version": (f"{url}/versions/x/infer", http.infer_json(x), 400, "version"),
            "unknown route": (f"{server.url}/v2/elsewhere", None, 404, "no endpoint"),
            "oversized body": (f"{url}/infer", http.infer_json(torch.rand(200, 64)), 413,
                               "over the limit"),
        }
        for case, (target, body, status, message) in cases.items():
            got, text = http.get(target, body)
            assert got == status, (case, got, text)
            error = json.loads(text)["error"]
            assert message in error and "\n" not in error, (case, error)
        got, text = http.get(f"{url}/infer")  # GET on a POST route
        assert got == 405 and "POST" in json.loads(text)["error"]
        # chunked body over the limit (no Content-Length to refuse it by)
        got, text = http.get(f"{url}/infer", iter([b" " * 40000, b" " * 40000]),
                             {"Content-Type": "application/json"}, "POST")
        assert got == 413, text
        # and the server is unharmed
        assert http.get(f"{url}/infer", http.infer_json(x))[0] == 200
        # counted by the version that answered ("none": refused before a model was picked)
        counts = {(v, o): server.metrics.value("streamcl_serve_requests_total",
                                               {"version": v, "outcome": o})
                  for v in ("none", "1") for o in ("ok", "bad_request", "not_found",
                                                   "too_large")}
        assert counts == {("none", "ok"): 0, ("none", "bad_request"): 4,
                          ("none", "not_found"): 2, ("none", "too_large"): 2,
                          ("1", "ok"): 1, ("1", "bad_request"): 4, ("1", "not_found"): None,
                          ("1", "too_large"): None}


def test_not_ready_until_a_version_is_published(registry: ModelRegistry, publish: Publish,
                                                serving: Any, probe: torch.Tensor,
                                                http: Any) -> None:
    with serving(registry, ready=False) as server:
        assert http.get(f"{server.url}/v2/health/live")[0] == 200
        status, body = http.get(f"{server.url}/v2/health/ready")
        assert status == 400 and json.loads(body)["ready"] is False
        status, body = http.get(f"{server.url}/v2/models/digits/infer",
                                http.infer_json(probe[:1]))
        assert status == 503 and "not ready" in json.loads(body)["error"]
        publish(registry, 0, aliases=["production"])
        assert http.wait_until(lambda: http.is_ready(server.url))
        assert http.get(f"{server.url}/v2/models/digits/infer", http.infer_json(probe[:1]))[0] \
            == 200
        assert server.metrics.value("streamcl_serve_model_version") == 1


def test_concurrent_requests_are_batched_and_answered_as_alone(
        registry: ModelRegistry, publish: Publish, serving: Any, probe: torch.Tensor) -> None:
    publish(registry, 1, aliases=["production"])
    labels, probs = _expected(registry, 1, probe)
    errors: list[str] = []
    with serving(registry, max_batch=16, max_wait_ms=20) as server:
        def one(i: int) -> None:
            client = _client(server.url)
            for k in range(10):
                j = (i * 10 + k) % len(probe)
                r = _infer(client, probe[j:j + 1].numpy())
                if r.as_numpy("label")[0] != labels[j] or not np.allclose(
                        r.as_numpy("probabilities")[0], probs[j], atol=1e-6):
                    errors.append(f"sample {j}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        count = server.metrics.value("streamcl_serve_batch_size_count")
        total = server.metrics.value("streamcl_serve_batch_size_sum")
    assert not errors
    assert total == 80 and count < 80, "concurrent requests shared model calls"
    predicted = sum(server.metrics.value("streamcl_serve_predictions_total",
                                         {"label": str(v)}) or 0 for v in range(10))
    assert predicted == 80


def test_hot_swap_under_concurrent_load_fails_nothing(
        kafka_bootstrap: str, registry: ModelRegistry, publish: Publish, serving: Any,
        probe: torch.Tensor, http: Any, damage: Callable[[ModelRegistry, int], None]) -> None:
    """Versions published and announced while 6 clients send requests without pause: every
    request succeeds, each answer is exactly what the version it names predicts, and the
    server serves each version in turn; a corrupt version in between is refused and the old
    one keeps serving."""
    name = f"digits-{uuid.uuid4().hex[:8]}"
    publish(registry, 0, aliases=["production"])
    expected = {1: _expected(registry, 1, probe)[0]}
    failures: list[str] = []
    answers: list[int] = []
    stop = threading.Event()
    with serving(registry, name, bootstrap=kafka_bootstrap, poll_s=1.0) as server, \
            Announcer(kafka_bootstrap, name) as announcer:
        def load() -> None:
            client = triton.InferenceServerClient(server.url.split("//", 1)[1])
            while not stop.is_set():
                inp = triton.InferInput("input", list(probe.shape), "FP32")
                inp.set_data_from_numpy(probe.numpy())
                try:
                    r = client.infer(name, [inp])
                except Exception as exc:
                    failures.append(repr(exc))
                    continue
                v = int(r.get_response()["model_version"])
                if not np.array_equal(r.as_numpy("label"), expected[v]):
                    failures.append(f"v{v} answered something else than v{v} predicts")
                answers.append(v)

        def announce(version: int) -> None:
            announcer.announce(announcement("publish", version, alias="production",
                                            registry=registry.url))

        def served(version: int) -> bool:
            return server.metrics.value("streamcl_serve_model_version") == version

        clients = [threading.Thread(target=load) for _ in range(6)]
        for t in clients:
            t.start()
        try:
            for i, version in ((1, 2), (0, 3), (1, 4)):
                before = len(answers)
                publish(registry, i)
                expected[version] = _expected(registry, version, probe)[0]
                registry.promote(version)
                announce(version)
                assert http.wait_until(lambda v=version: served(v))
                # requests keep flowing across the swap
                assert http.wait_until(lambda b=before: len(answers) > b + 20)
            # a corrupt version: refused, v4 keeps serving
            publish(registry, 0)
            damage(registry, 5)
            registry.set_alias("production", 5, reason="promote", verify=False)
            announce(5)
            assert http.wait_until(lambda: server.metrics.value(
                "streamcl_serve_refused_versions_total") == 1)
            before = len(answers)
            assert http.wait_until(lambda: len(answers) > before + 20)
            assert served(4)
        finally:
            stop.set()
            for t in clients:
                t.join(30)
    assert failures == []
    assert set(answers) == {1, 2, 3, 4}
    assert answers.index(4) > answers.index(3) > answers.index(2) > answers.index(1) == 0
    assert server.metrics.value("streamcl_serve_swaps_total") == 4
    assert server.metrics.value("streamcl_serve_swap_latency_seconds_count") == 3


def test_a_pinned_corrupt_version_is_refused_once_and_remembered(
        registry: ModelRegistry, publish: Publish, serving: Any, probe: torch.Tensor,
        http: Any, damage: Callable[[ModelRegistry, int], None]) -> None:
    publish(registry, 0, aliases=["production"])
    publish(registry, 1)
    damage(registry, 2)
    with serving(registry) as server:
        url = f"{server.url}/v2/models/digits"
        for _ in range(3):
            status, body = http.get(f"{url}/versions/2/infer", http.infer_json(probe[:1]))
            assert status == 404 and "v2 cannot be served" in json.loads(body)["error"]
        assert server.metrics.value("streamcl_serve_refused_versions_total") == 1
        # the alias moved onto it later: the watcher refuses it too, still counted once
        registry.set_alias("production", 2, reason="promote", verify=False)
        assert http.wait_until(lambda: server.models.watcher.refused == 1)
        assert server.metrics.value("streamcl_serve_refused_versions_total") == 1
        status, body = http.get(f"{url}/infer", http.infer_json(probe[:1]))
        assert status == 200 and json.loads(body)["model_version"] == "1"
