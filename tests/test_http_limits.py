"""The HTTP server's limits, against the real `serve` process.

A connection must send a complete request head within --header-timeout
(trickling bytes does not extend it), a client that leaves a response unread
is dropped after --send-timeout (tests/test_http_starvation.py: slow readers,
idle sockets and --max-connections), HEAD answers like GET without a body, and Accept-Encoding is
negotiated as RFC 9110 12.5.3 says. Timing asserts are bounds with slack
(closed after about the timeout, well before it plus several seconds),
never exact.
"""

from __future__ import annotations

import gzip
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server._http import choose_encoding
from tests.harness import ExporterProcess, exporter, parse, wait_until
from tests.recorded import observe
from tests.test_http_security import make_pki, serve, web_config

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


@pytest.fixture
def small(tmp_path: Path) -> Path:
    fill(tmp_path / "metrics", 3)
    return tmp_path / "metrics"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    """One exporter with default limits, shared by the tests that only ask it questions."""
    tmp = tmp_path_factory.mktemp("plain")
    fill(tmp / "metrics", 3)
    with exporter(str(tmp), "--metrics-dir", str(tmp / "metrics")) as ex:
        yield ex


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


def wait_all_closed(socks: list[socket.socket], timeout: float, what: str) -> float:
    """Seconds until the server had closed every socket; fails after `timeout`."""
    start = time.monotonic()
    wait_until(lambda: closed_by_server(socks) == len(socks), timeout, what, interval=0.1)
    return time.monotonic() - start


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens, closed whatever happens."""
    opened: list[socket.socket] = []
    yield opened
    close_all(opened)


def head_and_rest(ex: ExporterProcess, request: bytes) -> tuple[bytes, bytes]:
    """Send `request` and then `GET /healthz` on one connection; return the first response's head and
    everything after it. A HEAD answered without a body leaves exactly the second response after it."""
    with socket.create_connection(("127.0.0.1", ex.port), timeout=10) as s:
        s.sendall(request + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def header_map(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


# --- timeouts --------------------------------------------------------------------------------------------


def test_idle_connections_are_closed_after_the_header_timeout(small: Path, tmp_path: Path,
                                                               sockets: list[socket.socket]) -> None:
    with exporter(str(tmp_path), "--metrics-dir", str(small), "--header-timeout", "2") as ex:
        sockets += connect(ex, 200)
        took = wait_all_closed(sockets, 2 + SLACK, "200 idle connections to be closed")
        assert took >= 1.0, f"closed after {took:.2f}s, before the 2 s timeout could have run"
        # A keep-alive connection idle after a full response is closed the same way.
        with socket.create_connection(("127.0.0.1", ex.port)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            wait_all_closed([s], 2 + SLACK, "an idle keep-alive connection to be closed")
        assert ex.get("/healthz").status_code == 200


def test_a_trickled_request_head_is_closed_unanswered(small: Path, tmp_path: Path) -> None:
    """Bytes arriving do not restart the clock: only a complete head stops it."""
    with exporter(str(tmp_path), "--metrics-dir", str(small), "--header-timeout", "2") as ex:
        with socket.create_connection(("127.0.0.1", ex.port)) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            while not closed_by_server([s]):
                assert time.monotonic() - start < 2 + SLACK, "a trickled request head still open"
                try:
                    s.sendall(b"X")
                except OSError:
                    break
                time.sleep(0.3)
            took = time.monotonic() - start
            assert took >= 1.0, f"closed after {took:.2f}s, before the 2 s timeout could have run"
            try:
                assert s.recv(4096) == b"", "a response to a request that was never finished"
            except ConnectionResetError:
                pass


def test_header_timeout_behind_tls(tmp_path: Path) -> None:
    """TLS goes through the same protocol: a handshaken connection that sends nothing is closed too."""
    pki = make_pki(tmp_path)
    config = web_config(tmp_path / "web.yml", tls={"cert_file": "server.crt", "key_file": "server.key"})
    ca = ssl.create_default_context(cafile=pki["ca"])
    with serve(tmp_path, "--web-config-file", config, "--header-timeout", "2", scheme="https", verify=ca) as s:
        port = int(s.base.rsplit(":", 1)[1])
        with ca.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            start = time.monotonic()
            tls.settimeout(2 + SLACK)
            assert tls.recv(4096) == b""
            assert 1.0 <= time.monotonic() - start < 2 + SLACK
        assert httpx.get(s.base + "/healthz", verify=ca, timeout=5).status_code == 200


# --- slow readers and the connection limit: tests/test_http_starvation.py -------------------------------


# --- HEAD ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/"])
def test_head_answers_like_get_without_a_body(plain: ExporterProcess, path: str) -> None:
    ask = f" {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n".encode()
    get_head, get_rest = head_and_rest(plain, b"GET" + ask)
    head_head, head_rest = head_and_rest(plain, b"HEAD" + ask)
    assert head_head.split(b"\r\n")[0] == get_head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    get_headers, head_headers = header_map(get_head), header_map(head_head)
    del get_headers["date"], head_headers["date"]
    get_length, head_length = int(get_headers.pop("content-length")), int(head_headers.pop("content-length"))
    assert head_headers == get_headers
    if path == "/metrics":
        assert head_headers["content-encoding"] == "gzip"
        # The scrape-duration sample differs between two renders: the lengths are near, not equal.
        assert abs(head_length - get_length) < 64
    else:
        assert head_length == get_length > 0
    # Nothing between the HEAD's head and the next response: no body.
    assert head_rest.startswith(b"HTTP/1.1 200 OK\r\n"), head_rest[:200]
    assert get_rest[:get_length] != head_rest[:get_length]


# --- Accept-Encoding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    (None, "identity"),
    ("", "identity"),
    ("gzip", "gzip"),
    ("GZIP", "gzip"),
    ("x-gzip", "gzip"),
    ("gzip;q=0", "identity"),
    ("gzip; Q=0.000", "identity"),
    ("gzip;q=0, identity", "identity"),
    ("*", "gzip"),
    ("*;q=0", None),
    ("*;q=0, identity", "identity"),
    ("*;q=0, gzip;q=0.1", "gzip"),
    ("*, gzip;q=0", "identity"),
    ("identity;q=0", None),
    ("identity;q=0, gzip", "gzip"),
    ("identity;q=0, *", "gzip"),
    ("gzip;q=0, identity;q=0", None),
    ("deflate, br", "identity"),
    ("br;q=1.0, gzip;q=0.5", "gzip"),
    ("gzip;q=0.5", "gzip"),
    ("identity;q=0.6, gzip;q=0.5", "identity"),
    ("identity;q=0.5, gzip;q=0.5", "gzip"),
    ("gzip;q=0.5;level=1", "gzip"),
    ("gzip;q=2", "identity"),
    ("gzip;q=abc", "identity"),
    ("gzip;q=0.1234", "identity"),
    ("gzip;q=0, gzip", "gzip"),
    (" , ,gzip ,", "gzip"),
])
def test_choose_encoding(header: str | None, expected: str | None) -> None:
    assert choose_encoding(header) == expected


@pytest.mark.parametrize(("header", "status", "encoding"), [
    (None, 200, None),
    ("gzip", 200, "gzip"),
    ("GZIP", 200, "gzip"),
    ("gzip;q=0", 200, None),
    ("*", 200, "gzip"),
    ("identity;q=0", 406, None),
    ("deflate", 200, None),
])
def test_metrics_negotiates_its_encoding(plain: ExporterProcess, header: str | None, status: int,
                                         encoding: str | None) -> None:
    headers = {"Accept-Encoding": header} if header is not None else {}
    # httpx would add its own Accept-Encoding and inflate the body; a raw stream keeps both as sent.
    with httpx.Client(timeout=10) as client:
        request = client.build_request("GET", plain.url + "/metrics", headers=headers)
        if header is None:
            del request.headers["Accept-Encoding"]
        r = client.send(request, stream=True)
        raw = b"".join(r.iter_raw())
    assert r.status_code == status, raw[:200]
    assert "accept-encoding" in [v.strip().lower() for v in r.headers["vary"].split(",")]
    assert r.headers.get("content-encoding") == encoding
    if status == 200:
        text = (gzip.decompress(raw) if encoding == "gzip" else raw).decode()
        key = ("celery_task_sent_total", frozenset({("name", "app.tasks.some_module.task_number_00000"),
                                                   ("queue_name", "default")}))
        assert parse(text)[key] == 1.0


def test_accept_encoding_on_several_lines_is_one_list(plain: ExporterProcess) -> None:
    head, _ = head_and_rest(plain, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: br\r\n"
                                   b"Accept-Encoding: gzip\r\n\r\n")
    assert header_map(head).get("content-encoding") == "gzip"
