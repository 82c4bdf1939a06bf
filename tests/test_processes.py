"""Process models: recycled prefork children, solo and threads pools, killed children."""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness import Samples, env_for, exporter, produce, value, wait_until, worker


def test_recycled_children_lose_no_count(redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    """--max-tasks-per-child 1: every task runs in a fresh child, every count survives compaction."""
    n = 300
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), "--max-tasks-per-child", "1", concurrency=2) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "many", n)
        # n children and the producer each left one counter file, all folded in by the worker main.
        s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_exporter_compacted_processes_total") == n + 1
                       and r, 240, f"{n} recycled children compacted")
        assert value(s, "celery_task_sent_total", name="t.ok") == n
        assert value(s, "celery_task_received_total", name="t.ok") == n
        assert value(s, "celery_task_started_total", name="t.ok") == n
        assert value(s, "celery_task_succeeded_total", name="t.ok") == n
        assert value(s, "celery_task_runtime_seconds_count", name="t.ok") == n
        assert value(s, "celery_task_in_progress") == 0
        assert value(s, "celery_exporter_handler_errors_total") == 0
        assert "Process 'ForkPoolWorker" not in w.log() or "exited with 'signal" not in w.log()


@pytest.mark.parametrize("pool,concurrency", [("solo", 1), ("threads", 4)])
def test_solo_and_threads_pools_count_exactly(redis_url: str, tmp_path: pytest.TempPathFactory, pool: str,
                                              concurrency: int) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), pool=pool, concurrency=concurrency) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "counts")

        def settled() -> Samples | None:
            r = ex.scrape()
            return r if value(r, "celery_task_succeeded_total") + value(r, "celery_task_failed_total") >= 45 else None

        s = wait_until(settled, 90, f"the workload on the {pool} pool")
        assert value(s, "celery_task_succeeded_total", name="t.ok") == 30
        assert value(s, "celery_task_succeeded_total", name="t.retry_twice", queue_name="beta") == 5
        assert value(s, "celery_task_failed_total", exception="ValueError") == 6
        assert value(s, "celery_task_failed_total", exception="KeyError") == 4
        assert value(s, "celery_task_retried_total") == 10
        assert value(s, "celery_task_runtime_seconds_count") == 55
        assert value(s, "celery_task_in_progress") == 0
        assert value(s, "celery_worker_pool_processes", hostname=w.hostname) == concurrency


def _child_running(metrics_dir: str) -> int | None:
    """The pid whose live file shows a task in progress."""
    from exporter.store import read_entries

    for name in os.listdir(metrics_dir):
        if not name.startswith("gauge_livesum_"):
            continue
        with open(os.path.join(metrics_dir, name), "rb") as f:
            for key, val, _ in read_entries(f.read()):
                if "celery_task_in_progress" in key and val > 0:
                    return int(name.rsplit("_", 1)[1][:-3])
    return None


def test_sigkilled_child_loses_its_in_progress_but_not_its_counts(redis_url: str,
                                                                  tmp_path: pytest.TempPathFactory) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), concurrency=2) as w, exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "many", 5)
        wait_until(lambda: value(ex.scrape(), "celery_task_succeeded_total") == 5, 60, "5 quick tasks")
        produce(env, "hold_back")  # a 2 s task, then waiters
        pid = wait_until(lambda: _child_running(metrics_dir), 30, "a child to start the long task")
        assert value(ex.scrape(), "celery_task_in_progress", name="t.sleep") == 1
        os.kill(pid, signal.SIGKILL)
        # The worker main notices the dead child on its next tick and removes its live file.
        s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_in_progress", name="t.sleep") == 0
                       and r, 10, "the killed child's in-progress gauge to disappear")
        assert value(s, "celery_task_succeeded_total", name="t.ok") == 5, "counters of live and dead children stay"
        s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_failed_total", name="t.sleep") == 1
                       and r, 30, "Celery to report the lost task")
        assert value(s, "celery_task_failed_total", name="t.sleep", exception="WorkerLostError") == 1
        assert value(s, "celery_task_started_total", name="t.sleep") == 1
        assert w.proc.poll() is None, "the worker survives"
        # The worker main removes the dead child's live file and folds its counters into the archive.
        wait_until(lambda: not os.path.exists(os.path.join(metrics_dir, f"gauge_livesum_{pid}.db"))
                   and not os.path.exists(os.path.join(metrics_dir, f"counter_{pid}.db")), 10,
                   "the worker main to reap and compact the killed child's files")
        s = ex.scrape()
        assert value(s, "celery_task_succeeded_total", name="t.ok") == 5
        assert value(s, "celery_task_started_total", name="t.sleep") == 1
        assert value(s, "celery_task_in_progress") == 0
        assert value(s, "celery_exporter_metrics_files", state="unreadable") == 0
