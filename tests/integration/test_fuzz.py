"""Fuzz the real `serve` process from its own OpenAPI schema: never a 5xx.

schemathesis reads `/openapi.json` (FastAPI's), generates valid and invalid
requests for every operation (including the Accept and Accept-Encoding
headers /metrics negotiates on) and fails on any server error. It runs as
its own CLI (`st run`) against a process serving a metrics directory with
hostile label values and a live Redis probe, once open and once behind TLS
and basic auth, where unauthenticated fuzzing must only ever see 401.
Examples are bounded and the seed fixed, so a run is repeatable and short.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from tests.http_support import PASSWORD, USER, make_pki, serve, web_config
from tests.recorded import observe

MAX_EXAMPLES = "150"
SEED = "20261121"


def st_run(workdir: Path, schema: str, *args: str, summary: str = "No issues found") -> str:
    """`st run` with only the no-5xx check; returns its report, fails on any finding.

    It runs in `workdir` because schemathesis keeps a crash cache in
    `./.schemathesis`, which must neither litter the checkout nor replay
    another run's findings.
    """
    st = os.path.join(os.path.dirname(sys.executable), "st")
    out = subprocess.run([st, "run", schema, "--checks", "not_a_server_error", "--max-examples", MAX_EXAMPLES,
                          "--seed", SEED, "--request-timeout", "10", "--no-color", *args],
                         cwd=workdir, capture_output=True, text=True, timeout=300)
    # Plain values only in the asserts: pytest would print `out` whole, password and all.
    code, report = out.returncode, masked(out.stdout + out.stderr)
    del out
    assert code == 0, f"schemathesis found problems ({code}):\n{report[-6000:]}"
    assert summary in report, report[-3000:]
    return report


def masked(text: str) -> str:
    """The report without the test password (curl reproductions carry it)."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return text.replace(token, "***").replace(PASSWORD, "***")


def hostile_metrics(directory: Path) -> None:
    """Series whose label values a careless exposition would break on."""
    directory.mkdir(exist_ok=True)
    store = Store(str(directory))
    for name in ['quote"d', "back\\slash", "new\nline", "snow\u2603man", "x" * 2000]:
        m.Recorder(store, c.SENT).labels(name, "q").inc()
        observe(store, m.Recorder(store, c.RUNTIME, (0.1, 1)).labels(name, "q"), 0.5)


def test_fuzz_open_service_never_answers_5xx(tmp_path: Path, redis_url: str) -> None:
    hostile_metrics(tmp_path / "metrics")
    with serve(tmp_path, "--broker-url", redis_url, "--probe-interval", "1", "--probe-timeout", "1") as s:
        report = st_run(tmp_path, s.url + "/openapi.json")
        assert s.proc.poll() is None, s.log()
        assert httpx.get(s.url + "/metrics", timeout=5).status_code == 200
    assert "Traceback" not in s.log(), s.log()[-3000:]
    assert "4 passed" in report or "Tested: 4" in report, report[-2000:]


def test_fuzz_behind_tls_and_basic_auth(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    hostile_metrics(tmp_path / "metrics")
    config = web_config(tmp_path / "web.yml", tls={"cert_file": "server.crt", "key_file": "server.key"},
                        users={USER: PASSWORD})
    ca = ssl.create_default_context(cafile=pki["ca"])
    with serve(tmp_path, "--web-config-file", config, scheme="https", verify=ca) as s:
        schema = httpx.get(s.url + "/openapi.json", verify=ca, auth=(USER, PASSWORD), timeout=5)
        assert schema.status_code == 200
        schema_file = tmp_path / "openapi.json"
        schema_file.write_text(json.dumps(schema.json()))
        # Unauthenticated: the three protected operations only ever answer 401
        # (schemathesis warns about exactly that), /healthz 200, never a 5xx.
        st_run(tmp_path, str(schema_file), "--url", s.url, "--tls-verify", pki["ca"],
               summary="Authentication failed: 3 operations returned only 401/403 responses")
        # Authenticated: the real handlers behind the middleware.
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        st_run(tmp_path, str(schema_file), "--url", s.url, "--tls-verify", pki["ca"],
               "--header", f"Authorization: Basic {token}")
        assert s.proc.poll() is None, s.log()
    assert "Traceback" not in s.log(), s.log()[-3000:]
