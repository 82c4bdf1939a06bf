"""Process models: recycled prefork children, solo and threads pools, killed children."""

from __future__ import annotations

import itertools
import os
import signal

import pytest

from celery_signal_exporter.directory import pid_alive
from celery_signal_exporter.recording.store import LEDGER_N
from tests.harness import Samples, env_for, exporter, has, produce, value, wait_until, worker


@pytest.mark.long
def test_recycled_children_lose_no_count(redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    """5 000 tasks with --max-tasks-per-child 1: 5 000 children, every count exact, files bounded.

    Scrapes run all along while the worker main compacts: a total that ever
    went down would be a loss, one above n a double count. Concurrency 6,
    not 2: a recycled child sleeps 1 s in billiard before it exits, so the
    rate is bound by that latency, not by CPU (measured: 7.7 children/s at
    -c 2, 18/s at -c 6, same work).
    """
    n = int(os.environ.get("CSX_RECYCLE_N", "2000"))  # 5000 before the soak recycled ~1 800 more in CI
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir, CSX_TEST_GC_FREEZE="1")
    with worker(env, str(tmp_path), "--max-tasks-per-child", "1", "--loglevel", "WARNING", concurrency=6) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "many", n)
        seen: list[tuple[float, float, float]] = []
        most_files = 0

        def done() -> Samples | None:
            nonlocal most_files
            most_files = max(most_files, len(os.listdir(metrics_dir)))
            r = ex.scrape()
            seen.append((value(r, "celery_task_succeeded_total"), value(r, "celery_task_runtime_seconds_count"),
                         value(r, "celery_exporter_compacted_processes_total")))
            # n children and the producer each left one counter file, all folded in by the worker main.
            return r if seen[-1][2] == n + 1 else None

        s = wait_until(done, 1800, f"{n} recycled children compacted", interval=0.5)
        assert value(s, "celery_task_sent_total", name="t.ok") == n
        assert value(s, "celery_task_received_total", name="t.ok") == n
        assert value(s, "celery_task_started_total", name="t.ok") == n
        assert value(s, "celery_task_succeeded_total", name="t.ok") == n
        assert value(s, "celery_task_runtime_seconds_count", name="t.ok") == n
        assert value(s, "celery_task_queue_wait_seconds_count", name="t.ok") == n
        assert value(s, "celery_task_in_progress") == 0
        assert value(s, "celery_exporter_handler_errors_total") == 0
        assert value(s, "celery_exporter_metrics_files", state="unreadable") == 0
        assert all(a <= b for a, b in itertools.pairwise(seen)), "a total went down during compaction"
        assert max(max(t[:2]) for t in seen) <= n, "a count was doubled"
        left = sorted(os.listdir(metrics_dir))
        main = w.proc.pid
        assert [f for f in left if f.endswith(".db") and "archive" not in f and f"_{main}." not in f
                and f != f"counter_{main}-{LEDGER_N}.db"] == [], \
            "only archives and the worker main's own files (its ledger too) remain"
        assert not [f for f in left if f.startswith(".compact-")]
        assert "exited with 'signal" not in w.log()
    print(f"\nrecycling: {n} children, {len(seen)} scrapes, at most {most_files} entries in the directory, "
          f"{len(left)} at the end: {left}")
    assert most_files <= 400, f"files piled up: {most_files}"


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
    from celery_signal_exporter.directory import read_entries

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
        wait_until(lambda: not pid_alive(pid), 10, "the child to be dead")
        # The very next scrape drops the dead child's in-progress: its writer lock is free.
        s = ex.scrape()
        assert value(s, "celery_task_in_progress", name="t.sleep") == 0
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


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_sigkilled_worker_main_takes_its_live_gauges_and_keeps_its_counts(
        redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    """SIGKILL the worker main with two tasks running: Celery's pdeathsig kills the pool with it."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--worker-timeout", "3") as ex:
        with worker(env, str(tmp_path), concurrency=2) as w:
            produce(env, "many", 5)
            wait_until(lambda: value(ex.scrape(), "celery_task_succeeded_total") == 5, 60, "5 quick tasks")
            produce(env, "sleepers", 2, 60)
            s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_in_progress") == 2
                           and value(r, "celery_worker_tasks_active", hostname=w.hostname) == 2 and r,
                           30, "two tasks running")
            assert value(s, "celery_worker_pool_processes", hostname=w.hostname) == 2
            children = _children(w.proc.pid)
            assert len(children) == 2
            w.proc.kill()
            w.proc.wait()
            wait_until(lambda: not any(pid_alive(c) for c in children), 10, "the pool to die with its main")
            s = ex.scrape()  # one scrape after the processes are gone
            assert value(s, "celery_task_in_progress") == 0
            assert not has(s, "celery_worker_tasks_active", hostname=w.hostname)
            assert not has(s, "celery_worker_pool_processes", hostname=w.hostname)
            assert value(s, "celery_task_started_total", name="t.sleep") == 2, "counters survive"
            assert value(s, "celery_task_succeeded_total", name="t.ok") == 5
            # Celery's main process is what reports WorkerLostError; with it dead, nobody does.
            assert value(s, "celery_task_failed_total") == 0
            wait_until(lambda: value(ex.scrape(), "celery_worker_up", hostname=w.hostname) == 0, 30,
                       "celery_worker_up to read 0 after the heartbeat timeout")
            dead_files = sorted(f for f in os.listdir(metrics_dir) if f.endswith(".db"))
            assert any(f.startswith("gauge_livesum_") for f in dead_files), "the exporter deletes nothing"
        # A new worker on the same directory compacts the dead ones' files; totals stay exact.
        with worker(env, str(tmp_path), concurrency=2) as w2:
            s = wait_until(lambda: (r := ex.scrape()) and not [
                f for f in os.listdir(metrics_dir) if f.endswith(".db") and "archive" not in f
                and f"_{w2.proc.pid}." not in f and f != f"counter_{w2.proc.pid}-{LEDGER_N}.db"] and r, 30,
                "the new worker main to compact the dead files")
            assert value(s, "celery_task_started_total", name="t.sleep") == 2
            assert value(s, "celery_task_succeeded_total", name="t.ok") == 5
            assert value(s, "celery_task_sent_total", name="t.ok") == 5
            assert value(s, "celery_task_in_progress") == 0
            assert value(s, "celery_worker_up", hostname=w.hostname) == 0
            assert value(s, "celery_worker_up", hostname=w2.hostname) == 1
            assert value(s, "celery_exporter_metrics_files", state="unreadable") == 0
