# mypy: disable-error-code="no-untyped-call,untyped-decorator"
# ruff: noqa: RUF001, RUF002, RUF003 - the tables print × – ≤ ≥ on purpose
"""Scrape cost at scale: `/metrics` latency and body size of our service vs prometheus-client's stock collector.

A synthetic metrics directory per grid point, written with the product's own
writer (exporter/celery_signal_exporter/recording/store.py, exporter/celery_signal_exporter/recording/metrics.py):

- live processes: real forked processes that write every (task name, queue)
  series a pool process writes (started, succeeded, received, runtime and
  queue-wait histograms, in-progress, last success) through a `Store`, and
  stay alive, holding their files, while the scrapes run;
- dead recycled processes: files under pids that no longer exist, each as a
  pool process leaves them after running two (name, queue) pairs. They are
  written with `MetricFile` directly (fast enough for 10 000 of them).

Two identical copies are made: ours is served by a real
`celery-signal-exporter serve` and scraped over HTTP; the stock
`MultiProcessCollector` renders the other in this process (no HTTP, so the
comparison flatters the stock side). When the product has compaction
(`celery_signal_exporter.compact.compact`), ours is compacted through it first, as a
worker's heartbeat would, and the time that took is reported. The two sides
alternate scrape by scrape.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.common import (
    ROOT,
    SHM,
    Section,
    Size,
    Target,
    child_env,
    free_port,
    median,
    percentile,
    wait_until,
)

FAKE_PID_BASE = 50_000_000  # above any pid_max: never a live process


@dataclass(frozen=True)
class Point:
    names: int
    queues: int
    live: int
    dead: int
    routed: bool = False  # each name on one queue, instead of every name on every queue

    def label(self) -> str:
        if self.routed:
            return f"{self.names} names routed over {self.queues} queues × {self.live} live + {self.dead} dead"
        return f"{self.names} × {self.queues} × {self.live} live + {self.dead} dead"


TARGET = Point(200, 4, 8, 10_000)


def grid(kind: str) -> list[Point]:
    """One axis at a time around 200 names × 4 queues × 8 live processes, then the target point."""
    if kind == "tiny":
        return [Point(10, 1, 1, 0), Point(10, 2, 2, 50)]
    base = Point(200, 4, 8, 0)
    points = [Point(n, 4, 8, 0) for n in (10, 50, 200, 500)]
    points += [Point(200, q, 8, 0) for q in (1, 20)]
    points += [Point(200, 4, live, 0) for live in (1, 16)]
    points += [Point(200, 4, 8, d) for d in (1000, 10_000)]
    points += [Point(200, 4, 8, d, routed=True) for d in (0, 10_000)]
    assert base in points and TARGET in points
    return points


def _pairs(point: Point) -> list[tuple[str, str]]:
    if point.routed:
        return [(f"proj.tasks.task_{n}", f"queue_{n % point.queues}") for n in range(point.names)]
    return [(f"proj.tasks.task_{n}", f"queue_{q}") for n in range(point.names) for q in range(point.queues)]


def _write_pool_series(store: Any, pairs: list[tuple[str, str]], finished: bool) -> None:
    """What a pool process records for each pair it ran (finished: its in-progress is back to 0)."""
    from celery_signal_exporter import catalogue as c
    from celery_signal_exporter.recording import metrics as m
    from tests.recorded import observe

    metrics = {spec.name: m.Recorder(store, spec, m.DEFAULT_RUNTIME_BUCKETS if spec.kind == "histogram" else ())
               for spec in (c.RECEIVED, c.STARTED, c.SUCCEEDED, c.RUNTIME, c.QUEUE_WAIT, c.IN_PROGRESS,
                            c.LAST_SUCCESS)}
    for i, (name, queue) in enumerate(pairs):
        metrics[c.RECEIVED.name].labels(name, queue).inc(3)
        metrics[c.STARTED.name].labels(name, queue).inc(3)
        metrics[c.SUCCEEDED.name].labels(name, queue).inc(3)
        observe(store, metrics[c.RUNTIME.name].labels(name, queue), 0.001 * (i % 500))
        observe(store, metrics[c.QUEUE_WAIT.name].labels(name, queue), 0.01 * (i % 300))
        if not finished:
            metrics[c.IN_PROGRESS.name].labels(name, queue).inc(0)
        metrics[c.LAST_SUCCESS.name].labels(name).set(1.7e9 + i)


def _live_process(dirs: list[str], pairs: list[tuple[str, str]], conn: Connection) -> None:
    """A live pool process: writes into every dir through the product's Store, then holds on."""
    from celery_signal_exporter.recording.store import Store

    stores = [Store(d) for d in dirs]
    for store in stores:
        _write_pool_series(store, pairs, finished=False)
    conn.send("ready")
    conn.recv()  # until told to go
    for store in stores:
        store.close()


