"""TLS, basic auth and the bind address, against the real `serve` process.

The web-config file is exporter-toolkit's format. Certificates are made
here with `cryptography`: a CA, a server certificate for 127.0.0.1 and
localhost signed by it, and a client certificate for the mutual-TLS case.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import PYTHONPATH, ROOT, free_port
from tests.http_support import PASSWORD, USER, make_pki, serve, web_config

PROTECTED = ["/metrics", "/readyz", "/", "/openapi.json"]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_tls_and_basic_auth_guard_every_endpoint_but_healthz(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    config = web_config(tmp_path / "web.yml", tls={"cert_file": "server.crt", "key_file": "server.key"},
                        users={USER: PASSWORD, "other": "x"})
    ca = ssl.create_default_context(cafile=pki["ca"])
    with serve(tmp_path, "--web-config-file", config, scheme="https", verify=ca) as s:
        with httpx.Client(base_url=s.url, verify=ca, timeout=5) as client:
            assert client.get("/healthz").status_code == 200
            for path in PROTECTED:
                r = client.get(path)
                assert r.status_code == 401, (path, r.status_code)
                assert r.headers["www-authenticate"] == 'Basic realm="celery-signal-exporter", charset="UTF-8"'
                assert r.text == "Unauthorized\n"
            wrong = [
                basic(USER, PASSWORD + "x"),
                basic(USER, PASSWORD[:-1]),
                basic("nobody", PASSWORD),
                basic("other", PASSWORD),
                basic(USER, ""),
                basic(USER, "x" * 200),  # over bcrypt's 72 bytes
                {"Authorization": "Basic !!!not-base64"},
                {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
                {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()},
                {"Authorization": "Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
                {"Authorization": "Basic"},
            ]
            for headers in wrong:
                r = client.get("/metrics", headers=headers)
                assert r.status_code == 401, f"{r.status_code} for a wrong Authorization header"
            for path in PROTECTED:
                r = client.get(path, headers=basic(USER, PASSWORD))
                assert r.status_code == 200, (path, r.status_code, r.text[:200])
            # Twice more: the second time comes from the verified-credentials cache.
            assert client.get("/metrics", headers=basic(USER, PASSWORD)).status_code == 200
            assert client.get("/metrics", headers=basic("other", "x")).status_code == 200
            assert "celery_exporter_build_info" in client.get("/metrics", headers=basic(USER, PASSWORD)).text
        # Plain HTTP to the TLS port gets no HTTP answer, and no unverified TLS either.
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url.replace("https://", "http://") + "/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/healthz", timeout=5)  # the system CAs do not trust our test CA
    assert PASSWORD not in s.log()


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    config = web_config(tmp_path / "web.yml", tls={"cert_file": "server.crt", "key_file": "server.key",
                                                  "client_ca_file": "ca.crt",
                                                  "client_auth_type": "RequireAndVerifyClientCert"})
    with_cert = ssl.create_default_context(cafile=pki["ca"])
    with_cert.load_cert_chain(pki["client_cert"], pki["client_key"])
    with serve(tmp_path, "--web-config-file", config, scheme="https", verify=with_cert) as s:
        assert httpx.get(s.url + "/metrics", verify=with_cert, timeout=5).status_code == 200
        without = ssl.create_default_context(cafile=pki["ca"])
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/metrics", verify=without, timeout=5)


def test_basic_auth_without_tls(tmp_path: Path) -> None:
    config = web_config(tmp_path / "web.yml", users={USER: PASSWORD})
    with serve(tmp_path, "--web.config.file", config) as s:
        assert httpx.get(s.url + "/healthz", timeout=5).status_code == 200
        assert httpx.get(s.url + "/metrics", timeout=5).status_code == 401
        assert httpx.get(s.url + "/metrics", auth=(USER, PASSWORD), timeout=5).status_code == 200


def test_no_web_config_means_open_endpoints(tmp_path: Path) -> None:
    with serve(tmp_path) as s:
        for path in [*PROTECTED, "/healthz"]:
            assert httpx.get(s.url + path, timeout=5).status_code == 200, path


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_ipv6_bind_address(tmp_path: Path) -> None:
    """`::1` serves on IPv6 where the machine has it; elsewhere serve exits 2
    with one line. Both branches are asserted, never skipped."""
    if ipv6_loopback_works():
        for host in ("::1", "[::1]"):
            with serve(tmp_path, host=host) as s:
                assert httpx.get(s.url + "/metrics", timeout=5).status_code == 200
        with serve(tmp_path, host="::") as s:  # dual stack: IPv4 clients too
            port = s.port
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    else:
        port = str(free_port())
        out = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli",
                              "serve", "--metrics-dir", str(tmp_path),
                              "--host", "::1", "--port", port], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": PYTHONPATH})
        assert out.returncode == 2
        assert out.stderr.startswith(f"celery-signal-exporter: error: Invalid value for --host/--port: cannot "
                                     f"listen on [::1]:{port}: "), out.stderr
