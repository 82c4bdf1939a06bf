"""Real processes for the integration tests: workers, producers, the exporter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: PYTHONPATH for child processes: this checkout's tests and its package source, ahead of any
#: installed copy, so a second checkout (a git worktree) tests its own code.
PYTHONPATH = os.pathsep.join((ROOT, os.path.join(ROOT, "exporter")))
T = TypeVar("T")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(broker_url: str, metrics_dir: str, **extra: str) -> dict[str, str]:
    """The environment of a test's worker or producer. The opt-in per-task measures (CPU, memory
    growth, publish time) are on, so the apps and dashboards show every series; `extra` can turn
    them off again (tests/test_task_resources.py proves what off means)."""
    env = dict(os.environ)
    env.update({"CSX_TEST_BROKER": broker_url, "CELERY_EXPORTER_METRICS_DIR": metrics_dir,
                "CELERY_EXPORTER_TASK_RESOURCES": "1", "CELERY_EXPORTER_PUBLISH_TIMING": "1",
                "PYTHONPATH": PYTHONPATH, **extra})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def produce(env: dict[str, str], scenario: str, *args: int) -> Any:
    """Run one producer process to completion and return what it printed."""
    out = subprocess.run([sys.executable, "-m", "tests.workload_app", scenario, *map(str, args)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise AssertionError(f"producer {scenario} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and want <= ls)


def has(samples: Samples, metric: str, /, **labels: str) -> bool:
    want = set(labels.items())
    return any(n == metric and want <= ls for (n, ls) in samples)


class ExporterProcess:
    def __init__(self, proc: subprocess.Popen[str], port: int, log_path: str) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)

    def scrape(self) -> Samples:
        r = self.get("/metrics")
        assert r.status_code == 200, r.text
        return parse(r.text)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextmanager
def exporter(tmp: str, *args: str, env: dict[str, str] | None = None,
             port: int | None = None) -> Iterator[ExporterProcess]:
    """`celery-signal-exporter serve` as a real process on a free port (or `port`: a replacement sidecar)."""
    port = port or free_port()
    log_path = os.path.join(tmp, f"exporter-{port}-{uuid.uuid4().hex[:6]}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery_signal_exporter.cli",
             "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT, env=env or dict(os.environ, PYTHONPATH=PYTHONPATH), stdout=log, stderr=subprocess.STDOUT,
            text=True,
        )
    ex = ExporterProcess(proc, port, log_path)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exporter exited {proc.returncode}:\n{ex.log()}")
        try:
            return ex.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 30, "the exporter to answer /healthz")
        yield ex
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], hostname: str, log_path: str) -> None:
        self.proc, self.hostname, self.log_path = proc, hostname, log_path

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextmanager
def worker(env: dict[str, str], tmp: str, *args: str, concurrency: int = 2, pool: str = "prefork",
           queues: str = "alpha,beta", app: str = "tests.workload_app",
           hostname: str | None = None, launcher: Sequence[str] = ()) -> Iterator[WorkerProcess]:
    """A real `celery worker` on `app` (tests.workload_app), ready once its heartbeat is on disk.
    `launcher`: a command that execs the worker command given as its arguments."""
    from celery_signal_exporter.server.collect import DirectoryCollector

    hostname = hostname or f"w{uuid.uuid4().hex[:6]}@test"
    log_path = os.path.join(tmp, f"worker-{hostname}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool,
             "-c", str(concurrency), "-Q", queues, "-n", hostname, "--loglevel", "INFO", "--without-gossip",
             "--without-mingle", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    w = WorkerProcess(proc, hostname, log_path)
    collector = DirectoryCollector(env["CELERY_EXPORTER_METRICS_DIR"])

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}:\n{w.log()[-4000:]}")
        for family in collector.collect():
            for s in family.samples:
                if s.name == "celery_worker_up" and s.labels.get("hostname") == hostname and s.value == 1:
                    return True
        return False

    try:
        wait_until(up, 60, f"worker {hostname} to write its heartbeat")
        yield w
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
