"""A damaged metrics directory, with a real worker and the real exporter process.

Tests run as root, and chmod 000 does not stop root from reading a file, so
"unreadable" is made the way root also fails: a directory and a FIFO under a
metrics file's name (EISDIR, and a read that must not block the scrape).
The full disk is a real one: a 1 MB tmpfs mounted for the test.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.harness import Samples, env_for, exporter, produce, value, wait_until, worker


def _compactions(ex_samples: Samples) -> float:
    return value(ex_samples, "celery_exporter_compacted_processes_total")


def test_damaged_files_are_counted_logged_once_and_kept(redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), concurrency=2) as w, exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "many", 4)
        # The producer's file is folded into counter_archive.db, which this test then damages.
        wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total") == 4
                   and _compactions(r) == 1, 60, "4 tasks and their producer compacted")
        real = next(f for f in sorted(os.listdir(metrics_dir)) if f.startswith("counter_") and "archive" not in f)
        with open(os.path.join(metrics_dir, real), "rb") as f:
            head = f.read(40)
        damaged = {
            "counter_900001.db": "zero bytes",
            "histogram_900002.db": "truncated",
            "counter_900003.db": "garbage",
            "gauge_max_900004.db": "a directory",
            "gauge_livesum_900005.db": "a FIFO",
            "counter_archive.db": "garbage archive",
        }
        d = metrics_dir
        open(os.path.join(d, "counter_900001.db"), "wb").close()
        with open(os.path.join(d, "histogram_900002.db"), "wb") as f:
            f.write(head[:20])  # our header and tag, then nothing: looks like ours, is not whole
        with open(os.path.join(d, "counter_900003.db"), "wb") as f:
            f.write(os.urandom(3000))
        os.mkdir(os.path.join(d, "gauge_max_900004.db"))
        os.mkfifo(os.path.join(d, "gauge_livesum_900005.db"))
        with open(os.path.join(d, "counter_archive.db"), "wb") as f:
            f.write(b"\x10\x00\x00\x00garbage!")
        before = set(os.listdir(d))

        for _ in range(3):
            s = ex.scrape()
        assert value(s, "celery_exporter_metrics_files", state="unreadable") == len(damaged)
        assert value(s, "celery_task_succeeded_total", name="t.ok") == 4, "everything readable is still there"
        # Worker ticks go on. The damaged counter archive cannot be added to, so the compactor leaves
        # counter files alone and counts that as its error on every tick; everything else carries on.
        produce(env, "many", 3)
        s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total") == 7
                       and value(r, "celery_exporter_handler_errors_total", signal="worker_compact") >= 3 and r,
                       60, "3 more tasks and three compaction ticks")
        # What the damaged archive held (the first 4 publishes, the compaction count) is not guessed at;
        # the new producer's file is read where it is.
        assert value(s, "celery_task_sent_total", name="t.ok") == 3
        assert _compactions(s) == 0
        assert value(s, "celery_task_succeeded_total", name="t.ok") == 7
        assert value(s, "celery_task_runtime_seconds_count", name="t.ok") == 7
        assert value(s, "celery_exporter_metrics_files", state="unreadable") == len(damaged)
        assert value(s, "celery_exporter_handler_errors_total") == value(
            s, "celery_exporter_handler_errors_total", signal="worker_compact"), "no other receiver failed"
        assert before <= set(os.listdir(d)), "nothing was deleted"
        with open(os.path.join(d, "counter_archive.db"), "rb") as f:
            assert f.read() == b"\x10\x00\x00\x00garbage!", "a damaged archive is never overwritten"
        assert w.log().count("worker_compact receiver failed") == 1, "logged once"
        log = ex.log()
        # One summary line naming every unreadable file, logged when the set changed, not one per file per scrape.
        summary = [line for line in log.splitlines() if "unreadable metrics file(s)" in line]
        assert len(summary) == 1, log
        for name in damaged:
            assert f"{name}: " in summary[0], (name, summary)


def test_missing_directory_answers_and_recovers(redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    metrics_dir = str(tmp_path / "not-yet")
    env = env_for(redis_url, metrics_dir)
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        for _ in range(3):
            s = ex.scrape()
        assert value(s, "celery_exporter_metrics_files", state="read") == 0
        assert value(s, "celery_exporter_metrics_files", state="unreadable") == 0
        assert ex.get("/readyz").status_code == 503
        with worker(env, str(tmp_path), concurrency=1):
            produce(env, "many", 2)
            s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total") == 2 and r,
                           60, "the worker to create the directory and count")
            assert ex.get("/readyz").status_code == 200
        assert ex.log().count("unreadable: No such file or directory") == 1


@contextmanager
def tiny_tmpfs(path: str, size: str) -> Iterator[str]:
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def _fill(directory: str, name: str = "filler.bin") -> str:
    """Fill the filesystem to the last byte; returns the filler's path."""
    filler = os.path.join(directory, name)
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return filler


