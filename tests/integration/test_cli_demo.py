"""The command line: help, one-line errors, and the demo from start to Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import httpx
import pytest

from tests.harness import PYTHONPATH, ROOT, free_port, parse, value, wait_until

CMD = [sys.executable, "-m", "celery_signal_exporter.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})


def test_help_documents_every_serve_option_and_its_environment_variable() -> None:
    out = run("serve", "--help")
    assert out.returncode == 0
    options = re.findall(r"^\s+(--[a-z-]+)", out.stdout, re.M)
    assert "--metrics-dir" in options and "--broker-url" in options and "--probe-interval" in options
    for option in options:
        if option in ("--help", "--oldest-age"):
            continue
        assert f"CELERY_EXPORTER_{option[2:].upper().replace('-', '_')}" in re.sub(r"\s+", "", out.stdout), option


def test_bad_options_exit_2_with_one_line() -> None:
    for args, env, expect in [
        (["serve", "--port", "nope"], {}, "--port"),
        (["serve"], {}, "nothing to export"),
        (["serve", "--broker-url", "kafka://x"], {}, "no broker probe"),
        (["serve", "--metrics-dir", "/tmp", "--probe-interval", "-1"], {}, "--probe-interval"),
        (["serve", "--metrics-dir", "/tmp"], {"CELERY_EXPORTER_WORKER_TIMEOUT": "soon"}, "WORKER_TIMEOUT"),
        (["serve", "--metrics-dir", "/tmp", "--transport-options", "{"], {}, "not JSON"),
        (["serve", "--app", "no.such.module:app"], {}, "cannot load"),
        (["frobnicate"], {}, "No such command"),
    ]:
        out = run(*args, env=env)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("celery-signal-exporter: error:"), out.stderr
        assert expect in lines[0], lines[0]


def test_options_come_from_the_environment(tmp_path: object) -> None:
    port = free_port()
    proc = subprocess.Popen([*CMD, "serve"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": PYTHONPATH, "CELERY_EXPORTER_PORT": str(port),
                                 "CELERY_EXPORTER_HOST": "127.0.0.1", "CELERY_EXPORTER_METRICS_DIR": str(tmp_path)})
    try:
        def answers() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 30, "the exporter configured from the environment")
        index = httpx.get(f"http://127.0.0.1:{port}/")
        assert index.status_code == 200 and "/metrics" in index.text
        om = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        gz = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
        assert gz.headers.get("content-encoding") == "gzip" and "celery_exporter_build_info" in gz.text
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def wheel_command(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The package built as sdist and wheel, checked by twine, and the wheel installed (not editable)
    into a fresh virtualenv: its `celery-signal-exporter` command. A data file missing from the wheel
    fails the demo run with it."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), ROOT],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with zipfile.ZipFile(wheels[0]) as wheel:
        top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"celery_signal_exporter"}, f"the wheel installs other top-level names: {top}"
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheels[0])],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return [str(venv / "bin" / "celery-signal-exporter")]


@pytest.mark.parametrize("installed", ["source", "wheel"])
def test_demo_serves_task_metrics_and_stops_cleanly_on_sigint(installed: str, request: pytest.FixtureRequest) -> None:
    port = free_port()
    command = CMD if installed == "source" else request.getfixturevalue("wheel_command")
    env = {**os.environ, "PYTHONPATH": PYTHONPATH} if installed == "source" else \
        {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cwd = ROOT if installed == "source" else "/"  # the wheel's run must not find the source tree
    proc = subprocess.Popen([*command, "demo", "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()
        workdir = re.search(r"in (/\S+);", first)
        assert workdir, first
        assert f"http://127.0.0.1:{port}/metrics" in proc.stdout.readline()

        def tasks_done() -> float:
            try:
                s = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            except httpx.HTTPError:
                return 0
            return value(s, "celery_task_succeeded_total") and value(s, "celery_task_failed_total") \
                and value(s, "celery_task_retried_total") and value(s, "celery_task_sent_total")

        started = time.monotonic()
        wait_until(tasks_done, 60, "the demo's task metrics")
        print(f"demo served task metrics after {time.monotonic() - started:.1f}s")
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, rest
        assert "stopped" in rest
        assert not os.path.exists(workdir.group(1)), "the demo leaves nothing behind"
        leftovers = subprocess.run(["pgrep", "-f", workdir.group(1)], capture_output=True, text=True)
        assert leftovers.stdout == "", "no worker process survives the demo"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
