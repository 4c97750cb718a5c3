"""Benchmark: ``streamcl serve`` under load, against the raw model call, and across hot swaps.

The benchmark MLP (784-256-256-10, naive, trained a few steps) is published to a registry in a
temporary directory; ``streamcl serve`` runs as its own process (as in production) following
``<name>.models`` on an embedded tansu broker. The load generator is this process: N clients on
one asyncio loop, each with one keep-alive HTTP/1.1 connection, sending the same prepared
request (one sample, 784 FP32 features, binary tensor extension as Triton's clients send it,
or ``--json``) back to back and timing each answer.

(1) limit — ``InferenceModel.predict_proba`` on that request's tensor, called back to back in
    this process: the most a server could answer if HTTP, decoding and encoding were free.
(2) load — requests/s, p50 and p99 latency at 1, 8 and 64 clients, batching on
    (``--max-batch 64``), and at 64 clients with batching off (``--max-batch 1``) to show what
    it buys. Target: at 64 clients >= 50 % of (1).
(3) swap — 64 clients for ``--swap-seconds``; every 2 s a new version is published, moved to
    ``production`` and announced. Counted: failed requests (target 0); p99 latency in the
    0.5 s after each announcement against p99 outside those windows (target within 2x); per
    swap, announcement to the first answer from the new version (target median < 100 ms).

    python bench/serve.py [--seconds 5] [--swap-seconds 12] [--json] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import numpy as np
import torch

from streamcl.registry import Announcer, ModelRegistry, announcement, export_model
from streamcl.registry.model import InferenceModel
from streamcl.stream.broker import EmbeddedBroker, free_port
from streamcl.trainer import OnlineTrainer, TrainerConfig

INPUT, HIDDEN = (784,), (256, 256)


def make_trainer(seed: int) -> OnlineTrainer:
    trainer = OnlineTrainer(TrainerConfig(input_shape=INPUT, hidden=HIDDEN, strategy="naive",
                                          seed=seed))
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        y = torch.randint(0, 10, (32,), generator=g)
        trainer.step(torch.rand(32, *INPUT, generator=g), y)
    return trainer


def request_bytes(name: str, x: np.ndarray, use_json: bool) -> bytes:
    """One prepared HTTP/1.1 inference request (binary tensor extension unless ``use_json``)."""
    spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    headers = [f"POST /v2/models/{name}/infer HTTP/1.1", "Host: bench"]
    if use_json:
        body = json.dumps({"inputs": [{**spec, "data": x.ravel().tolist()}]}).encode()
        headers.append("Content-Type: application/json")
    else:
        header = json.dumps({"inputs": [{**spec, "parameters": {
            "binary_data_size": x.nbytes}}], "parameters": {"binary_data_output": True}}).encode()
        body = header + x.astype("<f4").tobytes()
        headers += ["Content-Type: application/octet-stream",
                    f"Inference-Header-Content-Length: {len(header)}"]
    headers.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


async def client(port: int, request: bytes, until: float, out: list[tuple[float, float, int]],
                 failures: list[str]) -> None:
    """Send ``request`` back to back until ``until``; record (sent, latency, version)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (sent := time.perf_counter()) < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            took = time.perf_counter() - sent
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.split(b"\r\n", 1)[0].decode() + " " + body[:200].decode())
                continue
            start = body.index(b'"model_version":"') + 17
            out.append((sent, took, int(body[start:body.index(b'"', start)])))
    finally:
        writer.close()


async def load(port: int, request: bytes, clients: int, seconds: float
               ) -> tuple[list[tuple[float, float, int]], list[str]]:
    out: list[tuple[float, float, int]] = []
    failures: list[str] = []
    warm_until = time.perf_counter() + 0.5
    await asyncio.gather(*[client(port, request, warm_until, [], failures)
                           for _ in range(clients)])
    until = time.perf_counter() + seconds
    await asyncio.gather(*[client(port, request, until, out, failures) for _ in range(clients)])
    return out, failures


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)  # polling interval of a readiness probe with a deadline
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


