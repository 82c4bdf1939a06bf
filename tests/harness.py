"""The harness: the one way each to start what the integration and system tests run for real: a
private Redis (RedisServer), a RabbitMQ vhost (rabbit_vhost), a worker (worker), beat (beat), the
exporter (exporter, ExporterProcess) and producers (produce). Prometheus and Alertmanager: tests/stack.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.directory import read_entries
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.recorded import observe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: PYTHONPATH for child processes: this checkout's tests and its package source, ahead of any
#: installed copy, so a second checkout (a git worktree) tests its own code.
PYTHONPATH = os.pathsep.join((ROOT, os.path.join(ROOT, "exporter")))
T = TypeVar("T")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: The machine's RabbitMQ (bash .ci/services.sh), shared: each test gets a vhost of its own on it.
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("TEST_AMQP_PORT", "5672"))
RABBIT_MGMT_PORT = int(os.environ.get("TEST_RABBIT_MGMT_PORT", "15672"))


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
    them off again (tests/integration/test_task_resources.py proves what off means)."""
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


def exporter_env() -> dict[str, str]:
    """This environment without anything that would configure the exporter behind the test's back
    (CELERY_EXPORTER_*, PROMETHEUS_MULTIPROC_DIR), and with this checkout's code first."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CELERY_EXPORTER_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = PYTHONPATH
    return env


class ExporterProcess:
    """`celery-signal-exporter serve ARGS` as a real process on a free port (or `port`: a replacement
    sidecar on the address Prometheus scrapes). It may be killed and started again on the same port;
    a context manager too: started on entry, stopped on exit.

    `env`: exporter_env() unless told; `host`, `scheme`, `verify`: where and how to reach it (an IPv6
    or wildcard address, TLS with the test's CA); `show_log=False` keeps its log out of a failure
    message, where the log may hold the very secret a test looks for."""

    def __init__(self, tmp: str | os.PathLike[str], *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, host: str = "127.0.0.1", scheme: str = "http",
                 verify: ssl.SSLContext | bool = True, show_log: bool = True) -> None:
        self.tmp, self.args = os.fspath(tmp), args
        self.env = env if env is not None else exporter_env()
        self.port = port or free_port()
        self.host, self.verify, self.show_log = host, verify, show_log
        netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.url = f"{scheme}://{netloc}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_paths: list[str] = []  # one a start

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start it and wait for /healthz (never protected); returns the time it answered."""
        log_path = os.path.join(self.tmp, f"exporter-{self.port}-{uuid.uuid4().hex[:6]}.log")
        self.log_paths.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = proc = subprocess.Popen(
                [sys.executable, "-m", "celery_signal_exporter.cli",
                 "serve", "--host", self.host, "--port", str(self.port), *self.args],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )

        def healthy() -> bool:
            if proc.poll() is not None:
                shown = f":\n{self.log()}" if self.show_log else " (its log is not shown)"
                raise AssertionError(f"exporter exited {proc.returncode}{shown}")
            try:
                return self.get("/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "the exporter to answer /healthz", interval=0.05)
        return time.time()

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> float:
        """SIGKILL, as a crash or an OOM kill would; returns when it was killed."""
        assert self.proc is not None
        self.proc.kill()
        killed = time.time()
        self.proc.wait(30)
        return killed

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("verify", self.verify)
        return httpx.get(self.url + path, **kwargs)

    def scrape(self) -> Samples:
        r = self.get("/metrics")
        assert r.status_code == 200, r.text
        return parse(r.text)

    def log(self) -> str:
        """What every start of it wrote, in order."""
        out = []
        for path in self.log_paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                out.append(f.read())
        return "".join(out)

    def __enter__(self) -> ExporterProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def exporter(tmp: str | os.PathLike[str], *args: str, env: dict[str, str] | None = None, port: int | None = None,
             host: str = "127.0.0.1", scheme: str = "http", verify: ssl.SSLContext | bool = True,
             show_log: bool = True) -> ExporterProcess:
    """The exporter for a `with` block: `with exporter(tmp, "--metrics-dir", d) as ex:` (see ExporterProcess)."""
    return ExporterProcess(tmp, *args, env=env, port=port, host=host, scheme=scheme, verify=verify,
                           show_log=show_log)


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
        return _is_up(collector, "celery_worker_up", hostname=hostname)

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


def _is_up(collector: DirectoryCollector, metric: str, **labels: str) -> bool:
    """Whether the directory serves `metric` at 1 with `labels`: a heartbeat is on disk."""
    return any(s.name == metric and s.value == 1 and all(s.labels.get(k) == v for k, v in labels.items())
               for family in collector.collect() for s in family.samples)


class BeatProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: str) -> None:
        self.proc, self.log_path = proc, log_path

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextmanager
def beat(env: dict[str, str], tmp: str, *args: str, app: str = "tests.beat_app") -> Iterator[BeatProcess]:
    """A real `celery beat` on `app` with its schedule file in `tmp`, ready once its heartbeat is in the
    metrics directory of `env`; stopped with SIGTERM (SIGKILL after 20 s) unless the test killed it."""
    log_path = os.path.join(tmp, f"beat-{uuid.uuid4().hex[:6]}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "beat", "-s", os.path.join(tmp, "schedule"), *args,
             "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    b = BeatProcess(proc, log_path)
    collector = DirectoryCollector(env["CELERY_EXPORTER_METRICS_DIR"], worker_timeout=3)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"beat exited {proc.returncode}:\n{b.log()[-4000:]}")
        return _is_up(collector, "celery_beat_up")

    try:
        wait_until(up, 60, "beat to write its heartbeat")
        yield b
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


def write_as_dead_process(directory: str, body: Callable[[Store], None]) -> int:
    """Fork, write with a fresh store in the child, exit; returns the dead child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            store = Store(directory)
            body(store)
        except BaseException:  # noqa: BLE001 - report through the exit code
            code = 1
        os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    return pid


def running_children(metrics_dir: str, task: str) -> set[int]:
    """Pids whose live file shows `task` in progress (a killed one's until it is reaped)."""
    pids = set()
    for name in os.listdir(metrics_dir):
        if not name.startswith("gauge_livesum_"):
            continue
        try:
            with open(os.path.join(metrics_dir, name), "rb") as f:
                entries = list(read_entries(f.read()))
        except (OSError, ValueError):
            continue
        if any("celery_task_in_progress" in key and f'"{task}"' in key and v > 0 for key, v, _ in entries):
            pids.add(int(name[len("gauge_livesum_"):-3].split("-")[0]))
    return pids


JUNK = 50_000


def make_junk(directory: str, n: int = JUNK) -> None:
    """Foreign and damaged files under our names, and names that are nobody's: a third of each."""
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            open(os.path.join(directory, f"counter_{900000 + i}.db"), "wb").close()  # empty
        elif kind == 1:  # garbage: a header no reader accepts, so nobody may judge or delete it
            with open(os.path.join(directory, f"gauge_livesum_{900000 + i}.db"), "wb") as f:
                f.write(b"\xff\xff\xff\x7f" + i.to_bytes(8, "little") * 7)
        else:
            with open(os.path.join(directory, f"junk-{i}.txt"), "wb") as f:
                f.write(b"not ours")


def settle(directory: str) -> None:
    """Age the directory's mtime past the window in which a listing is not trusted (no sleeping)."""
    past = time.time() - 10
    os.utime(directory, (past, past))


KEY, SECRET = "AKIDCSXTEST", "s3cr/t+key@#"  # moto without auth accepts any key
REGION = "us-east-1"


def broker_url(endpoint: str, key: str = KEY, secret: str = SECRET) -> str:
    from urllib.parse import quote

    return f"sqs://{quote(key, safe='')}:{quote(secret, safe='')}@{endpoint.removeprefix('http://')}"


def sqs_client(endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (the tests start their own Redis); "
                    "bash .ci/services.sh installs it", pytrace=False)
    return binary


class RedisServer:
    """A private redis-server on a free port, so no test writes into a Redis it did not start: no
    persistence, its log in `workdir`. `kill` and `start` again give an empty Redis on the same port,
    as after a crash. A context manager too: started on entry, killed on exit."""

    def __init__(self, workdir: str | os.PathLike[str], *, password: str | None = None,
                 maxmemory: str | None = None, databases: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.workdir = os.fspath(workdir)
        self.port = free_port()
        self.log_path = os.path.join(self.workdir, f"redis-{self.port}.log")
        self.options: list[str] = []
        if password is not None:
            self.options += ["--requirepass", password]
        if maxmemory is not None:
            self.options += ["--maxmemory", maxmemory]
        if databases is not None:
            self.options += ["--databases", str(databases)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>`, no database index and no password."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and return once it answers PING (NOAUTH counts: it is serving)."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--logfile", self.log_path, *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"private redis-server exited with {self.proc.returncode}:\n{self.log()}", pytrace=False)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"private redis-server did not answer PING on port {self.port} within 30 s", pytrace=False)

    def kill(self) -> None:
        """SIGKILL: nothing is persisted, so there is nothing a gentler stop would save."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(30)
            self.proc = None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextmanager
def rabbit_vhost(prefix: str = "csx-test") -> Iterator[str]:
    """A fresh vhost on the shared RabbitMQ (guest has full rights on it), deleted after: what a test
    publishes there is nobody else's, and nothing of it stays."""
    from pyrabbit2.api import Client

    client = Client(f"{AMQP_HOST}:{RABBIT_MGMT_PORT}", "guest", "guest")
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    client.create_vhost(vhost)
    client.set_vhost_permissions(vhost, "guest", ".*", ".*", ".*")
    try:
        yield vhost
    finally:
        client.delete_vhost(vhost)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (bash .ci/tools.sh does)", pytrace=False)
    return path


def files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if not f.startswith("."))


def one_task(i: int) -> Callable[[Store], None]:
    def body(store: Store) -> None:
        m.Recorder(store, c.SENT).labels("a", "q").inc()
        observe(store, m.Recorder(store, c.RUNTIME, (0.1, 1)).labels("a", "q"), 0.5)
        m.Recorder(store, c.IN_PROGRESS).labels("a", "q").inc()  # died mid-task: must not be counted
        m.Recorder(store, c.LAST_SUCCESS).labels("a").set(1000.0 + i)
    return body
