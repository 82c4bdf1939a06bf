# ruff: noqa: RUF001, RUF002, RUF003 - the tables print × – ≤ ≥ on purpose
"""Shared pieces of the benchmarks: statistics, brokers, machine facts, result sections.

Why alternate: the machine is shared and noisy, so variants run A B A B …
and every comparison is a ratio taken inside one round, where both sides
saw the same background load.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONPATH = os.pathsep.join((ROOT, os.path.join(ROOT, "exporter")))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("TEST_AMQP_PORT", "5672"))
MGMT_PORT = int(os.environ.get("TEST_RABBIT_MGMT_PORT", "15672"))
#: Where metrics directories go: tmpfs, as the README's sidecar (an emptyDir in memory) has it.
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
#: Redis databases the benchmarks may use; the test suite's lock files keep the two apart.
BENCH_DBS = range(10, 16)
T = TypeVar("T")


@dataclass
class Size:
    """How big each benchmark runs: `tiny` for the smoke test, `full` for results.md."""

    name: str
    rounds: int  # alternating rounds for the worker comparison
    publish_rounds: int  # alternating rounds for the publish comparison (cheap runs, noisy: more of them)
    publish_n: int
    worker_n: int
    cost_n: int
    cost_runs: int
    scrape_points: str  # "tiny" or "full" grid
    scrape_budget_s: float  # seconds of scraping per grid point and side
    probe_redis_queues: int
    probe_rabbit_queues: int
    probe_repeat: int
    hook_calls: int
    instr_n: int  # tasks per callgrind run (minus a run of 0), publish and solo worker
    instr_prefork_n: int  # the same for the prefork child's share; 0 skips it


TINY = Size("tiny", rounds=1, publish_rounds=1, publish_n=200, worker_n=200, cost_n=200, cost_runs=1,
            scrape_points="tiny", scrape_budget_s=0.3, probe_redis_queues=50, probe_rabbit_queues=20, probe_repeat=3,
            hook_calls=2000, instr_n=5, instr_prefork_n=0)
FULL = Size("full", rounds=7, publish_rounds=9, publish_n=4000, worker_n=6000, cost_n=6000, cost_runs=3,
            scrape_points="full", scrape_budget_s=4.0, probe_redis_queues=1000, probe_rabbit_queues=500,
            probe_repeat=20, hook_calls=50000, instr_n=1000, instr_prefork_n=300)


@dataclass
class Target:
    """One target of the issue, with the number measured against it."""

    what: str
    limit: str
    measured: str
    ok: bool


@dataclass
class Section:
    """A benchmark's results: one markdown table, notes, and the targets it decides."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the value q% of the samples are at or under."""
    ordered = sorted(values)
    rank = max(1, int(-(-len(ordered) * q // 100)))
    return float(ordered[min(rank, len(ordered)) - 1])


def spread(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """'median (min–max, n=…)': the spread a reader needs to judge the median."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))}, n={len(values)})"


def alternate(variants: Sequence[str], rounds: int, run: Callable[[str, int], T]) -> dict[str, list[T]]:
    """Run every variant once per round, rotating the order (A B C, B C A, …) so none always goes first."""
    out: dict[str, list[T]] = {v: [] for v in variants}
    for r in range(rounds):
        k = r % len(variants)
        for v in [*variants[k:], *variants[:k]]:
            out[v].append(run(v, r))
    return out


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios: each pair was measured in the same round."""
    return [a / b for a, b in zip(num, den, strict=True)]


@contextlib.contextmanager
def redis_db() -> Iterator[int]:
    """A Redis db in 10-15 that no test run or other benchmark holds (same lock files as the tests), flushed."""
    import redis

    for db in BENCH_DBS:
        lock = open(f"/tmp/celery-signal-exporter-test-redis-db-{db}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        break
    else:
        raise RuntimeError("Redis databases 10-15 are all held by test runs; try again later")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    client.flushdb()
    try:
        yield db
    finally:
        client.flushdb()
        client.close()
        lock.close()


def redis_url(db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


@contextlib.contextmanager
def rabbit_vhost() -> Iterator[str]:
    """A private RabbitMQ vhost for guest, deleted after: other work on the broker is untouched."""
    from pyrabbit2.api import Client

    admin = Client(f"{AMQP_HOST}:{MGMT_PORT}", "guest", "guest")
    vhost = f"csx-bench-{uuid.uuid4().hex[:8]}"
    admin.create_vhost(vhost)
    admin.set_vhost_permissions(vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
    finally:
        admin.delete_vhost(vhost)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of benchmark subprocesses: the repo importable, no stray multiprocess dir."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("CELERY_EXPORTER_METRICS_DIR", None)
    env["PYTHONPATH"] = PYTHONPATH
    env.update(extra)
    return env


def run_json(args: list[str], env: dict[str, str], timeout: float = 300) -> Any:
    """Run a Python module of ours in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of one process, to the nanosecond.

    Why not /proc/PID/stat: its 10 ms ticks are 1-2% of a short run's CPU, as
    large as the differences measured. The process's CPU clock
    (clock_getcpuclockid) is exact; /proc is the fallback where it is refused.
    """
    clock = ctypes.c_int()
    spec = _Timespec()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0 and \
            _libc.clock_gettime(clock, ctypes.byref(spec)) == 0:
        return float(spec.tv_sec) + spec.tv_nsec / 1e9
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of one process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine() -> dict[str, str]:
    """The facts a reader needs to compare these numbers with their own."""
    from importlib.metadata import version

    import celery
    import kombu
    import prometheus_client  # noqa: F401 - its version below
    import redis

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts = {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "load average (1/5/15 min) at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "prometheus-client": version("prometheus-client"),
        "metrics directories on": f"{SHM} (tmpfs, like the README's in-memory emptyDir)" if SHM else "/tmp",
    }
    try:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5)
        facts["Redis server"] = str(client.info("server")["redis_version"])
        client.close()
    except redis.RedisError as exc:
        facts["Redis server"] = f"unreachable ({type(exc).__name__})"
    try:
        from pyrabbit2.api import Client

        overview = Client(f"{AMQP_HOST}:{MGMT_PORT}", "guest", "guest").get_overview()
        facts["RabbitMQ server"] = f"{overview['rabbitmq_version']} (Erlang {overview['erlang_version']})"
    except Exception as exc:  # noqa: BLE001 - a fact, not a failure
        facts["RabbitMQ server"] = f"unreachable ({type(exc).__name__})"
    return facts
