# ruff: noqa: RUF003 - the tables print × – ≤ ≥ on purpose
"""Exporter cost per task: our service against the event-based exporter, on one workload.

The event-based exporter is PyPI's `prometheus-exporter-celery`
(danihodovic/celery-exporter), installed into its own virtualenv under
benchmarks/.venvs/ with the pins below. Both exporters run side by side on
the same Redis db while one instrumented producer (sending task-sent events)
publishes N tasks to one instrumented prefork worker started with -E; both
are scraped every `SCRAPE_EVERY` seconds. CPU (utime + stime) and peak RSS
of each exporter process are read from /proc over the same window, which
ends once both have counted every task (or a time limit passed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from benchmarks.common import (
    BENCH_DIR,
    ROOT,
    SHM,
    Section,
    Size,
    Target,
    child_env,
    cpu_seconds,
    free_port,
    median,
    memory_kib,
    redis_db,
    redis_url,
    run_json,
    spread,
    wait_until,
)

PACKAGE = "prometheus-exporter-celery"
VERSION = "0.11.2"
#: Everything it pulls in, pinned to what ran here. Its own pins hold redis-py
#: below 6 and prometheus-client at 0.21; kombu 5.6+ refuses redis-py below
#: 6.1 at connect time, so Celery and kombu are held at 5.5 (same message and
#: event protocol as the Celery 5.7 the workload runs).
PINS = (
    f"{PACKAGE}=={VERSION}", "celery==5.5.3", "kombu==5.5.4", "redis==5.2.1", "amqp==5.3.1", "billiard==4.2.1",
    "vine==5.1.0", "prometheus-client==0.21.1", "Flask==3.1.3", "Werkzeug==3.1.9", "waitress==3.0.2",
    "click==8.2.1", "loguru==0.7.3", "arrow==1.4.0", "pretty-errors==1.2.25", "timy==0.4.2",
    # Not declared by the package, but kombu's Redis transport imports it: without it, it cannot start.
    "packaging==26.3",
)
VENV = os.path.join(BENCH_DIR, ".venvs", "celery-exporter")
SCRAPE_EVERY = 5.0


def venv_python() -> str:
    return os.path.join(VENV, "bin", "python")


def install_command() -> list[list[str]]:
    """The commands that build the event-based exporter's own virtualenv."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return [[base, "-m", "venv", "--clear", VENV], [venv_python(), "-m", "pip", "install", "-q", *PINS]]


