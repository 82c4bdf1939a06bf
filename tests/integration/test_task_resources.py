"""Per-task measures against real workers, producers and brokers: memory growth, CPU seconds,
publish time, and the AMQP timestamp property.

- Memory and CPU: each pool (prefork, threads, solo, gevent, eventlet on Redis; prefork on
  RabbitMQ) runs, phase by phase so that no run overlaps another: trivial runs and a 1 s
  sleep, then 1 s of CPU spinning, then a run holding 200 MB, then trivial runs again.
- Publish: a producer behind a loopback proxy that delays every chunk it forwards to Redis
  by 100 ms, against one talking to Redis directly.
- Timestamp: a message published to RabbitMQ carries the `timestamp` property (read back with
  kombu, and as the management API's `head_message_timestamp`); a user's own one is kept.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.conftest import AMQP_HOST, RABBIT_MGMT_PORT
from tests.harness import PYTHONPATH, ROOT, Samples, env_for, exporter, has, value, wait_until, worker

APP = "tests.resources_app"
MiB = 2**20
#: (pool, concurrency, broker)
POOLS = [("prefork", 2, "redis"), ("threads", 2, "redis"), ("solo", 1, "redis"), ("gevent", 4, "redis"),
         ("eventlet", 4, "redis"), ("prefork", 2, "rabbitmq")]
DELAY = 0.1


def publish(env: dict[str, str], name: str, count: int, *args: float) -> list[float]:
    """Run one producer process; returns how long each of its send_task calls took."""
    out = subprocess.run([sys.executable, "-m", APP, "publish", name, str(count), *map(str, args)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"producer of {name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    took: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return took


def run_phase(ex: Any, env: dict[str, str], runs: dict[str, int], name: str, count: int, *args: float) -> Samples:
    """Publish `count` runs of `name` and wait until every run so far has succeeded."""
    publish(env, name, count, *args)
    runs[name] = runs.get(name, 0) + count

    def done() -> Samples | None:
        s = ex.scrape()
        finished = all(value(s, "celery_task_succeeded_total", name=n) == c for n, c in runs.items())
        return s if finished and value(s, "celery_task_in_progress") == 0 else None

    result: Samples = wait_until(done, 60, f"{runs} to succeed")
    return result


@pytest.mark.parametrize(("pool", "concurrency", "broker"), POOLS, ids=[f"{p}-{b}" for p, _, b in POOLS])
def test_memory_growth_and_cpu_seconds_per_run(request: pytest.FixtureRequest, tmp_path: Path, pool: str,
                                               concurrency: int, broker: str) -> None:
    url = str(request.getfixturevalue("redis_url" if broker == "redis" else "amqp_url"))
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(url, metrics_dir)
    runs: dict[str, int] = {}
    with worker(env, str(tmp_path), pool=pool, concurrency=concurrency, queues="res", app=APP) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        s = run_phase(ex, env, runs, "r.trivial", 3)
        # Created with the other task series, at the first run: at 0 for a run that used next to nothing.
        for metric in ("celery_task_cpu_seconds_total", "celery_task_memory_growth_bytes_sum"):
            assert has(s, metric, name="r.trivial", queue_name="res"), metric
        run_phase(ex, env, runs, "r.sleep", 1, 1.0)
        run_phase(ex, env, runs, "r.spin", 1, 1.0)
        run_phase(ex, env, runs, "r.alloc", 1)
        s = run_phase(ex, env, runs, "r.trivial", 2)
        log = w.log()

    def v(metric: str, /, **labels: str) -> float:
        return value(s, metric, queue_name="res", **labels)

    # CPU: spinning 1 s of its thread's CPU against sleeping 1 s.
    assert v("celery_task_cpu_seconds_total", name="r.spin") >= 0.8
    assert v("celery_task_cpu_seconds_total", name="r.sleep") <= 0.1
    assert v("celery_task_cpu_seconds_total", name="r.trivial") <= 0.1
    assert v("celery_task_runtime_seconds_sum", name="r.sleep") >= 1.0
    # Memory: the 200 MB run stands out; no trivial run set a new peak worth a bucket.
    assert v("celery_task_memory_growth_bytes_count", name="r.alloc") == 1
    assert v("celery_task_memory_growth_bytes_sum", name="r.alloc") >= 150e6
    assert v("celery_task_memory_growth_bytes_bucket", name="r.alloc", le=str(64 * MiB)) == 0
    assert v("celery_task_memory_growth_bytes_bucket", name="r.alloc", le=str(4096 * MiB)) == 1
    assert v("celery_task_memory_growth_bytes_count", name="r.trivial") == 5
    assert v("celery_task_memory_growth_bytes_bucket", name="r.trivial", le=str(MiB)) == 5
    for name in ("r.sleep", "r.spin"):
        assert v("celery_task_memory_growth_bytes_count", name=name) == 1
    assert value(s, "celery_exporter_handler_errors_total") == 0, log


#: Execs its arguments after raising its own peak RSS to 600 MB: Linux carries ru_maxrss over execve.
BIG_LAUNCHER = (sys.executable, "-c",
                "import os, sys; b = b'x' * (600 << 20); del b; os.execv(sys.argv[1], sys.argv[1:])")


def test_memory_growth_when_the_worker_inherits_a_larger_peak(redis_url: str, tmp_path: Path) -> None:
    """A worker exec'd by a process that once held 600 MB (a supervisor, a test runner) still shows
    a 200 MB run: its first run finds the inherited peak and reads the process's own one instead."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    runs: dict[str, int] = {}
    with worker(env, str(tmp_path), pool="solo", concurrency=1, queues="res", app=APP, launcher=BIG_LAUNCHER), \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        run_phase(ex, env, runs, "r.trivial", 1)
        s = run_phase(ex, env, runs, "r.alloc", 1)
    assert value(s, "celery_task_memory_growth_bytes_sum", name="r.alloc", queue_name="res") >= 150e6