class _DeadStore:
    """Just enough of a Store for metrics.Series: files under a fake, dead pid, no writer lock."""

    def __init__(self, directory: str, pid: int) -> None:
        self.directory, self.pid = directory, pid
        self.lock = threading.Lock()
        self.generation = 0
        self.exclude = None  # no family switched off
        self.files: dict[str, Any] = {}

    def file(self, prefix: str) -> Any:
        from celery_signal_exporter.recording.store import MetricFile

        f = self.files.get(prefix)
        if f is None:
            f = MetricFile(os.path.join(self.directory, f"{prefix}_{self.pid}.db"))
            self.files[prefix] = f
        return f

    def close(self) -> None:
        for f in self.files.values():
            f.close()
            with open(f.path, "rb") as fh:
                used = int.from_bytes(fh.read(4), "little")
            os.truncate(f.path, -(-used // 4096) * 4096)  # as small as a page, not the 64 KiB preallocation


def _write_dead(directory: str, point: Point) -> None:
    pairs = _pairs(point)
    for d in range(point.dead):
        store = _DeadStore(directory, FAKE_PID_BASE + d)
        _write_pool_series(store, [pairs[(2 * d) % len(pairs)], pairs[(2 * d + 1) % len(pairs)]], finished=True)
        store.close()


@contextlib.contextmanager
def directories(point: Point) -> Iterator[tuple[str, str]]:
    """Two identical metrics dirs for `point`, with its live processes running until exit."""
    root = tempfile.mkdtemp(prefix="csx-bench-scrape-", dir=SHM)
    ours, stock = os.path.join(root, "ours"), os.path.join(root, "stock")
    os.makedirs(ours)
    os.makedirs(stock)
    ctx = multiprocessing.get_context("fork")
    procs, conns = [], []
    try:
        _write_dead(ours, point)
        for name in os.listdir(ours):
            shutil.copy2(os.path.join(ours, name), os.path.join(stock, name))
        pairs = _pairs(point)
        for _ in range(point.live):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_live_process, args=([ours, stock], pairs, child), daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
        for c in conns:
            if not c.poll(300):
                raise RuntimeError("a live writer process did not get ready")
            c.recv()
        yield ours, stock
    finally:
        for c in conns:
            with contextlib.suppress(OSError):
                c.send("stop")
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def compact_fn() -> Callable[[str], Any] | None:
    """The product's compaction entry point, if this checkout has one."""
    try:
        module = importlib.import_module("celery_signal_exporter.compact")
    except ImportError:
        return None
    fn = getattr(module, "compact", None)
    return fn if callable(fn) else None


def _data_files(directory: str) -> int:
    return sum(1 for n in os.listdir(directory) if n.endswith(".db"))


def compact_all(directory: str) -> tuple[float, int, int]:
    """Compact until no dead file is left (the product caps files per call); (seconds, calls, files after)."""
    fn = compact_fn()
    if fn is None:
        return 0.0, 0, _data_files(directory)
    start = time.perf_counter()
    calls, before = 0, _data_files(directory) + 1
    while calls < 100:
        result = fn(directory)
        calls += 1
        if getattr(result, "errors", None):
            raise RuntimeError(f"compaction failed: {result.errors[:3]}")
        remaining = getattr(result, "remaining", None)
        now = _data_files(directory)
        if remaining == 0 or (remaining is None and now >= before):
            break
        before = now
    return time.perf_counter() - start, calls, _data_files(directory)


@contextlib.contextmanager
def service(directory: str) -> Iterator[str]:
    """Our real exporter serving `directory`; yields its /metrics URL."""
    import httpx

    port = free_port()
    log = open(os.path.join(tempfile.gettempdir(), f"csx-bench-serve-{port}.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery_signal_exporter.cli", "serve", "--metrics-dir", directory, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}; see {log.name}")
        try:
            return httpx.get(url + "/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 30, "the exporter to answer /healthz", 0.1)
        yield url + "/metrics"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def measure_point(point: Point, budget: float) -> dict[str, Any]:
    import httpx
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    with directories(point) as (ours_dir, stock_dir):
        files_before = _data_files(ours_dir)
        compact_s, compact_calls, files_after = compact_all(ours_dir)
        stock_compacted_dir = None
        if compact_calls:
            stock_compacted_dir = ours_dir
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=stock_dir)

        # Prometheus asks for gzip; so do we, and the service compresses as it would for Prometheus.
        with service(ours_dir) as url, httpx.Client(timeout=120, headers={"Accept-Encoding": "gzip"}) as client:
            first_start = time.perf_counter()
            first = client.get(url)
            first_s = time.perf_counter() - first_start
            if first.status_code != 200:
                raise RuntimeError(f"/metrics answered {first.status_code}")
            body = first.content
            ours_t: list[float] = []
            stock_t: list[float] = []
            stock_body = b""
            deadline_ours = deadline_stock = 0.0
            for i in itertools.count():
                if i >= 3 and deadline_ours >= budget and deadline_stock >= budget:
                    break
                if i >= 200:
                    break
                if i < 3 or deadline_ours < budget:
                    t = time.perf_counter()
                    r = client.get(url)
                    ours_t.append(time.perf_counter() - t)
                    deadline_ours += ours_t[-1]
                    r.raise_for_status()
                if i < 3 or deadline_stock < budget:
                    t = time.perf_counter()
                    stock_body = generate_latest(registry)
                    stock_t.append(time.perf_counter() - t)
                    deadline_stock += stock_t[-1]
        stock_on_compacted: list[float] = []
        if stock_compacted_dir is not None:
            reg2 = CollectorRegistry()
            MultiProcessCollector(reg2, path=stock_compacted_dir)
            for _ in range(3):
                t = time.perf_counter()
                generate_latest(reg2)
                stock_on_compacted.append(time.perf_counter() - t)
    return {
        "files": files_before, "files_after_compaction": files_after, "compact_s": compact_s,
        "compact_calls": compact_calls, "first_s": first_s, "ours": ours_t, "stock": stock_t,
        "body": len(body), "stock_body": len(stock_body), "stock_on_compacted": stock_on_compacted,
        "samples": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
    }


def run(size: Size) -> Section:
    has_compaction = compact_fn() is not None
    section = Section(
        "Scrape cost at scale (/metrics)",
        ["names × queues × live + dead", "files", "ours p50 / p95 ms", "stock p50 / p95 ms", "stock / ours (p95)",
         "body KiB (ours / stock)", "samples"],
        notes=[
            "Every live process has written every (name, queue) series: the worst case, a long-lived pool "
            "process that has run every task on every queue. Each dead process ran two pairs. The target is "
            "judged there. The two *routed* rows are the commoner layout, each task name routed to one queue "
            "(200 series instead of 800), for scale.",
            f"Ours: `celery-signal-exporter serve` over HTTP, text format, gzip as Prometheus asks for it "
            f"(the body sizes are before compression). Stock: "
            f"`MultiProcessCollector` + `generate_latest` in-process on an identical copy of the directory. "
            f"Scrapes alternate; each side gets at least 3 scrapes and about {size.scrape_budget_s:g} s.",
        ],
    )
    if has_compaction:
        section.columns.append("compaction (once, s)")
        section.notes.append("Ours is compacted first through `celery_signal_exporter.compact.compact()` (as the "
                             "worker's heartbeat does); the stock side reads the uncompacted copy, as a stock user "
                             "would. The stock collector on our compacted directory is in the last column.")
        section.columns.append("stock on compacted dir p50 ms")
    else:
        section.notes.append("This checkout has no compaction (`celery_signal_exporter.compact`): every dead "
                             "process's files are read at every scrape.")
    for point in grid(size.scrape_points):
        r = measure_point(point, size.scrape_budget_s)
        o50, o95 = percentile(r["ours"], 50) * 1e3, percentile(r["ours"], 95) * 1e3
        s50, s95 = percentile(r["stock"], 50) * 1e3, percentile(r["stock"], 95) * 1e3
        row = [point.label(), f"{r['files']}" + (f" → {r['files_after_compaction']}" if r["compact_calls"] else ""),
               f"{o50:.1f} / {o95:.1f} (n={len(r['ours'])})", f"{s50:.0f} / {s95:.0f} (n={len(r['stock'])})",
               f"{s95 / o95:.1f}×", f"{r['body'] / 1024:.0f} / {r['stock_body'] / 1024:.0f}", str(r["samples"])]
        if has_compaction:
            row.append(f"{r['compact_s']:.2f} ({r['compact_calls']} calls)")
            row.append(f"{median(r['stock_on_compacted']) * 1e3:.0f}" if r["stock_on_compacted"] else "–")
        section.rows.append(row)
        if point == TARGET or (size.scrape_points == "tiny" and point == grid("tiny")[-1]):
            section.data.update({"target_p95_ms": o95, "target_ratio": s95 / o95, "target_point": point.label()})
    if "target_p95_ms" in section.data:
        p95, ratio = section.data["target_p95_ms"], section.data["target_ratio"]
        where = section.data["target_point"]
        section.targets.append(Target(f"/metrics p95 at {where}", "≤ 50 ms", f"{p95:.1f} ms", p95 <= 50))
        section.targets.append(Target(f"stock collector p95 / ours p95 at {where}", "≥ 50×", f"{ratio:.1f}×",
                                      ratio >= 50))
    return section
