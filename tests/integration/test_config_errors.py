"""Every bad configuration in docs/configuration-errors.md, through the real CLI.

The document is the test's input: each table row gives a command line (with
`$DIR`, `$BUSY_PORT`, `$CLOSED_PORT` and `$DENIED` placeholders), the exact
one line it must print on stderr and the exit code. Root can write into a
mode-0555 directory, so when the tests run as root the "unwritable" directory
is also made immutable (`chattr +i`), which stops root too.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import PYTHONPATH, ROOT, exporter, free_port, value, wait_until

DOC = os.path.join(ROOT, "docs", "configuration-errors.md")

#: Web-config files the rows refer to, by name; `{cert}`/`{key}` are a real pair.
WEB_CONFIGS = {
    "bad-yaml.yml": "basic_auth_users:\n  alice: [unclosed\n",
    "list.yml": "- tls_server_config\n",
    "unknown-key.yml": "basic_auth_user:\n  alice: x\n",
    "unknown-tls-key.yml": "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  certfile: x\n",
    "rate-limit.yml": "rate_limit:\n  interval: 1s\n  burst: 20\n",
    "missing-cert.yml": "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
    "no-key.yml": "tls_server_config:\n  cert_file: server.crt\n",
    "garbage-cert.yml": "tls_server_config:\n  cert_file: garbage.crt\n  key_file: server.key\n",
    "garbage-key.yml": "tls_server_config:\n  cert_file: server.crt\n  key_file: garbage.crt\n",
    "client-auth-no-ca.yml": (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
    ),
    "plain-password.yml": "basic_auth_users:\n  alice: hunter2\n",
    "users-list.yml": "basic_auth_users:\n  - alice\n",
}


@dataclass(frozen=True)
class Row:
    command: str
    message: str
    exit_code: int


def doc_rows() -> list[Row]:
    """The error table of docs/configuration-errors.md: `command` | `message` | code."""
    rows = []
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            # Cells split on unescaped pipes; `\|` is a pipe inside a message.
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))] \
                if line.startswith("|") else []
            if len(cells) == 4 and cells[1].startswith("`") and cells[2].startswith("`"):
                rows.append(Row(cells[1].strip("`"), cells[2].strip("`"), int(cells[3])))
    return rows


def self_signed(directory: str) -> None:
    """server.crt / server.key for localhost, made with `openssl`."""
    out = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-keyout", os.path.join(directory, "server.key"), "-out", os.path.join(directory, "server.crt")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr


def chattr(flag: str, path: str) -> None:
    out = subprocess.run(["chattr", flag, path], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, f"chattr {flag} {path}: {out.stderr}"


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(directory holding every file the rows name, strerror of the unwritable one)."""
    directory = str(tmp_path)
    self_signed(directory)
    for name, text in WEB_CONFIGS.items():
        Path(directory, name).write_text(text)
    Path(directory, "garbage.crt").write_text("not a certificate\n")
    Path(directory, "file.txt").write_text("a file, not a directory\n")
    readonly = os.path.join(directory, "readonly")
    os.mkdir(readonly)
    os.chmod(readonly, 0o555)
    immutable = os.geteuid() == 0
    if immutable:
        chattr("+i", readonly)
    try:
        yield directory, os.strerror(errno.EPERM if immutable else errno.EACCES)
    finally:
        if immutable:
            chattr("-i", readonly)


def run_row(row: Row, subs: dict[str, str]) -> tuple[Row, str, list[str], int]:
    command = row.command
    for key, val in subs.items():
        command = command.replace(key, val)
    words = shlex.split(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_EXPORTER_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = PYTHONPATH
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, val = words.pop(0).partition("=")
        env[name] = val
    expected = row.message
    for key, val in subs.items():
        expected = expected.replace(key, val)
    out = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli", *words], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    return row, expected, out.stderr.strip().splitlines(), out.returncode


def test_every_documented_bad_input_gives_its_one_line_and_exit_2(scratch: tuple[str, str]) -> None:
    rows = doc_rows()
    assert len(rows) >= 40, f"only {len(rows)} rows parsed from {DOC}"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    directory, denied = scratch
    subs = {"$DIR": directory, "$BUSY_PORT": str(busy.getsockname()[1]), "$CLOSED_PORT": str(free_port()),
            "$DENIED": denied}
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda r: run_row(r, subs), rows))
    finally:
        busy.close()
    problems = []
    for row, expected, lines, code in results:
        if code != row.exit_code or lines != [expected]:
            problems.append(f"{row.command}\n  exit {code} (want {row.exit_code})\n  got:  {lines}\n  want: {expected}")
    assert not problems, "\n".join(problems)


