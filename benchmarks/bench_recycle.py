# ruff: noqa: RUF003 - the tables print × – ≤ ≥ on purpose
"""The exporter's memory while a worker recycles its pool children: one per task, 30 task names.

Why: every recycled child leaves a file that the worker main folds into the
archives, and the exporter meets each new file once; any cache keyed by file
or layout would grow with the children, without end, in a long-lived worker.

One instrumented prefork worker (`-c 6 --max-tasks-per-child 1`) runs N tasks
over 30 names from a pre-filled Redis queue; `celery-signal-exporter serve`
watches the directory and is scraped every 0.5 s; its VmRSS is sampled
against the count of finished tasks (= children gone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import httpx

from benchmarks.bench_publish import purge
from benchmarks.common import (
    ROOT,
    SHM,
    Section,
    Size,
    Target,
    child_env,
    free_port,
    memory_kib,
    redis_db,
    redis_url,
    run_json,
    wait_until,
)

LIMIT_MB = 5.0
AFTER = 200  # children before the baseline: start-up, first layouts and the first compactions are done


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(size: Size) -> Section:
    n = 2000 if size.name == "full" else 30
    after = AFTER if size.name == "full" else 10
    queue = "bench-recycle"
    with redis_db() as db, tempfile.TemporaryDirectory(prefix="csx-bench-recycle-", dir=SHM) as tmp:
        url = redis_url(db)
        metrics = os.path.join(tmp, "metrics")
        os.makedirs(metrics)
        done = os.path.join(tmp, "done")
        env = child_env(CSX_BENCH_BROKER=url, CSX_BENCH_VARIANT="ours", CSX_BENCH_QUEUE=queue,
                        CSX_BENCH_METRICS_DIR=metrics, CSX_BENCH_DONE_FILE=done)
        run_json(["-m", "benchmarks.apps", "fill-names", str(n)], env)
        port = free_port()
        logs = [open(os.path.join(tmp, f"{w}.log"), "wb") for w in ("exporter", "worker")]
        exporter = subprocess.Popen(
            [sys.executable, "-m", "celery_signal_exporter.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-dir", metrics], cwd=ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT,
            start_new_session=True)
        worker = None
        samples: list[tuple[int, float]] = []  # (children gone, exporter RSS MiB)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
            wait_until(lambda: _ok(client), 30, "the exporter to answer")
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "benchmarks.apps", "worker", "-P", "prefork", "-c", "6",
                 "--max-tasks-per-child", "1", "-Q", queue, "-n", f"recycle-{uuid.uuid4().hex[:6]}@%h",
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
                cwd=ROOT, env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 120 + n * 0.5
            while True:
                finished = os.path.getsize(done) if os.path.exists(done) else 0
                client.get("/metrics").raise_for_status()
                samples.append((finished, memory_kib(exporter.pid)["VmRSS"] / 1024))
                if finished >= n:
                    break
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker finished {finished}/{n} tasks; see {logs[1].name}")
                time.sleep(0.5)
            for _ in range(6):  # the last children's files folded in and merged
                time.sleep(0.5)
                client.get("/metrics").raise_for_status()
                samples.append((n, memory_kib(exporter.pid)["VmRSS"] / 1024))
            client.close()
        finally:
            if worker is not None:
                _stop(worker)
            _stop(exporter)
            for log in logs:
                log.close()
            purge(url, queue)
    base = next(rss for k, rss in samples if k >= after)
    peak_after = max(rss for k, rss in samples if k >= after)
    end = samples[-1][1]
    growth = peak_after - base
    marks = sorted({m for m in (after, n // 4, n // 2, 3 * n // 4, n) if m >= after})
    rows = [[str(m), f"{next(rss for k, rss in samples if k >= m):.1f}"] for m in marks]
    section = Section(
        "Exporter memory while children recycle (prefork -c 6, --max-tasks-per-child 1, 30 names)",
        ["children gone (tasks finished)", "exporter VmRSS MiB"], rows=rows,
        notes=[f"{n} tasks over 30 names, one child each; the exporter scraped every 0.5 s ({len(samples)} "
               f"scrapes); RSS at the first scrape at or after each mark. After child {after}: "
               f"{base:.1f} MiB, peak {peak_after:.1f} MiB, at the end {end:.1f} MiB."],
    )
    section.targets.append(Target(f"exporter RSS growth after child {after} of {n} recycled, 30 names",
                                  f"≤ {LIMIT_MB:.0f} MB", f"{growth:+.1f} MiB", growth <= LIMIT_MB))
    return section


def _ok(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False
