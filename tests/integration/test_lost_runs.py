"""Runs lost with their process: every started run ends in exactly one outcome.

A run that started and whose process died before it finished is counted once,
as celery_task_failed_total{exception="WorkerLostError"}, by whoever reaps the
dead process's live gauges: whether Celery fails the task, requeues it
(acks_late + reject_on_worker_lost), or is itself dead (a killed solo worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from celery_signal_exporter import catalogue as c
from celery_signal_exporter import compact as compaction
from celery_signal_exporter.directory import is_lost_runs, pid_alive
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.compaction_crash import crashing_after
from tests.harness import (
    ROOT,
    Samples,
    env_for,
    exporter,
    produce,
    running_children,
    value,
    wait_until,
    worker,
    write_as_dead_process,
)
from tests.recorded import merged_samples

LOST = 'celery_task_failed_total{exception="WorkerLostError",name="a",queue_name="q"}'


def publish(env: dict[str, str], task: str, *args: float) -> None:
    """Publish one task by name from a real, instrumented producer process."""
    code = f"from tests.workload_app import app; app.send_task({task!r}, args={list(args)!r}, queue='alpha')"
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=60)


def lost_run_files(metrics_dir: str) -> list[str]:
    return [f for f in os.listdir(metrics_dir) if is_lost_runs(f)]


def outcomes_balance(s: Samples, task: str) -> bool:
    started = value(s, "celery_task_started_total", name=task)
    ended = value(s, "celery_task_succeeded_total", name=task) + value(s, "celery_task_failed_total", name=task)
    return started == ended + value(s, "celery_task_in_progress", name=task)


def test_requeued_runs_killed_with_their_child_are_each_counted_once(redis_url: str, tmp_path: Path) -> None:
    """acks_late + reject_on_worker_lost: Celery sends no task_failure for a killed child's run, it requeues it.

    Kill the child running it three times; the fourth run completes.
    """
    kills = 3
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir, CSX_TEST_LOST_WAIT="1")
    with worker(env, str(tmp_path), concurrency=2) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--compact-interval", "0") as ex:
        publish(env, "t.sleep_late", 6)
        killed: set[int] = set()
        for i in range(kills):
            pid = wait_until(lambda: min(running_children(metrics_dir, "t.sleep_late") - killed, default=0), 60,
                             f"run {i + 1} of the requeued task to start")
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            wait_until(lambda: not pid_alive(pid), 10, "the child to be dead")  # noqa: B023 - used at once

        def settled() -> Samples | None:
            r = ex.scrape()
            return r if value(r, "celery_task_succeeded_total", name="t.sleep_late") == 1 \
                and value(r, "celery_task_failed_total", name="t.sleep_late") == kills else None

        s = wait_until(settled, 90, "the fourth run to complete and every lost run to be counted")
        assert s is not None
        assert value(s, "celery_task_failed_total", name="t.sleep_late", exception="WorkerLostError") == kills
        assert value(s, "celery_task_started_total", name="t.sleep_late") == kills + 1
        assert value(s, "celery_task_in_progress", name="t.sleep_late") == 0
        assert outcomes_balance(s, "t.sleep_late")
        # Compaction folds the reaper's files into the archive without counting anything twice.
        wait_until(lambda: not lost_run_files(metrics_dir) and not running_children(metrics_dir, "t.sleep_late"),
                   30, "the lost runs' files to be compacted")
        s = ex.scrape()
        assert value(s, "celery_task_failed_total", name="t.sleep_late") == kills
        assert value(s, "celery_task_started_total", name="t.sleep_late") == kills + 1
        assert value(s, "celery_exporter_handler_errors_total") == 0
        assert w.proc.poll() is None
    assert "succeeded" in w.log()


def test_a_killed_solo_worker_s_run_is_counted_once_by_the_next_worker(redis_url: str, tmp_path: Path) -> None:
    """Solo runs tasks in the worker main: killed, nobody in Celery reports the run. The next worker does."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--compact-interval", "0") as ex:
        with worker(env, str(tmp_path), pool="solo", concurrency=1) as w:
            produce(env, "many", 3)
            wait_until(lambda: value(ex.scrape(), "celery_task_succeeded_total", name="t.ok") == 3, 60, "3 quick tasks")
            produce(env, "sleepers", 1, 120)
            wait_until(lambda: value(ex.scrape(), "celery_task_in_progress", name="t.sleep") == 1, 30,
                       "the long task to start")
            w.proc.kill()
            w.proc.wait()
        s = ex.scrape()
        assert value(s, "celery_task_in_progress") == 0, "the dead worker's live gauges are skipped at once"
        assert value(s, "celery_task_failed_total") == 0, "nobody has reaped it yet"
        with worker(env, str(tmp_path), pool="solo", concurrency=1):
            def counted() -> Samples | None:
                r = ex.scrape()
                return r if value(r, "celery_task_failed_total", name="t.sleep") == 1 and not lost_run_files(
                    metrics_dir) else None

            assert wait_until(counted, 30, "the new worker to reap the lost run and compact it") is not None
            for _ in range(3):  # more ticks count nothing again
                time.sleep(1)
                r = ex.scrape()
                assert value(r, "celery_task_failed_total", name="t.sleep", exception="WorkerLostError") == 1
                assert value(r, "celery_task_started_total", name="t.sleep") == 1
                assert value(r, "celery_task_succeeded_total", name="t.ok") == 3
                assert value(r, "celery_task_in_progress") == 0
                assert outcomes_balance(r, "t.sleep") and outcomes_balance(r, "t.ok")


