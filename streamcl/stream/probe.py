"""Can this host use Kafka at these addresses, with these security settings? One line if not.

:func:`check_connection` runs before anything else connects (``streamcl run``, ``produce``,
``replay``, the service's reconnection after an outage). It speaks the first few Kafka requests
itself (ApiVersions, SASL handshake and login, Metadata) with a deadline on every step, because
the clients cannot be asked *why* they fail: kafka-python retries a refused login or a silent
port until its own timeouts and says "Unable to bootstrap", and a TLS client pointed at a
plaintext port waits in the handshake forever (found by a tester: `streamcl run` hung and
ignored SIGTERM). SASL tokens come from kafka-python's own mechanism classes, TLS from the
standard library, so what is checked is what the clients will do.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from typing import Any


class BrokerError(RuntimeError):
    """The embedded broker cannot be found or did not start; the message says why."""


class BrokerUnreachable(BrokerError):
    """No broker at the bootstrap address answers with the configured security. The message is
    one line: the address, what went wrong in words, and the setting that fixes it (a user
    error, not a bug: the command line prints it and exits 2)."""



# -- connection check -----------------------------------------------------------------------------
# Kafka API keys the check speaks itself: a few fixed-layout requests, so that every step has a
# deadline and every failure has a name (a client library retries, and says "Unable to
# bootstrap" or nothing at all, whatever the cause)
_API_VERSIONS, _METADATA, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 3, 17, 36
_MAX_FRAME = 64 << 20  # larger "sizes" are not Kafka frames (a TLS record read as one, HTTP...)
_SUSPECT_S = 2.0  # a TLS server answers a ClientHello at once; past this, try plaintext
_GRACE_S = 0.5  # for a probe to report its own, precise timeout before the hard one
_NOT_LISTENER = ("check that kafka.bootstrap_servers names a Kafka listener and "
                 "kafka.security_protocol matches it")
_TO_PLAINTEXT = ("set kafka.security_protocol: PLAINTEXT (or SASL_PLAINTEXT) and drop the "
                 "ssl_* settings, or point kafka.bootstrap_servers at the TLS listener")
_TO_TLS = "set kafka.security_protocol: SSL (or SASL_SSL) and kafka.ssl_cafile"
_AUTH_FIX = "check kafka.sasl_plain_username and kafka.sasl_plain_password"
_NO_SASL_FIX = ("set kafka.security_protocol: SSL or PLAINTEXT (without SASL), or enable SASL "
                "on that listener")
# alerts a TLS server sends when it refuses the client's certificate (or its absence)
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE",
                       "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
                       "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED", "HANDSHAKE_FAILURE")


def check_connection(bootstrap: str, client_config: dict[str, Any],
                     timeout_s: float = 15.0) -> None:
    """Return once a broker at ``bootstrap`` answers with ``client_config``'s security (TLS,
    SASL login, a metadata request), and the brokers it advertises answer too; else raise
    :class:`BrokerUnreachable` with one line: the address, the cause in words and the fix.

    Why not just build the client: kafka-python retries a refused login or a silent port until
    its own timeouts, and a TLS client pointed at a plaintext port waits forever in the
    handshake; the cause is lost either way. Here each bootstrap address is probed in its own
    daemon thread that speaks the few Kafka requests needed with per-step socket deadlines,
    and the caller waits at most ``timeout_s`` (plus a fraction of a second) whatever happens,
    a hung name lookup included. Succeeds as soon as one address passes, like Kafka clients.
    SASL tokens come from kafka-python's own mechanisms, so the check logs in exactly as the
    clients will.
    """
    addresses = _parse_bootstrap(bootstrap)
    probe = _Probe(client_config, timeout_s)
    results: dict[str, BaseException | None] = {}
    lock, done = threading.Lock(), threading.Event()

    def run(address: tuple[str, int]) -> None:
        try:
            probe.cluster(*address)
            outcome: BaseException | None = None
        except BaseException as exc:  # reported below, in one line
            outcome = exc
        with lock:
            results[_join(address)] = outcome
            if outcome is None or len(results) == len(addresses):
                done.set()

    for address in addresses:
        threading.Thread(target=run, args=(address,), daemon=True,
                         name=f"streamcl-check-{_join(address)}").start()
    done.wait(timeout_s + _GRACE_S)
    with lock:
        outcomes = dict(results)
    if any(outcome is None for outcome in outcomes.values()):
        return
    causes = []
    for address in addresses:
        where = _join(address)
        exc = outcomes.get(where)
        if exc is None:
            causes.append(f"{where}: no answer within {timeout_s:g} s: check "
                          "kafka.bootstrap_servers and that this host can reach it (network, "
                          "firewall)")
        elif isinstance(exc, _Refused):
            causes.append(f"{where}: {exc.cause}: {exc.fix}")
        else:  # not foreseen: still one line, with the exception's own words
            causes.append(f"{where}: {type(exc).__name__}: {exc}: {_NOT_LISTENER}")
    raise BrokerUnreachable("cannot use Kafka at " + "; ".join(causes))


def _parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for item in (part.strip() for part in bootstrap.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or "]" in port:  # no port (an IPv6 literal's colons do not count)
            host, port = item, "9092"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BrokerUnreachable(f"cannot use Kafka at {bootstrap!r}: {item!r} is not "
                                    "host:port: fix kafka.bootstrap_servers")
        out.append((host, int(port)))
    if not out:
        raise BrokerUnreachable("cannot use Kafka: no bootstrap servers given: set "
                                "kafka.bootstrap_servers (host:port[,host:port...])")
    return list(dict.fromkeys(out))


def _join(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Refused(Exception):
    """A probe's verdict: ``cause`` says what happened, ``fix`` which setting to change."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}: {fix}")
        self.cause, self.fix = cause, fix