def ensure_installed() -> str:
    """Install (once; a stamp file records the pins) and return the installed version line."""
    stamp = os.path.join(VENV, ".csx-pins")
    want = "\n".join(PINS)
    if not (os.path.exists(stamp) and open(stamp).read() == want and os.path.exists(venv_python())):
        for cmd in install_command():
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"installing the event-based exporter failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
        with open(stamp, "w") as f:
            f.write(want)
    out = subprocess.run([venv_python(), "-c", "import importlib.metadata as m, sys; "
                          f"print(m.version('{PACKAGE}'), sys.version.split()[0])"],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str], log_path: str) -> Iterator[subprocess.Popen[bytes]]:
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _totals(text: str, metric: str) -> float:
    """Sum of one counter over all its label sets, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def one_run(n: int, tmp: str) -> dict[str, Any]:
    import httpx

    with redis_db() as db:
        url = redis_url(db)
        metrics_dir = os.path.join(tmp, f"metrics-{uuid.uuid4().hex[:6]}")
        os.makedirs(metrics_dir)
        done = os.path.join(tmp, f"done-{uuid.uuid4().hex[:6]}")
        env = child_env(CSX_BENCH_BROKER=url, CSX_BENCH_VARIANT="both", CSX_BENCH_QUEUE="bench-cost",
                        CSX_BENCH_METRICS_DIR=metrics_dir, CSX_BENCH_DONE_FILE=done)
        ours_port, theirs_port = free_port(), free_port()
        ours_args = [sys.executable, "-m", "celery_signal_exporter.cli",
                     "serve", "--metrics-dir", metrics_dir, "--broker-url", url,
                     "--queue", "bench-cost", "--host", "127.0.0.1", "--port", str(ours_port), "--log-level", "warning"]
        main = "import sys; sys.argv[0] = 'celery-exporter'; from src.cli import cli; cli()"
        theirs_args = [venv_python(), "-c", main,
                       "--broker-url", url, "--host", "127.0.0.1", "--port", str(theirs_port), "--log-level", "WARNING"]
        theirs_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        worker_args = [sys.executable, "-m", "celery", "-A", "benchmarks.apps", "worker", "-P", "prefork", "-c", "2",
                       "-Q", "bench-cost", "-n", f"cost-{uuid.uuid4().hex[:6]}@%h", "-E", "--without-gossip",
                       "--without-mingle", "-l", "WARNING"]
        urls = {"ours": f"http://127.0.0.1:{ours_port}/metrics", "theirs": f"http://127.0.0.1:{theirs_port}/metrics"}
        with _process(ours_args, env, os.path.join(tmp, "ours.log")) as ours, \
                _process(theirs_args, theirs_env, os.path.join(tmp, "theirs.log")) as theirs, \
                httpx.Client(timeout=30) as client:
            procs = {"ours": ours, "theirs": theirs}

            def answering() -> bool:
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exporter exited {p.returncode}; see {tmp}/{name}.log")
                try:
                    return all(client.get(u).status_code == 200 for u in urls.values())
                except httpx.HTTPError:
                    return False

            wait_until(answering, 60, "both exporters to serve /metrics", 0.2)
            with _process(worker_args, env, os.path.join(tmp, "worker.log")) as worker:
                time.sleep(3)  # worker up and its events flowing before the window opens
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited; see {tmp}/worker.log")
                cpu0 = {k: cpu_seconds(p.pid) for k, p in procs.items()}
                rss0 = {k: memory_kib(p.pid)["VmRSS"] for k, p in procs.items()}
                stop = threading.Event()
                last: dict[str, str] = {"ours": "", "theirs": ""}

                def scraper() -> None:
                    with httpx.Client(timeout=30) as c:
                        while not stop.is_set():
                            for k, u in urls.items():
                                with contextlib.suppress(httpx.HTTPError):
                                    last[k] = c.get(u).text
                            stop.wait(SCRAPE_EVERY)

                thread = threading.Thread(target=scraper, daemon=True)
                thread.start()
                start = time.monotonic()
                sent = run_json(["-m", "benchmarks.apps", "publish", str(n)], env)
                total = int(sent["n"]) + int(sent["warm"])
                wait_until(lambda: os.path.exists(done) and os.path.getsize(done) >= total, 60 + n / 20,
                           "the worker to run every task", 0.05)
                drained = time.monotonic() - start

                def counted() -> bool:
                    return all(_totals(last[k], "celery_task_succeeded_total") >= total for k in last)

                with contextlib.suppress(RuntimeError):
                    wait_until(counted, 30 + n / 100, "both exporters to count every task", 0.2)
                stop.set()
                thread.join()
                window = time.monotonic() - start
                cpu1 = {k: cpu_seconds(p.pid) for k, p in procs.items()}
                mem1 = {k: memory_kib(p.pid) for k, p in procs.items()}
                final = {k: client.get(u).text for k, u in urls.items()}
    out: dict[str, Any] = {"total": total, "drained_s": drained, "window_s": window}
    for k in ("ours", "theirs"):
        out[k] = {
            "cpu_per_1000": (cpu1[k] - cpu0[k]) / total * 1000,
            "peak_rss_mib": mem1[k]["VmHWM"] / 1024,
            "rss_growth_kib_per_1000": (mem1[k]["VmRSS"] - rss0[k]) / total * 1000,
            "sent": _totals(final[k], "celery_task_sent_total"),
            "succeeded": _totals(final[k], "celery_task_succeeded_total"),
        }
    return out


def run(size: Size) -> Section:
    version = ensure_installed()
    with tempfile.TemporaryDirectory(prefix="csx-bench-cost-", dir=SHM) as tmp:
        runs = [one_run(size.cost_n, tmp) for _ in range(size.cost_runs)]
    section = Section(
        "Exporter cost per task (our service vs the event-based exporter, same workload)",
        ["exporter", "CPU s per 1000 tasks", "peak RSS MiB", "RSS growth KiB per 1000 tasks",
         "counted sent / succeeded of sent (every run)"],
        notes=[
            f"{size.cost_n} tasks (+ warm-up) per run, {size.cost_runs} run(s); Redis; one instrumented producer "
            "with `task_send_sent_event=True`, one instrumented prefork worker (-c 2) with -E; both exporters "
            f"scraped every {SCRAPE_EVERY:g} s; ours also probes the broker (default 15 s cycle) and compacts "
            "its directory (default 30 s). CPU is each process's CPU clock (user + system), over the "
            "same window for both; the window closes once both have counted every task.",
            f"Event-based exporter: `{PACKAGE}` {version.split()[0]} on Python {version.split()[-1]}, in its own "
            f"virtualenv, installed with `pip install {' '.join(PINS)}`.",
        ],
    )
    for k, label in (("ours", "celery-signal-exporter serve"), ("theirs", f"{PACKAGE} {VERSION} (events)")):
        counts = ", ".join(f"{int(r[k]['sent'])}/{int(r[k]['succeeded'])} of {r['total']}" for r in runs)
        section.rows.append([
            label, spread([r[k]["cpu_per_1000"] for r in runs], "{:.4f}"),
            spread([r[k]["peak_rss_mib"] for r in runs], "{:.1f}"),
            spread([r[k]["rss_growth_kib_per_1000"] for r in runs], "{:.0f}"), counts,
        ])
    rel = [r["ours"]["cpu_per_1000"] / r["theirs"]["cpu_per_1000"] for r in runs]
    all_counted = {k: all(r[k]["sent"] == r["total"] and r[k]["succeeded"] == r["total"] for r in runs)
                   for k in ("ours", "theirs")}
    section.notes.append(f"Ours / event-based CPU, per run: {', '.join(f'{x:.2%}' for x in rel)}. "
                         f"Counted every task: ours {'yes' if all_counted['ours'] else 'NO'}, "
                         f"event-based {'yes' if all_counted['theirs'] else 'NO'}.")
    ratio = median(rel)
    section.data = {"cpu_ratio": ratio, "all_counted": all_counted, "version": version, "runs": runs}
    section.targets.append(Target("our service CPU per 1000 tasks / event-based exporter's", "≤ 2%",
                                  f"{ratio:.2%}", ratio <= 0.02))
    return section