@contextmanager
def kept_full(directory: str) -> Iterator[None]:
    """Keep the filesystem full: whatever room is freed (a compaction folding a dead child's files)
    is taken again within a few milliseconds, so a new child finds none however slow the machine."""
    stop = threading.Event()

    def refill() -> None:
        n = 0
        while not stop.wait(0.005):
            if os.statvfs(directory).f_bavail:
                n += 1
                _fill(directory, f"refill-{n}.bin")

    thread = threading.Thread(target=refill, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for name in os.listdir(directory):
            if name.startswith("refill-"):
                os.unlink(os.path.join(directory, name))


def test_full_disk_never_reaches_a_task(redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    """With the metrics filesystem full, tasks succeed, the errors are counted, and it recovers."""
    with tiny_tmpfs(str(tmp_path / "metrics"), "2m") as metrics_dir:
        env = env_for(redis_url, metrics_dir)
        with worker(env, str(tmp_path), concurrency=1) as w, \
                exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
            produce(env, "many", 3)
            # The producer's files are compacted before the disk fills, so that no compaction is due after.
            wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total") == 3
                       and _compactions(r) == 1, 60, "3 tasks and their producer compacted")
            filler = _fill(metrics_dir)
            # The producer cannot make its files: publishing must still work.
            produce(env, "wide")
            wait_until(lambda: w.log().count("succeeded in") == 3 + 12, 60, "the 12 wide tasks to succeed")
            s = wait_until(lambda: (r := ex.scrape()) and value(
                r, "celery_exporter_handler_errors_total", signal="task_prerun") >= 1 and r,
                30, "the errors to be counted")
            # A dozen names at the length cap outgrow the child's histogram file: each prerun that needs it to
            # grow fails with ENOSPC, is counted, and goes no further (nothing counted in progress, so postrun
            # has nothing to undo). Whatever else needed room is counted under its own signal.
            errors = value(s, "celery_exporter_handler_errors_total")
            assert errors == sum(value(s, "celery_exporter_handler_errors_total", signal=signal)
                                 for signal in ("task_received", "task_prerun", "task_postrun"))
            assert value(s, "celery_task_in_progress") == 0, "no gauge left off by one"
            assert value(s, "celery_task_succeeded_total", name="t.ok") == 3
            assert value(s, "celery_exporter_metrics_files", state="unreadable") == 0
            assert "No space left on device" in w.log()
            os.unlink(filler)
            produce(env, "many", 2)
            s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total", name="t.ok") == 5
                           and r, 60, "recovery once there is room again")
            assert value(s, "celery_task_sent_total", name="t.ok") == 5
            assert value(s, "celery_task_in_progress") == 0
            assert value(s, "celery_exporter_handler_errors_total") == errors


def test_full_disk_with_recycled_children_counts_every_run_or_its_loss(
        redis_url: str, tmp_path: pytest.TempPathFactory) -> None:
    """`--max-tasks-per-child 1`: runs after the disk filled are in new children that cannot make their files
    (until compaction frees a dead child's room).

    Each such run is counted once as lost, in the space the worker main reserved
    at its start (`celery_exporter_writes_lost_total`), so started + lost runs =
    runs, exactly, and succeeded + lost outcomes = runs. Before: those runs were
    counted nowhere, not even as errors; only received 13 (the worker main's
    file existed) against started 10 hinted at it.
    """
    with tiny_tmpfs(str(tmp_path / "metrics"), "2m") as metrics_dir:
        env = env_for(redis_url, metrics_dir)
        with worker(env, str(tmp_path), "--max-tasks-per-child", "1", concurrency=1) as w, \
                exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
            produce(env, "many", 3)
            wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total") == 3
                       and _compactions(r) >= 2, 60, "3 tasks and their children compacted")
            filler = _fill(metrics_dir)
            with kept_full(metrics_dir):
                produce(env, "many", 10)
                wait_until(lambda: w.log().count("succeeded in") == 13, 60, "the 10 tasks to succeed")
            s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_received_total") == 13 and r,
                           30, "the received messages to be counted")
            started = value(s, "celery_task_started_total", name="t.ok")
            lost = value(s, "celery_exporter_writes_lost_total", signal="task_prerun")
            succeeded = value(s, "celery_task_succeeded_total", name="t.ok")
            lost_outcomes = value(s, "celery_exporter_writes_lost_total", signal="task_postrun")
            print(f"\nstarted {started:g} + lost {lost:g}; succeeded {succeeded:g} + lost {lost_outcomes:g}")
            assert started + lost == 13, (started, lost)
            assert succeeded + lost_outcomes == 13, (succeeded, lost_outcomes)
            assert lost >= 1, "no child went without files: the test did not fill the disk"
            assert value(s, "celery_exporter_handler_errors_total", signal="task_prerun") >= lost
            assert value(s, "celery_task_in_progress") == 0
            os.unlink(filler)
            produce(env, "many", 2)
            s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total", name="t.ok")
                           + value(r, "celery_exporter_writes_lost_total", signal="task_postrun") == 15 and r,
                           60, "recovery once there is room again")
            assert value(s, "celery_task_started_total", name="t.ok") \
                + value(s, "celery_exporter_writes_lost_total", signal="task_prerun") == 15