class _Closed(Exception):
    """The peer closed the connection, or sent something that is not a Kafka frame."""


class _Silent(Exception):
    """No answer before the deadline."""


class _Probe:
    """One check's settings and deadline, shared by the threads probing each address."""

    def __init__(self, config: dict[str, Any], timeout_s: float) -> None:
        self.config = dict(config)
        password = self.config.get("sasl_plain_password")
        getter = getattr(password, "get_secret_value", None)
        if callable(getter):
            self.config["sasl_plain_password"] = getter()
        self.protocol = str(self.config.get("security_protocol") or "PLAINTEXT").upper()
        self.tls = self.protocol in ("SSL", "SASL_SSL")
        self.sasl = self.protocol.startswith("SASL_")
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    # -- the steps ------------------------------------------------------------------------------
    def cluster(self, host: str, port: int) -> None:
        """Probe one bootstrap address, then every broker its metadata advertises."""
        for node_id, b_host, b_port in self.broker(host, port, metadata=True):
            if (b_host, b_port) == (host, port):
                continue
            try:
                self.broker(b_host, b_port, metadata=False)
            except _Refused as exc:
                raise _Refused(f"it advertises broker {node_id} as {_join((b_host, b_port))}, "
                               f"and there: {exc.cause}",
                               f"{exc.fix}; or set that broker's advertised listener to an "
                               "address this host reaches") from None

    def broker(self, host: str, port: int, *, metadata: bool) -> list[tuple[int, str, int]]:
        sock = self.connect(host, port)
        try:
            if self.tls:
                sock = self.handshake(sock, host, port)
            versions = self.api_versions(sock, host, port)
            if self.sasl:
                self.login(sock, host, versions)
            return self.metadata(sock, versions) if metadata else []
        finally:
            sock.close()

    def connect(self, host: str, port: int) -> socket.socket:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise _Refused(f"cannot resolve host {host!r} ({exc.strerror or exc})",
                           "check kafka.bootstrap_servers") from None
        failure = _Refused("no address to connect to", "check kafka.bootstrap_servers")
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.left())
                sock.connect(addr)
                return sock
            except TimeoutError:
                sock.close()
                raise self.silent("the connection attempt got no answer") from None
            except ConnectionRefusedError:
                failure = _Refused("connection refused: nothing listens on that port",
                                   "check kafka.bootstrap_servers (host and port)")
            except OSError as exc:
                failure = _Refused(f"cannot connect ({exc.strerror or exc})",
                                   "check kafka.bootstrap_servers and that this host can reach "
                                   "it (network, firewall)")
            sock.close()
        raise failure

    def handshake(self, sock: socket.socket, host: str, port: int) -> ssl.SSLSocket:
        try:
            context = self.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise _Refused(f"cannot load the TLS files ({exc})",
                           "check kafka.ssl_cafile, ssl_certfile and ssl_keyfile") from None
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        patient = False
        while True:
            tls.settimeout(self.left() if patient else min(self.left(), _SUSPECT_S))
            try:
                tls.do_handshake()
                return tls
            except TimeoutError:
                # a plaintext Kafka broker reads the ClientHello as the start of a huge
                # request and waits for the rest: ask the port in plaintext to be sure
                if not patient and self.speaks_plaintext(host, port):
                    raise _Refused("the port speaks plaintext Kafka, not TLS (the TLS handshake "
                                   "got no answer)", _TO_PLAINTEXT) from None
                if patient or self.left() <= 0.01:
                    raise self.silent("the TLS handshake got no answer",
                                      "check that the port is a TLS listener (else set "
                                      "kafka.security_protocol: PLAINTEXT)") from None
                patient = True
            except ssl.SSLCertVerificationError as exc:
                message = exc.verify_message or str(exc)
                if "mismatch" in message.lower():
                    raise _Refused(f"the broker's certificate does not name {host!r} ({message})",
                                   "connect by a name the certificate lists (in "
                                   "kafka.bootstrap_servers), or reissue the certificate") \
                        from None
                raise _Refused(f"the broker's certificate is not trusted ({message})",
                               "set kafka.ssl_cafile to the CA that signed the brokers' "
                               "certificates") from None
            except (ssl.SSLEOFError, ConnectionError) as exc:
                if self.speaks_plaintext(host, port):
                    raise _Refused("the port speaks plaintext Kafka, not TLS (it closed the "
                                   "connection on the TLS handshake)", _TO_PLAINTEXT) from None
                raise _Refused(f"the peer closed the connection during the TLS handshake "
                               f"({_reason(exc)})", _NOT_LISTENER) from None
            except ssl.SSLError as exc:
                raise self.tls_refusal(exc, host, port) from None

    def ssl_context(self) -> ssl.SSLContext:
        """Like kafka-python's: the CA file (else the system's), hostname checked, the client
        certificate when given."""
        context = ssl.create_default_context(cafile=self.config.get("ssl_cafile"))
        if self.config.get("ssl_check_hostname") is False:
            context.check_hostname = False
        if self.config.get("ssl_certfile"):
            context.load_cert_chain(self.config["ssl_certfile"], self.config.get("ssl_keyfile"),
                                    password=self.config.get("ssl_password"))
        return context

    def tls_refusal(self, exc: ssl.SSLError, host: str, port: int) -> _Refused:
        reason = str(exc.reason or exc).upper()
        if any(alert in reason for alert in _CLIENT_CERT_ALERTS):
            if not self.config.get("ssl_certfile"):
                return _Refused(f"the broker requires a client certificate (mutual TLS; "
                                f"{_reason(exc)})",
                                "set kafka.ssl_certfile and kafka.ssl_keyfile")
            return _Refused(f"the broker refused the client certificate ({_reason(exc)})",
                            "set kafka.ssl_certfile and kafka.ssl_keyfile to a certificate "
                            "signed by a CA the broker trusts")
        if any(sign in reason for sign in ("WRONG_VERSION_NUMBER", "RECORD_LAYER",
                                           "PACKET_LENGTH", "UNKNOWN_PROTOCOL")):
            if self.speaks_plaintext(host, port):
                return _Refused("the port speaks plaintext Kafka, not TLS", _TO_PLAINTEXT)
            return _Refused(f"the port does not speak TLS ({_reason(exc)})", _NOT_LISTENER)
        return _Refused(f"the TLS handshake failed ({_reason(exc)})",
                        "check kafka.ssl_* and the broker's TLS settings")

    def api_versions(self, sock: socket.socket, host: str, port: int) -> dict[int, tuple[int, int]]:
        try:
            body = self.request(sock, _API_VERSIONS, 0, b"")
        except _Closed as exc:
            if not self.tls and self.speaks_tls(host, port):
                raise _Refused("the port speaks TLS, not plaintext (it closed the connection on "
                               "a plaintext Kafka request)", _TO_TLS) from None
            if self.tls:
                # TLS 1.3: the server judges the client certificate after the client's side of
                # the handshake is done; its alert races the close, so an EOF on the first
                # request is how a refused (or missing) certificate often shows
                if not self.config.get("ssl_certfile"):
                    raise _Refused("the broker closed the TLS connection without a Kafka answer, "
                                   "as one that requires a client certificate does (mutual "
                                   f"TLS; {exc})", "set kafka.ssl_certfile and kafka.ssl_keyfile"
                                   ) from None
                raise _Refused("the broker closed the TLS connection without a Kafka answer, as "
                               f"one that refused the client certificate does ({exc})",
                               "set kafka.ssl_certfile and kafka.ssl_keyfile to a certificate "
                               "signed by a CA the broker trusts") from None
            raise _Refused(f"the peer closed the connection without a Kafka answer ({exc})",
                           _NOT_LISTENER) from None
        except _Silent:
            raise self.silent("the port accepted the connection but sent no Kafka answer",
                              _NOT_LISTENER) from None
        try:
            error, count = struct.unpack_from(">hi", body)
            versions = {key: (low, high) for key, low, high in
                        (struct.unpack_from(">hhh", body, 6 + 6 * i) for i in range(count))}
        except struct.error:
            raise _Refused("the port does not speak the Kafka protocol (a malformed ApiVersions "
                           "answer)", _NOT_LISTENER) from None
        if error:
            raise _Refused(f"the broker refused ApiVersions (Kafka error {error})", _NOT_LISTENER)
        return versions

    def login(self, sock: socket.socket, host: str, versions: dict[int, tuple[int, int]]) -> None:
        mechanism_name = str(self.config.get("sasl_mechanism") or "")
        user = self.config.get("sasl_plain_username")
        low, high = versions.get(_SASL_HANDSHAKE, (1, 0))
        if not low <= 1 <= high:
            raise _Refused("the broker offers no SASL handshake", _NO_SASL_FIX)
        try:
            body = self.request(sock, _SASL_HANDSHAKE, 1, _string(mechanism_name))
        except (_Closed, _Silent):
            raise _Refused(f"the broker closed the connection on a SASL handshake for "
                           f"{mechanism_name} (it offers no such mechanism, or no SASL here)",
                           "set kafka.sasl_mechanism to one the broker enables, or drop SASL "
                           "from kafka.security_protocol") from None
        error, count = struct.unpack_from(">hi", body)
        offered, offset = [], 6
        for _ in range(count):
            name, offset = _read_string(body, offset)
            offered.append(name or "")
        if error == 33 and mechanism_name not in offered:
            raise _Refused(f"the broker does not offer SASL mechanism {mechanism_name} (it "
                           f"offers {', '.join(offered) or 'none'})",
                           "set kafka.sasl_mechanism to one it offers")
        if error in (33, 34):  # it names ours back, or is in the wrong state: no SASL here
            raise _Refused("the broker does not accept SASL on this listener", _NO_SASL_FIX)
        if error:
            raise _Refused(f"the SASL handshake failed (Kafka error {error})", _AUTH_FIX)
        mechanism = _sasl_mechanism(mechanism_name)(host=host, **self.config)
        version = 1 if versions.get(_SASL_AUTHENTICATE, (0, 0))[1] >= 1 else 0
        failed = f"authentication failed for user {user!r} with {mechanism_name}"
        while not mechanism.is_done():
            try:
                body = self.request(sock, _SASL_AUTHENTICATE, version,
                                    _bytes(mechanism.auth_bytes()))
            except (_Closed, _Silent) as exc:
                raise _Refused(f"{failed} (the broker closed the connection: {exc})",
                               _AUTH_FIX) from None
            error = struct.unpack_from(">h", body)[0]
            message, offset = _read_string(body, 2)
            if error:
                raise _Refused(f"{failed} (the broker says: {message or f'error {error}'})",
                               _AUTH_FIX)
            size = struct.unpack_from(">i", body, offset)[0]
            token = body[offset + 4:offset + 4 + max(size, 0)]
            if token.startswith(b"e="):  # a SCRAM server-final error (RFC 5802), e.g.
                # "e=unknown-user" or "e=invalid-proof", sent with Kafka error code 0
                raise _Refused(f"{failed} (the broker says: {token[2:].decode(errors='replace')})",
                               _AUTH_FIX)
            try:
                mechanism.receive(token)
            except Exception as exc:  # the broker's proof did not verify
                raise _Refused(f"{failed} (the broker's answer did not verify: {exc})",
                               _AUTH_FIX) from None
        if not mechanism.is_authenticated():
            raise _Refused(failed, _AUTH_FIX)

    def metadata(self, sock: socket.socket,
                 versions: dict[int, tuple[int, int]]) -> list[tuple[int, str, int]]:
        """The brokers the cluster advertises (a request a SASL listener refuses before a
        login: the check that a broker requiring SASL is not reached without it)."""
        low, high = versions.get(_METADATA, (1, 0))
        version = min(high, 8)  # the fixed-layout versions; 9 and later are "flexible"
        if version < max(low, 1):
            return []
        request = struct.pack(">i", 0) + (b"\x00" if version >= 4 else b"") \
            + (b"\x00\x00" if version >= 8 else b"")  # no topics; no auto-creation
        try:
            body = self.request(sock, _METADATA, version, request)
        except _Closed:
            if not self.sasl:
                raise _Refused("the broker closed the connection on a metadata request: it "
                               "requires a SASL login", "set kafka.security_protocol: SASL_SSL "
                               "(or SASL_PLAINTEXT), kafka.sasl_mechanism, "
                               "sasl_plain_username and sasl_plain_password") from None
            raise _Refused("the broker closed the connection on a metadata request after the "
                           "login", "check that this user may describe the cluster (ACLs)") \
                from None
        except _Silent:
            raise self.silent("the broker did not answer a metadata request",
                              "check the broker's health") from None
        offset = 4 if version >= 3 else 0  # throttle_time_ms
        brokers = []
        try:
            count = struct.unpack_from(">i", body, offset)[0]
            offset += 4
            for _ in range(count):
                node_id = struct.unpack_from(">i", body, offset)[0]
                host, offset = _read_string(body, offset + 4)
                port = struct.unpack_from(">i", body, offset)[0]
                _, offset = _read_string(body, offset + 4)  # rack
                brokers.append((node_id, host or "", port))
        except struct.error:
            raise _Refused("the broker sent a malformed metadata answer", _NOT_LISTENER) \
                from None
        return brokers

    # -- helpers ------------------------------------------------------------------------------
    def left(self) -> float:
        return max(0.01, self.deadline - time.monotonic())

    def silent(self, what: str, fix: str = "check kafka.bootstrap_servers and that this host "
               "can reach it (network, firewall)") -> _Refused:
        return _Refused(f"{what} within {self.timeout_s:g} s", fix)

    def request(self, sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
        """Send one request (header v1) and return the response body after its correlation
        id; the socket's deadline is the check's."""
        correlation = 0x5C1
        header = struct.pack(">hhih", api_key, version, correlation, 8) + b"streamcl"
        frame = header + body
        try:
            sock.settimeout(self.left())
            sock.sendall(struct.pack(">i", len(frame)) + frame)
            size = struct.unpack(">i", self._read(sock, 4))[0]
            if not 4 <= size <= _MAX_FRAME:
                raise _Closed("an answer that is not a Kafka frame")
            answer = self._read(sock, size)
        except TimeoutError:
            raise _Silent() from None
        except (ssl.SSLEOFError, ConnectionError) as exc:
            raise _Closed(_reason(exc)) from None
        except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows up here
            raise self.tls_refusal(exc, "", 0) from None
        if struct.unpack_from(">i", answer)[0] != correlation:
            raise _Closed("an answer to another request")
        return answer[4:]

    def _read(self, sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise _Closed("connection closed")
            data += chunk
        return data

    def speaks_plaintext(self, host: str, port: int) -> bool:
        """Whether the port answers a plaintext ApiVersions request (one try, short)."""
        try:
            with socket.create_connection((host, port), timeout=min(self.left(), 3.0)) as sock:
                self.request(sock, _API_VERSIONS, 0, b"")
                return True
        except (OSError, _Closed, _Silent, _Refused):
            return False

    def speaks_tls(self, host: str, port: int) -> bool:
        """Whether the port answers a TLS ClientHello (certificates not checked here)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            with socket.create_connection((host, port), timeout=min(self.left(), 3.0)) as sock, \
                    context.wrap_socket(sock, server_hostname=host):
                return True
        except ssl.SSLError as exc:  # an alert is a TLS answer too
            return "ALERT" in str(exc.reason or "").upper()
        except OSError:
            return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _bytes(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


def _read_string(body: bytes, offset: int) -> tuple[str | None, int]:
    """A nullable Kafka string at ``offset``: (value, offset after it)."""
    size = struct.unpack_from(">h", body, offset)[0]
    if size < 0:
        return None, offset + 2
    return body[offset + 2:offset + 2 + size].decode(errors="replace"), offset + 2 + size


def _sasl_mechanism(name: str) -> Any:
    """kafka-python's class for a SASL mechanism (its module moved in 3.x)."""
    try:
        from kafka.net.sasl import get_sasl_mechanism
    except ImportError:  # kafka-python < 3.0
        from kafka.sasl import get_sasl_mechanism  # type: ignore[no-redef]
    return get_sasl_mechanism(name)


def speaks_plaintext(host: str, port: int) -> bool:
    """Whether ``host:port`` answers a plaintext ApiVersions request (one short try): a
    listener is up, whatever security its metadata would need."""
    return _Probe({}, 1.0).speaks_plaintext(host, port)
