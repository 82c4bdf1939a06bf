"""The command line: help, one-line errors, and the demo from start to Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.harness import PYTHONPATH, ROOT, Samples, free_port, parse, value, wait_until

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
        # A budget, not a target: .ci/run runs this at nice 19 beside the timed tests (quiet: about 10 s).
        wait_until(tasks_done, 180, "the demo's task metrics")
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


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of `pid` from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ", and comm may hold ") "
    return fields[0], int(fields[1]), fields[19]


def process_tree(root: int) -> dict[int, str]:
    """`root` and all its descendants, pid to start time: a pid reused later is no survivor.
    (This kernel has no /proc/<pid>/task/*/children, so the parents come from every /proc/<pid>/stat.)"""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[1], []).append(int(entry))
            starts[int(entry)] = stat[2]
    tree: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return tree


def alive(pid: int, start: str) -> bool:
    """Still running: the same process (same start time), and not a zombie nobody reaped yet."""
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[0] not in ("Z", "X")


#: A task longer than any stop may take: the stop finds a prefork child in the middle of it.
LONG_TASK = 300
#: How long the demo may take to exit once signalled.
EXIT_BOUND = 10.0


def _hang_up_at_default() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_demo_stops_everything_it_started_on_each_signal(signum: signal.Signals, tmp_path: Path) -> None:
    """Ctrl-C, SIGTERM (a process manager, `timeout`) and SIGHUP (a closed terminal) each stop the demo within
    seconds, even while a worker child runs a long task: no process of its tree is left, nor its temporary
    directory (the demo makes it under TMPDIR, here an empty directory of the test's own)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "TMPDIR": str(tmp_path)}
    # A session of its own, like a terminal's job: the signal goes to the demo's whole process group, as
    # Ctrl-C and a hang-up do, and not to pytest's.
    # And SIGHUP at its default, as in a terminal: under `nohup` (a CI runner may use it) the demo inherits
    # it ignored and rightly keeps it so.
    proc = subprocess.Popen([*CMD, "demo", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                            preexec_fn=_hang_up_at_default)
    assert proc.stdout is not None
    tree: dict[int, str] = {}
    try:
        found = re.search(r"in (/\S+);", proc.stdout.readline())
        assert found
        workdir = found.group(1)
        assert os.path.dirname(workdir) == str(tmp_path)

        def scrape() -> Samples | None:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            except httpx.HTTPError:
                return None

        def scraped(metric: str, /, **labels: str) -> float:
            s = scrape()
            return value(s, metric, **labels) if s else 0

        wait_until(lambda: scraped("celery_task_succeeded_total"), 180, "the demo's task metrics")
        send = f"from celery_signal_exporter import demo_app; demo_app.slow.delay({LONG_TASK})"
        subprocess.run([sys.executable, "-c", send], cwd=ROOT, check=True, timeout=60,
                       env={**env, "CELERY_EXPORTER_DEMO_DIR": workdir,
                            "CELERY_EXPORTER_METRICS_DIR": os.path.join(workdir, "metrics")})
        # The demo's own slow tasks take at most 1.5 s: a run older than 3 s is the long one.
        wait_until(lambda: scraped("celery_task_oldest_running_age_seconds", name="demo.slow") > 3, 60,
                   "a worker child in the middle of the long task")
        # The demo, its worker and the worker's two children (a busy machine may still be forking the second).
        def whole_tree() -> dict[int, str] | None:
            tree = process_tree(proc.pid)
            return tree if len(tree) >= 4 else None

        tree = wait_until(whole_tree, 30, "the demo, its worker and the worker's two children")

        os.killpg(proc.pid, signum)
        signalled = time.monotonic()
        rest = proc.communicate(timeout=60)[0]
        took = time.monotonic() - signalled
        print(f"demo exited {took:.1f}s after {signum.name} with {proc.returncode}")
        survivors = {pid: _stat(pid) for pid, start in tree.items() if alive(pid, start)}
        assert not survivors, f"processes of the demo left behind: {survivors}"
        assert not os.path.exists(workdir) and os.listdir(tmp_path) == [], os.listdir(tmp_path)
        assert proc.returncode == 0 and "stopped" in rest, (proc.returncode, rest)
        assert took < EXIT_BOUND, f"the demo took {took:.1f}s to stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, start in tree.items():  # a failed stop leaves nothing running either
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