def _dead_mid_task(directory: str, runs: int) -> int:
    """A real process that started `runs` runs of task a and died before any finished."""

    def body(store: Store) -> None:
        m.Recorder(store, c.STARTED).labels("a", "q").inc(runs)
        m.Recorder(store, c.IN_PROGRESS).labels("a", "q").inc(runs)

    return write_as_dead_process(directory, body)


def test_a_reaper_that_crashes_between_link_and_unlink_counts_once(tmp_path: Path) -> None:
    """Crash after the lost runs' counter file is linked and before the live file is removed."""
    d = str(tmp_path)
    pid = _dead_mid_task(d, 2)
    with crashing_after("reap_link"):
        crashed = compaction.compact(d)
    assert crashed.lost_runs == 2 and os.path.exists(os.path.join(d, f"gauge_livesum_{pid}.db"))
    assert len(lost_run_files(d)) == 1
    assert merged_samples(DirectoryCollector(d))[LOST] == 2
    again = compaction.compact(d)
    assert again.lost_runs == 2 and again.reaped == 1, "the same file found under the same name, not rewritten"
    assert merged_samples(DirectoryCollector(d))[LOST] == 2
    assert not os.path.exists(os.path.join(d, f"gauge_livesum_{pid}.db")) and not lost_run_files(d), \
        "the live file reaped and the lost runs folded into the archive in the same call"
    for _ in range(2):
        compaction.compact(d)
    s = merged_samples(DirectoryCollector(d))
    assert s[LOST] == 2
    assert s['celery_task_started_total{name="a",queue_name="q"}'] == 2
    assert s["celery_exporter_compacted_processes_total{}"] == 1, "the reaper's file is not a process"


def test_the_exporter_s_compaction_counts_lost_runs_too(tmp_path: Path) -> None:
    """`python -m celery_signal_exporter.compact DIR` (what the exporter's compaction runs): no worker needed."""
    d = str(tmp_path)
    _dead_mid_task(d, 1)
    _dead_mid_task(d, 1)
    out = subprocess.run([sys.executable, "-m", "celery_signal_exporter.compact",
                          d], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    assert "absorbed=2" in out.stdout, out.stdout
    s = merged_samples(DirectoryCollector(d))
    assert s[LOST] == 2
    assert s['celery_task_started_total{name="a",queue_name="q"}'] == 2
    assert sorted(os.listdir(d)) == [".compact.lock", "counter_archive.db"]


def test_a_hard_time_limit_is_one_failure(redis_url: str, tmp_path: Path) -> None:
    """Celery sends task_failure twice for a hard time limit (with and without the request's context):
    counted once, under the queue the task came from."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), "--time-limit", "2", concurrency=2) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--compact-interval", "0") as ex:
        produce(env, "sleepers", 1, 10)
        wait_until(lambda: value(ex.scrape(), "celery_task_failed_total", name="t.sleep") >= 1, 30,
                   "the hard time limit")
        time.sleep(3)  # time for a second report, and a few ticks for any reaping
        s = ex.scrape()
        assert value(s, "celery_task_failed_total", name="t.sleep") == 1
        assert value(s, "celery_task_failed_total", name="t.sleep", queue_name="alpha",
                     exception="TimeLimitExceeded") == 1
        assert value(s, "celery_task_started_total", name="t.sleep") == 1
        assert outcomes_balance(s, "t.sleep")
        assert "Hard time limit" in w.log()
