"""``streamcl serve`` as a user runs it: a real process, Triton's client, SIGTERM, bad flags."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton

from streamcl.registry import InferenceModel, ModelRegistry
from streamcl.stream.broker import free_port


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "streamcl", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_follows_the_alias_and_stops_cleanly_on_sigterm(
        registry: ModelRegistry, publish: Callable[..., Any], probe: torch.Tensor,
        http: Any) -> None:
    publish(registry, 0, aliases=["production"])
    port = free_port()
    proc = _serve("--registry", registry.url, "--name", "digits", "--host", "127.0.0.1",
                  "--port", str(port), "--poll-s", "0.05")
    url = f"http://127.0.0.1:{port}"
    try:
        assert http.wait_until(lambda: http.is_ready(url), 60), proc.stderr
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        inp = triton.InferInput("input", list(probe.shape), "FP32")
        inp.set_data_from_numpy(probe.numpy())
        got = client.infer("digits", [inp])
        assert np.array_equal(got.as_numpy("label"),
                              InferenceModel(*registry.load(1)).predict(probe).numpy())
        publish(registry, 1, aliases=["production"])  # no broker: the alias is polled
        assert http.wait_until(lambda: client.get_model_metadata("digits")["parameters"][
            "version"] == "2")
        assert client.infer("digits", [inp]).get_response()["model_version"] == "2"
        metrics = http.get(f"{url}/metrics")[1].decode()
        assert 'streamcl_serve_requests_total{outcome="ok",version="2"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serving 'digits'" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--max-batch", "0"], "--max-batch 0: must be 1 or more"),
    (["--max-wait-ms", "-1"], "--max-wait-ms -1.0: must be a positive number"),
    (["--max-body-mb", "0"], "--max-body-mb 0.0: must be a positive number"),
    (["--port", "70000"], "--port 70000: must be 0 or more and at most 65535"),
])
def test_bad_flags_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "streamcl", "serve", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"streamcl: error: {message}"]


def test_a_port_in_use_is_one_line_and_exit_2(registry: ModelRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "streamcl", "serve", "--registry",
                               registry.url, "--host", "127.0.0.1", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"streamcl: error: --host 127.0.0.1 --port {port}: cannot listen there")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
