"""Every execution pool counts exactly and reports its running tasks: prefork, solo, threads, gevent, eventlet.

Each case runs a real `celery worker -A tests.soak_app -P <pool>` on Redis
and the real exporter (`--worker-timeout 3`), publishes a fixed mix (10
succeeding runs of soak.t00, 4 failing of soak.t01, 3 of soak.t02 that retry
once, lingering 0.5 s after publishing the retry, so that on threads and
greenlets the retry runs under the same task id while the first run is
still finishing), checks every counter exactly, then runs 8 s tasks (longer than the
worker timeout: the solo pool's main thread is busy in the task all that
time) and checks on every scrape while they run that in-progress and
active read the running count and the worker reads up.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import ROOT, Samples, env_for, exporter, value, wait_until, worker

#: (pool, concurrency, long tasks run at once)
POOLS = [("prefork", 2, 2), ("solo", 1, 1), ("threads", 4, 2), ("gevent", 10, 2), ("eventlet", 10, 2)]
WORKER_TIMEOUT = 3
LONG_TASK = 8.0
#: How long, once the long tasks run, every scrape must show them (well inside LONG_TASK, beyond the timeout).
WATCH = 6.0


def produce(env: dict[str, str], scenario: str, *args: int) -> None:
    out = subprocess.run([sys.executable, "-m", "tests.soak_app", scenario, *map(str, args)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"producer {scenario} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def own_count(log_dir: str) -> Counter[str]:
    """The tasks' own record: Counter of "start soak.t00", "ok soak.t00", ..."""
    lines: Counter[str] = Counter()
    for path in glob.glob(os.path.join(log_dir, "runs-*.log")):
        with open(path) as f:
            lines.update(line.rstrip("\n") for line in f if line.strip())
    return lines


def summary(s: Samples) -> dict[str, float]:
    """The task series of a scrape, for failure messages."""
    out: dict[str, float] = {}
    for (name, labels), v in sorted(s.items(), key=lambda kv: kv[0][0]):
        ls = dict(labels)
        if name.startswith("celery_task_") and not name.endswith(("_bucket", "_sum", "_created")):
            out[f"{name}{{{ls.get('name', '')},{ls.get('exception', '')}}}"] = v
    return out


@pytest.mark.parametrize("pool,concurrency,long_tasks", POOLS, ids=[p[0] for p in POOLS])
def test_pool_counts_and_running_gauges(redis_url: str, tmp_path: Path, pool: str, concurrency: int,
                                        long_tasks: int) -> None:
    metrics_dir = str(tmp_path / "metrics")
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    env = env_for(redis_url, metrics_dir, CSX_SOAK_LOG_DIR=str(log_dir))
    with worker(env, str(tmp_path), pool=pool, concurrency=concurrency, queues="soak,chaos",
                app="tests.soak_app") as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--worker-timeout", str(WORKER_TIMEOUT)) as ex:
        produce(env, "mix")

        def settled() -> Samples | None:
            r = ex.scrape()
            done = value(r, "celery_task_succeeded_total") + value(r, "celery_task_failed_total")
            return r if done >= 17 and value(r, "celery_task_in_progress") == 0 else None

        try:
            s = wait_until(settled, 60, f"the mix on the {pool} pool")
        except AssertionError as exc:
            r = ex.scrape()
            raise AssertionError(f"{exc}\nlast scrape: {summary(r)}\nthe tasks' own count: "
                                 f"{dict(own_count(str(log_dir)))}") from None
        time.sleep(1.0)  # a late, unexpected count would show in the next scrape
        s = ex.scrape()
        expected = {
            "celery_task_sent_total": {"soak.t00": 10, "soak.t01": 4, "soak.t02": 6},
            "celery_task_received_total": {"soak.t00": 10, "soak.t01": 4, "soak.t02": 6},
            "celery_task_started_total": {"soak.t00": 10, "soak.t01": 4, "soak.t02": 6},
            "celery_task_runtime_seconds_count": {"soak.t00": 10, "soak.t01": 4, "soak.t02": 6},
            "celery_task_queue_wait_seconds_count": {"soak.t00": 10, "soak.t01": 4, "soak.t02": 6},
            "celery_task_succeeded_total": {"soak.t00": 10, "soak.t01": 0, "soak.t02": 3},
            "celery_task_failed_total": {"soak.t00": 0, "soak.t01": 4, "soak.t02": 0},
            "celery_task_retried_total": {"soak.t00": 0, "soak.t01": 0, "soak.t02": 3},
        }
        got = {metric: {name: value(s, metric, name=name) for name in names} for metric, names in expected.items()}
        assert got == expected, f"{pool}: counts differ:\n{json.dumps(got, indent=1)}"
        assert value(s, "celery_task_failed_total", name="soak.t01", exception="PlannedFailure") == 4
        assert value(s, "celery_task_in_progress") == 0
        assert value(s, "celery_worker_tasks_active", hostname=w.hostname) == 0
        assert value(s, "celery_worker_pool_processes", hostname=w.hostname) == concurrency
        assert value(s, "celery_worker_up", hostname=w.hostname) == 1
        assert value(s, "celery_exporter_handler_errors_total") == 0
        own = own_count(str(log_dir))
        assert own["start soak.t02"] == 6 and own["retry soak.t02"] == 3 and own["ok soak.t02"] == 3, own
        assert own["fail soak.t01"] == 4 and own["ok soak.t00"] == 10, own

        # Long tasks: while they run, every scrape reads them, beyond the exporter's worker timeout.
        produce(env, "sleepers", long_tasks, int(LONG_TASK * 10))

        def running() -> Samples | None:
            r = ex.scrape()
            return r if (value(r, "celery_task_in_progress", name="soak.sleeper") == long_tasks
                         and value(r, "celery_worker_tasks_active", hostname=w.hostname) == long_tasks) else None

        wait_until(running, 30, f"{long_tasks} long tasks running on the {pool} pool", interval=0.1)
        start = time.monotonic()
        bad: list[str] = []
        scrapes = 0
        while (t := time.monotonic() - start) < WATCH:
            r = ex.scrape()
            scrapes += 1
            seen = (value(r, "celery_task_in_progress", name="soak.sleeper"),
                    value(r, "celery_worker_tasks_active", hostname=w.hostname),
                    value(r, "celery_worker_up", hostname=w.hostname))
            if seen != (long_tasks, long_tasks, 1):
                bad.append(f"t={t:.1f}s in_progress={seen[0]:g} tasks_active={seen[1]:g} worker_up={seen[2]:g}")
            time.sleep(0.5)
        assert not bad, (f"{pool}: while {long_tasks} tasks of {LONG_TASK:g} s ran (worker timeout "
                         f"{WORKER_TIMEOUT} s), {len(bad)} of {scrapes} scrapes read otherwise "
                         f"(want in_progress={long_tasks} tasks_active={long_tasks} worker_up=1):\n"
                         + "\n".join(bad))

        def finished() -> Samples | None:
            r = ex.scrape()
            return r if (value(r, "celery_task_succeeded_total", name="soak.sleeper") == long_tasks
                         and value(r, "celery_task_in_progress") == 0
                         and value(r, "celery_worker_tasks_active", hostname=w.hostname) == 0) else None

        s = wait_until(finished, 30, "the long tasks to finish and the gauges to read 0")
        assert s is not None
        assert value(s, "celery_worker_up", hostname=w.hostname) == 1
        assert value(s, "celery_task_started_total", name="soak.sleeper") == long_tasks
        assert w.proc.poll() is None, f"the worker exited:\n{w.log()[-3000:]}"
