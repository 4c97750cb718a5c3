"""Real TLS parts for the security tests: a certificate authority made with Debian's
``openssl``, and ``stunnel`` terminating (mutual) TLS in front of the tansu broker.

Why stunnel: tansu 0.6.0 cannot terminate TLS itself (``--cert`` and ``--key`` are mutually
exclusive options, and the TLS acceptor it builds is never used), so the broker listens in
plaintext on loopback and advertises stunnel's port: every client connection, bootstrap and
after, then goes through TLS. A missing binary is a failure with an install hint, never a skip
(``.ci/run`` installs both).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

#: EC keys: a certificate in milliseconds, where RSA would cost the suite seconds
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def find_binary(*names: str, package: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{names[0]} not found: install it (apt-get install -y {package})")


@dataclass(frozen=True)
class Pki:
    """A CA, the broker's certificate (for 127.0.0.1 and localhost), a client certificate it
    signed, and a client certificate from another CA (which the broker must refuse)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def make_pki(directory: Path) -> Pki:
    openssl = find_binary("openssl", package="openssl")

    def run(*args: str | Path) -> None:
        out = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True,
                             timeout=60, check=False)
        if out.returncode:
            pytest.fail(f"openssl {args[0]} failed: {out.stderr.strip()}")

    def authority(name: str) -> tuple[Path, Path]:
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        run("req", "-x509", *_KEY, "-keyout", key, "-out", cert, "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return cert, key

    def leaf(name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
        cert, key, csr = (directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
        ext = directory / f"{name}.ext"
        ext.write_text(extensions)
        run("req", "-new", *_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        run("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-days", "2",
            "-set_serial", f"0x{secrets.token_hex(8)}", "-extfile", ext, "-out", cert)
        return cert, key

    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = authority("test-ca"), authority("rogue-ca")
    server = leaf("localhost", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                   "extendedKeyUsage=serverAuth\n")
    client = leaf("streamcl-client", ca, "extendedKeyUsage=clientAuth\n")
    rogue = leaf("rogue-client", rogue_ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, *rogue)


class Stunnel:
    """stunnel accepting TLS on ``127.0.0.1:port`` and forwarding plaintext to
    ``127.0.0.1:target``. With ``require_cert`` (mutual TLS) it refuses clients without a
    certificate signed by the test CA (``verifyChain`` + ``requireCert``: stunnel 5's spelling
    of ``verify = 2``)."""

    def __init__(self, pki: Pki, port: int, target: int, directory: Path, *,
                 require_cert: bool = True, startup_timeout_s: float = 20.0) -> None:
        self.pki, self.port, self.target = pki, port, target
        self.directory, self.require_cert = directory, require_cert
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"stunnel-{port}.log"

    def __enter__(self) -> Stunnel:
        binary = find_binary("stunnel4", "stunnel", package="stunnel4")
        verify = "verifyChain = yes\nrequireCert = yes\n" if self.require_cert else ""
        conf = self.directory / f"stunnel-{self.port}.conf"
        conf.write_text(f"foreground = yes\npid =\noutput = {self.log}\n"
                        f"[kafka]\naccept = 127.0.0.1:{self.port}\n"
                        f"connect = 127.0.0.1:{self.target}\n"
                        f"cert = {self.pki.server_cert}\nkey = {self.pki.server_key}\n"
                        f"CAfile = {self.pki.ca}\n{verify}")
        self.process = subprocess.Popen([binary, str(conf)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"stunnel exited with code {self.process.returncode}: "
                            f"{self.output()[-2000:]}")
            if "Configuration successful" in self.output():
                return self
            time.sleep(0.05)  # polling its log for readiness, not a synchronisation
        self.__exit__(None, None, None)
        pytest.fail(f"stunnel did not start within {self.startup_timeout_s:g} s: "
                    f"{self.output()[-2000:]}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class Blackhole:
    """A loopback port where a connection attempt gets no answer: a listener with a backlog of
    one, filled by connections nobody accepts, so the kernel drops further SYNs (a firewall's
    DROP, without needing one). Routed "unreachable" addresses are not reliable for this: some
    networks answer them (this machine's does)."""

    def __enter__(self) -> Blackhole:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", self.port))
            self.fillers.append(sock)
        time.sleep(0.2)  # let the handshakes of the fillers land in the queue
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self.fillers:
            sock.close()
        self.server.close()


class Mute:
    """A loopback port that accepts connections (the kernel does, from its backlog) and never
    answers a byte: a wedged broker, or a service that is not Kafka and waits for more."""

    def __enter__(self) -> Mute:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