def serve(registry: str, name: str, bootstrap: str, port: int, args: argparse.Namespace,
          max_batch: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "streamcl", "serve", "--registry", registry, "--name", name,
           "--bootstrap", bootstrap, "--port", str(port), "--host", "127.0.0.1",
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
    except RuntimeError:
        proc.kill()
        raise RuntimeError(proc.communicate()[1].decode()[-2000:]) from None
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per load level")
    ap.add_argument("--swap-seconds", type=float, default=12.0)
    ap.add_argument("--json", action="store_true", help="JSON requests instead of binary")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--max-wait-ms", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    registry = ModelRegistry(tempfile.mkdtemp(prefix="serve-bench-"))
    tensors, section = export_model(make_trainer(0))
    registry.publish(tensors, {"model": section}, aliases=["production"])
    x = np.random.default_rng(0).random((1, *INPUT), dtype=np.float32)
    request = request_bytes(name, x, args.json)

    model = InferenceModel(*registry.load(1))
    xt = torch.from_numpy(x)
    for _ in range(200):
        model.predict_proba(xt)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        model.predict_proba(xt)
        n += 1
    raw = n / (time.perf_counter() - t0)

    print(f"benchmark MLP {INPUT[0]}-{'-'.join(map(str, HIDDEN))}-10, one sample per request "
          f"({'JSON' if args.json else 'binary tensor extension'}), {os.cpu_count()} cores, "
          f"torch threads {args.threads}, load generator and server on the same machine")
    print(f"\nraw InferenceModel.predict_proba, one request's tensor per call: {raw:,.0f} calls/s")
    print("\n| clients | batching | requests/s | of raw | p50 | p99 | failed |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap
        for max_batch, levels in ((64, (1, 8, 64)), (1, (64,))):
            port = free_port()
            proc = serve(registry.url, name, bootstrap, port, args, max_batch)
            try:
                for clients in levels:
                    out, failures = asyncio.run(load(port, request, clients, args.seconds))
                    lat = [t for _, t, _ in out]
                    rate = len(out) / args.seconds
                    rows[(clients, max_batch)] = rate
                    print(f"| {clients} | {'up to 64' if max_batch > 1 else 'off'} | "
                          f"{rate:,.0f} | {100 * rate / raw:.0f}% | {1e3 * pct(lat, 50):.2f} ms "
                          f"| {1e3 * pct(lat, 99):.2f} ms | {len(failures)} |")
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
            finally:
                stop(proc)
            if max_batch > 1:
                mean_batch = _histogram_mean(metrics.decode(), "streamcl_serve_batch_size")
                print(f"|  | mean samples per model call over these runs: {mean_batch:.1f} "
                      "| | | | | |")

        print(f"\nswap under load: 64 clients for {args.swap_seconds:.0f} s, a new version "
              "published, promoted and announced every 2 s")
        port = free_port()
        proc = serve(registry.url, name, bootstrap, port, args, 64)
        announced: list[tuple[float, int]] = []

        # the new versions, trained beforehand: this process is also the load generator
        exports = [export_model(make_trainer(seed)) for seed in
                   range(1, int(args.swap_seconds / 2) + 1)]

        async def swaps() -> None:
            await asyncio.sleep(1.5)
            end = time.perf_counter() + args.swap_seconds - 2.5
            with Announcer(bootstrap, name) as announcer:
                for t, s in exports:
                    if time.perf_counter() >= end:
                        break
                    m = await asyncio.to_thread(registry.publish, t, {"model": s},
                                                aliases=["production"])
                    at = time.perf_counter()
                    await asyncio.to_thread(announcer.announce, announcement(
                        "publish", m["version"], alias="production", registry=registry.url))
                    announced.append((at, m["version"]))
                    await asyncio.sleep(2.0)

        async def both() -> tuple[list[tuple[float, float, int]], list[str]]:
            result, _ = await asyncio.gather(load(port, request, 64, args.swap_seconds), swaps())
            return result

        try:
            out, failures = asyncio.run(both())
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        finally:
            stop(proc)
    windows = [(at, at + 0.5) for at, _ in announced]
    during = [t for s, t, _ in out if any(a <= s < b for a, b in windows)]
    steady = [t for s, t, _ in out if not any(a - 0.5 <= s < b for a, b in windows)]
    to_serving = []
    for at, version in announced:
        first = [s + t for s, t, v in out if v == version]
        if first:
            to_serving.append(min(first) - at)
    print(f"- requests {len(out):,}, failed {len(failures)}"
          + (f" (first: {failures[0]})" if failures else ""))
    print(f"- p99 steady {1e3 * pct(steady, 99):.2f} ms, p99 in the 0.5 s after an announcement "
          f"{1e3 * pct(during, 99):.2f} ms ({pct(during, 99) / pct(steady, 99):.2f}x)")
    print(f"- announcement -> first answer from the new version, {len(to_serving)} swaps: "
          f"median {1e3 * statistics.median(to_serving):.0f} ms, max "
          f"{1e3 * max(to_serving):.0f} ms (server-side swap latency, mean: "
          f"{1e3 * _histogram_mean(metrics, 'streamcl_serve_swap_latency_seconds'):.0f} ms)")
    print(f"- versions served: {sorted({v for _, _, v in out})}")
    return 0


def _histogram_mean(text: str, name: str) -> float:
    """The mean of a histogram in a Prometheus exposition: its _sum over its _count."""
    values = {}
    for line in text.splitlines():
        for part in ("_sum", "_count"):
            if line.startswith(name + part):
                values[part] = float(line.split()[-1])
    return values["_sum"] / values["_count"] if values.get("_count") else float("nan")


if __name__ == "__main__":
    sys.exit(main())
