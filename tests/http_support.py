"""A real exporter over HTTP: web configs, a private PKI, sockets that hold connections, a process's RSS."""

from __future__ import annotations

import datetime
import ipaddress
import select
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from tests.harness import ExporterProcess, exporter
from tests.recorded import observe

USER = "prometheus"


#: Awkward on purpose: colon (the basic-auth separator), unicode, quotes.
PASSWORD = "s3:cr\u00e9t \"p@ss\" \u2603"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def make_pki(directory: Path) -> dict[str, str]:
    """ca.crt, server.crt/key (127.0.0.1, ::1, localhost) and client.crt/key, all signed by the CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("csx test CA")).issuer_name(_name("csx test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": _write(directory / "ca", ca_key, ca)[0]}

    def leaf(name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[name + "_cert"], out[name + "_key"] = _write(directory / name, key, cert)

    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1"))])
    leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("scraper")])
    return out


def web_config(path: Path, *, tls: dict[str, str] | None = None, users: dict[str, str] | None = None) -> str:
    """Write an exporter-toolkit web-config file (YAML) and return its path."""
    import yaml

    data: dict[str, object] = {}
    if tls is not None:
        data["tls_server_config"] = tls
    if users is not None:
        data["basic_auth_users"] = {u: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode() for u, p in users.items()}
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return str(path)


@contextmanager
def serve(tmp: Path, *args: str, host: str = "127.0.0.1", scheme: str = "http",
          verify: ssl.SSLContext | bool = True) -> Iterator[ExporterProcess]:
    """The exporter on an empty metrics directory of the test's own (tmp/metrics), reached at `host`
    over `scheme`, up once /healthz (never protected) answers."""
    metrics = tmp / "metrics"
    metrics.mkdir(exist_ok=True)
    with exporter(tmp, "--metrics-dir", str(metrics), *args, host=host, scheme=scheme, verify=verify) as ex:
        yield ex


SLACK = 8.0  # seconds past a timeout before a still-open connection fails a test


CLOSED = select.POLLHUP | select.POLLERR | select.POLLRDHUP


def fill(directory: Path, names: int) -> None:
    """A metrics directory whose /metrics is about 5.6 kB per task name (8.5 MB at 1500)."""
    directory.mkdir(exist_ok=True)
    store = Store(str(directory))
    runtime = m.Recorder(store, c.RUNTIME, [0.001 * 2 ** i for i in range(20)])
    sent = m.Recorder(store, c.SENT)
    for i in range(names):
        name = f"app.tasks.some_module.task_number_{i:05d}"
        for queue in ("default", "priority"):
            observe(store, runtime.labels(name, queue), 0.5)
            sent.labels(name, queue).inc()
    store.close()


def connect(ex: ExporterProcess, n: int, request: bytes = b"", rcvbuf: int | None = None) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", ex.port))
        if request:
            s.sendall(request)
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket], how: int = CLOSED) -> int:
    """How many of `socks` the server has closed (FIN or RST; POLLERR: RST only), without reading them."""
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN | select.POLLRDHUP)
    return sum(1 for _, events in poller.poll(0) if events & how)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