def test_doc_covers_each_required_kind_of_bad_input() -> None:
    """The brief's minimum list, so a trimmed document fails here."""
    commands = " ".join(r.command for r in doc_rows())
    for needle in ["kafka://", "--port 70000", "$BUSY_PORT", "--probe-interval -1", "BUCKETS=", "$DIR/missing ",
                   "$DIR/readonly", "bad-yaml.yml", "missing-cert.yml", "plain-password.yml", "unknown-key.yml",
                   "$CLOSED_PORT"]:
        assert needle in commands + " ", f"no row in {DOC} tries {needle!r}"


def test_serve_keeps_running_for_an_unreachable_broker(tmp_path: Path) -> None:
    """The documented decision: brokers come and go, so serve logs the first
    failure once (one line) and exposes celery_broker_up 0, never exits."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_EXPORTER_")}
    env["PYTHONPATH"] = PYTHONPATH
    with exporter(str(tmp_path), "--broker-url", url, "--probe-interval", "0.5", "--probe-timeout", "0.5",
                  env=env) as ex:
        wait_until(lambda: value(ex.scrape(), "celery_exporter_probe_errors_total", broker=url) >= 3, 30,
                   "three failed probe cycles")
        samples = ex.scrape()
        assert value(samples, "celery_broker_up", broker=url) == 0
        assert ex.proc.poll() is None
        readyz = ex.get("/readyz")
        assert readyz.status_code == 503
        assert readyz.text == f"broker {url} not reachable: ConnectionError\n"
        failures = [line for line in ex.log().splitlines() if "probe failed" in line]
    assert len(failures) == 1, failures
    assert f"WARNING celery_signal_exporter: broker {url} probe failed (connection): ConnectionError: " \
           f"Error 111 connecting to 127.0.0.1:{port}. Connection refused." in failures[0]


def test_check_passes_good_settings_with_one_line(tmp_path: Path, redis_url: str) -> None:
    """The init-container path: the workers' environment, all good, exit 0."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    self_signed(str(tmp_path))
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_EXPORTER_")}
    env.update({"PYTHONPATH": PYTHONPATH, "CELERY_EXPORTER_METRICS_DIR": str(metrics),
                "CELERY_EXPORTER_RUNTIME_BUCKETS": "0.01, 0.1,1,10", "CELERY_EXPORTER_QUEUE_WAIT_BUCKETS": "1,60",
                "CELERY_EXPORTER_BROKER_URL": redis_url, "CELERY_EXPORTER_WEB_CONFIG_FILE": str(config)})
    out = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli",
                          "check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == (f"ok: 4 runtime buckets; 2 queue wait buckets; metrics directory {metrics} writable; "
                          f"web config valid; broker {redis_url} up (0 queues)\n")
    assert os.listdir(metrics) == [], "check left its probe file behind"


def test_parse_buckets_values() -> None:
    """What instrument() and check accept: spaces allowed, floats back, order kept."""
    from celery_signal_exporter.options import parse_buckets

    assert parse_buckets("0.005, 0.01,1 ,60", "X") == (0.005, 0.01, 1.0, 60.0)
    assert parse_buckets("1e-3,2.5E1", "X") == (0.001, 25.0)
    for text, message in [("", "X: no buckets given; expected comma-separated seconds such as 0.1,1,10"),
                          ("1,", "X: bucket 2 is empty; expected comma-separated seconds such as 0.1,1,10"),
                          ("1,-inf", "X: bucket '-inf' must be finite (+Inf is always added)"),
                          ("2,1.5", "X: bucket '1.5' must be greater than the one before it (2)")]:
        with pytest.raises(ValueError) as caught:
            parse_buckets(text, "X")
        assert str(caught.value) == message