class DelayProxy:
    """A loopback TCP proxy that forwards what a client sends `delay` seconds after it arrived
    (in order), and what the server answers at once: a far broker, for the producer."""

    def __init__(self, port: int, delay: float) -> None:
        self.target, self.delay = port, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
            threading.Thread(target=self._read, args=(client, chunks), daemon=True).start()
            threading.Thread(target=self._forward_late, args=(chunks, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _read(self, src: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        try:
            while data := src.recv(65536):
                chunks.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        chunks.put((0.0, b""))

    @staticmethod
    def _forward_late(chunks: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        try:
            while True:
                due, data = chunks.get()
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)
        except OSError:
            pass

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_publish_time_through_a_slow_link(redis_url: str, tmp_path: Path) -> None:
    metrics_dir = str(tmp_path / "metrics")
    parts = urlsplit(redis_url)
    assert parts.port is not None
    proxy = DelayProxy(parts.port, DELAY)
    try:
        slow_url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))
        slow = publish(env_for(slow_url, metrics_dir), "r.via_slow_link", 8)
    finally:
        proxy.close()
    publish(env_for(redis_url, metrics_dir), "r.direct", 20)
    assert min(slow) >= DELAY, slow  # the producer's own clock agrees the link is slow
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        s = ex.scrape()

    def v(metric: str, /, **labels: str) -> float:
        return value(s, metric, queue_name="res", **labels)

    assert v("celery_task_sent_total", name="r.via_slow_link") == 8
    assert v("celery_task_publish_seconds_count", name="r.via_slow_link") == 8
    # p50 above 90 ms: more than half the publishes took longer than the 0.1 s bound (in fact all).
    assert v("celery_task_publish_seconds_bucket", name="r.via_slow_link", le="0.1") < 8 / 2
    assert v("celery_task_publish_seconds_bucket", name="r.via_slow_link", le="0.03") == 0
    assert v("celery_task_publish_seconds_sum", name="r.via_slow_link") >= 8 * DELAY
    assert v("celery_task_sent_total", name="r.direct") == 20
    assert v("celery_task_publish_seconds_count", name="r.direct") == 20
    # p50 below 10 ms: more than half took at most 0.01 s.
    assert v("celery_task_publish_seconds_bucket", name="r.direct", le="0.01") > 10
    assert value(s, "celery_exporter_handler_errors_total") == 0


STAMPED = """
import sys, time
from tests.resources_app import app
app.send_task("r.trivial", queue="res")
app.send_task("r.trivial", queue="res", timestamp=1234567890)
"""


def test_rabbitmq_messages_carry_the_timestamp_property(amqp_url: str, amqp_vhost: str, tmp_path: Path) -> None:
    from kombu import Connection, Queue

    env = env_for(amqp_url, str(tmp_path / "metrics"))
    before = int(time.time())
    out = subprocess.run([sys.executable, "-c", STAMPED], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    after = time.time()

    # The management API shows the head message's timestamp, which the RabbitMQ probe reads as its age.
    def head_stamp() -> int | None:
        r = httpx.get(f"http://{AMQP_HOST}:{RABBIT_MGMT_PORT}/api/queues/{amqp_vhost}/res", auth=("guest", "guest"),
                      timeout=10)
        stamp = r.json().get("head_message_timestamp") if r.status_code == 200 else None
        return stamp if isinstance(stamp, int) else None

    stamp = wait_until(head_stamp, 30, "the management API to show the queue's head_message_timestamp", interval=0.5)
    assert before <= stamp <= after

    with Connection(amqp_url) as conn, conn.channel() as channel:
        res = Queue("res")(channel)
        first, second = res.get(no_ack=True), res.get(no_ack=True)
    assert first is not None and second is not None
    assert isinstance(first.properties["timestamp"], int)
    assert before <= first.properties["timestamp"] <= after
    assert second.properties["timestamp"] == 1234567890  # the user's own is kept


BUCKETS = """
from celery import Celery
import celery_signal_exporter
inst = celery_signal_exporter.instrument(Celery("x"), metrics_dir={d!r})
print(inst.options.memory_growth_buckets, inst.options.publish_buckets)
"""


def test_buckets_from_the_environment_and_their_defaults(tmp_path: Path) -> None:
    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", BUCKETS.format(d=str(tmp_path))], cwd=ROOT, capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": PYTHONPATH, **env})

    out = run({})
    assert out.returncode == 0, out.stderr
    growth, publish_ = out.stdout.strip().split(") (")
    assert growth.startswith(f"({float(MiB)}, ") and growth.endswith(f", {float(4096 * MiB)}")
    assert publish_.startswith("0.001, ") and publish_.endswith(", 10.0)")
    out = run({"CELERY_EXPORTER_MEMORY_GROWTH_BUCKETS": "1e6,1e9", "CELERY_EXPORTER_PUBLISH_BUCKETS": "0.5,2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1000000.0, 1000000000.0) (0.5, 2.0)"
    out = run({"CELERY_EXPORTER_MEMORY_GROWTH_BUCKETS": "0"})
    assert out.stderr.strip().splitlines()[-1] == "ValueError: memory_growth_buckets: bucket '0' must be greater than 0"


def test_off_unless_asked_for_the_series_are_absent(redis_url: str, tmp_path: Path) -> None:
    """Without the switches (the default), a real worker and producer write no CPU, memory growth or
    publish time series, and everything else as before."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir, CELERY_EXPORTER_TASK_RESOURCES="0", CELERY_EXPORTER_PUBLISH_TIMING="")
    runs: dict[str, int] = {}
    with worker(env, str(tmp_path), pool="solo", concurrency=1, queues="res", app=APP) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        run_phase(ex, env, runs, "r.spin", 1, 0.2)
        s = run_phase(ex, env, runs, "r.trivial", 2)
        log = w.log()
    assert value(s, "celery_task_sent_total", name="r.trivial", queue_name="res") == 2
    assert value(s, "celery_task_runtime_seconds_count", name="r.spin", queue_name="res") == 1
    assert value(s, "celery_task_runtime_seconds_sum", name="r.spin", queue_name="res") >= 0.2
    for metric in ("celery_task_cpu_seconds_total", "celery_task_memory_growth_bytes_count",
                   "celery_task_publish_seconds_count"):
        assert not has(s, metric), metric
    assert value(s, "celery_exporter_handler_errors_total") == 0, log


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_off_the_reads_are_not_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """The cost is not paid: with the switches off, no CPU clock, getrusage or publish clock is read
    (counted by replacing them), and the file holds none of their series. On, all of them are."""
    from celery import Celery

    from celery_signal_exporter.recording import receivers as r

    calls: dict[str, int] = {"thread_time": 0, "getrusage": 0, "perf_counter": 0}

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            calls[name] += 1
            return fn(*args)
        return wrapper

    for name in calls:
        monkeypatch.setattr(r, f"_{name}", counted(name, getattr(r, f"_{name}")))
    app = Celery("off", broker="memory://", set_as_current=False)
    inst = r.Instrumentation(app, r.Options(str(tmp_path), task_resources=on, publish_timing=on))

    @app.task(name="r.off", shared=False)
    def task() -> None:
        return None

    headers: dict[str, Any] = {"id": "x", "eta": None}
    inst.before_publish(sender="r.off", exchange="", routing_key="res", headers=headers, properties={})
    inst.after_publish(sender="r.off", exchange="", routing_key="res", headers=headers)
    assert calls["perf_counter"] == (2 if on else 0)  # the publish side's only clock is its timing
    delivery = {"exchange": "", "routing_key": "res", "consumer_tag": None}
    task.push_request(id="x", delivery_info=delivery, **{r.QUEUE_HEADER: "res", r.DUE_HEADER: time.time()})
    inst.on_prerun(sender=task, task_id="x", task=task)
    inst.on_postrun(sender=task, task_id="x", task=task, state="SUCCESS")
    task.pop_request()
    assert calls["thread_time"] == (2 if on else 0)
    assert calls["getrusage"] == (2 if on else 0)  # on: the first run reads the peak at prerun too
    keys = " ".join(key for f in inst.store._files.values() for key in f._slots)
    assert "celery_task_runtime_seconds" in keys and "celery_task_succeeded" in keys
    for metric in ("celery_task_cpu_seconds", "celery_task_memory_growth_bytes", "celery_task_publish_seconds"):
        assert (metric in keys) is on, metric
    assert not inst._logged_errors


SWITCHES = """
from celery import Celery
import celery_signal_exporter
inst = celery_signal_exporter.instrument(Celery("x"), metrics_dir={d!r}{extra})
print(inst.options.task_resources, inst.options.publish_timing)
"""


def test_the_switches_from_a_keyword_or_the_environment(tmp_path: Path) -> None:
    def run(env: dict[str, str], extra: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", SWITCHES.format(d=str(tmp_path), extra=extra)], cwd=ROOT,
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": PYTHONPATH,
                                                                  **env})

    assert run({}).stdout.strip() == "False False"
    assert run({}, ", task_resources=True").stdout.strip() == "True False"
    assert run({}, ", publish_timing=True").stdout.strip() == "False True"
    out = run({"CELERY_EXPORTER_TASK_RESOURCES": "1", "CELERY_EXPORTER_PUBLISH_TIMING": " Yes "})
    assert out.stdout.strip() == "True True", out.stderr
    assert run({"CELERY_EXPORTER_TASK_RESOURCES": "off"}).stdout.strip() == "False False"
    out = run({"CELERY_EXPORTER_TASK_RESOURCES": "maybe"})
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "ValueError: CELERY_EXPORTER_TASK_RESOURCES: expected 1 or 0 (true/false, yes/no, on/off), not 'maybe'")
    out = run({}, ", publish_timing='yes'")
    assert out.stderr.strip().splitlines()[-1] == "ValueError: publish_timing: expected True or False, not 'yes'"
