"""Compaction of dead processes' files: exact totals through crashes, pid reuse and races.

Dead writers are real forked processes that wrote and exited; liveness is
their writer lock, exactly as in a worker.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from celery_signal_exporter import catalogue as c
from celery_signal_exporter import compact as compaction
from celery_signal_exporter.directory import LOCK_NAME, read_entries
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import MetricFile, Store, open_owned
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.compaction_crash import crashing_after
from tests.harness import files, one_task, write_as_dead_process
from tests.recorded import merged_samples

SENT = 'celery_task_sent_total{name="a",queue_name="q"}'
RUNTIME_COUNT = 'celery_task_runtime_seconds_count{name="a",queue_name="q"}'
RUNTIME_SUM = 'celery_task_runtime_seconds_sum{name="a",queue_name="q"}'
IN_PROGRESS = 'celery_task_in_progress{name="a",queue_name="q"}'
LAST_SUCCESS = 'celery_task_last_success_timestamp_seconds{name="a"}'
BEAT = "celery_worker_heartbeat_timestamp_seconds"


def stock(directory: str) -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return generate_latest(registry).decode()


def test_dead_files_fold_into_archives_that_stock_prometheus_client_reads(tmp_path: Any) -> None:
    d = str(tmp_path)
    for i in range(20):
        write_as_dead_process(d, one_task(i))
    live = Store(d)
    m.Recorder(live, c.SENT).labels("a", "q").inc(100)
    assert len(files(d)) == 20 * 4 + 1
    before = merged_samples(DirectoryCollector(d))
    assert before[SENT] == 120
    assert IN_PROGRESS not in before, "dead children's in-progress is dropped by the reader, before any reaping"

    result = compaction.compact(d)

    assert (result.absorbed, result.live, result.busy, result.errors) == (60, 1, False, [])
    pid = os.getpid()
    assert files(d) == sorted(["counter_archive.db", "histogram_archive.db", "gauge_max_archive.db",
                               f"counter_{pid}.db"] + [f for f in files(d) if f.startswith("gauge_livesum_")])
    assert not [f for f in os.listdir(d) if f.startswith(".compact-")], "staging is cleaned up"
    after = merged_samples(DirectoryCollector(d))
    assert after[SENT] == 120
    assert after[RUNTIME_COUNT] == 20
    assert after[RUNTIME_SUM] == 10.0
    assert after['celery_task_runtime_seconds_bucket{le="0.1",name="a",queue_name="q"}'] == 0
    assert after['celery_task_runtime_seconds_bucket{le="1",name="a",queue_name="q"}'] == 20
    assert after[LAST_SUCCESS] == 1019.0, "max gauges merge by max"
    assert after["celery_exporter_compacted_processes_total{}"] == 20
    text = stock(d)
    assert 'celery_task_sent_total{name="a",queue_name="q"} 120.0' in text
    assert 'celery_task_runtime_seconds_count{name="a",queue_name="q"} 20.0' in text
    assert 'celery_task_last_success_timestamp_seconds{name="a"} 1019.0' in text
    # A second run with nothing dead does nothing and changes nothing.
    again = compaction.compact(d)
    assert (again.absorbed, again.live) == (0, 1)
    assert merged_samples(DirectoryCollector(d)) == after


def test_mostrecent_gauges_keep_the_newest_timestamp(tmp_path: Any) -> None:
    d = str(tmp_path)
    for stamp, host_value in ((300.0, 3.0), (100.0, 1.0), (200.0, 2.0)):
        write_as_dead_process(d, lambda s, t=stamp, v=host_value: m.Recorder(s, c.HEARTBEAT).labels("h").set(v, t))
    compaction.compact(d)
    assert files(d) == ["gauge_mostrecent_archive.db"]
    with open(os.path.join(d, "gauge_mostrecent_archive.db"), "rb") as f:
        entries = list(read_entries(f.read()))
    assert [(v, t) for _, v, t in entries] == [(3.0, 300.0)]
    write_as_dead_process(d, lambda s: m.Recorder(s, c.HEARTBEAT).labels("h").set(4.0, 250.0))  # older: loses
    compaction.compact(d)
    with open(os.path.join(d, "gauge_mostrecent_archive.db"), "rb") as f:
        assert [(v, t) for _, v, t in read_entries(f.read())] == [(3.0, 300.0)]


@pytest.mark.parametrize("crash_after", ["stage", "archive"])
def test_a_crash_mid_compaction_counts_nothing_twice_and_loses_nothing(tmp_path: Any, crash_after: str) -> None:
    d = str(tmp_path)
    for i in range(10):
        write_as_dead_process(d, one_task(i))
    compaction.compact(d)  # an archive of generation 1 exists
    for i in range(10, 15):
        write_as_dead_process(d, one_task(i))

    with crashing_after(crash_after):
        compaction.compact(d)

    staged = [f for f in os.listdir(d) if f.startswith(".compact-")]
    assert staged == [".compact-2"], "the crash left its staging directory behind"
    s = merged_samples(DirectoryCollector(d))
    assert (s[SENT], s[RUNTIME_COUNT], s[LAST_SUCCESS]) == (15, 15, 1014.0)
    assert not any(f.startswith("counter_") and f != "counter_archive.db" for f in os.listdir(d))
    # The next compaction finishes the job.
    result = compaction.compact(d)
    assert result.errors == []
    assert not [f for f in os.listdir(d) if f.startswith(".compact-")]
    s = merged_samples(DirectoryCollector(d))
    assert (s[SENT], s[RUNTIME_COUNT], s[LAST_SUCCESS]) == (15, 15, 1014.0)


def test_full_disk_while_writing_the_archive_keeps_staged_files_counted(tmp_path: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path)
    for i in range(5):
        write_as_dead_process(d, one_task(i))

    def enospc(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compaction.os, "posix_fallocate", enospc)
    result = compaction.compact(d)
    assert len(result.errors) == 3 and all("No space left" in e for e in result.errors)
    assert merged_samples(DirectoryCollector(d))[SENT] == 5
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")], "no half-written archive left"
    monkeypatch.undo()
    assert compaction.compact(d).errors == []
    assert files(d) == ["counter_archive.db", "gauge_max_archive.db", "histogram_archive.db"]
    assert merged_samples(DirectoryCollector(d))[SENT] == 5


def test_a_damaged_archive_is_never_overwritten(tmp_path: Any) -> None:
    d = str(tmp_path)
    write_as_dead_process(d, one_task(0))
    (tmp_path / "counter_archive.db").write_bytes(b"\x07" * 50)
    result = compaction.compact(d)
    assert result.errors and result.errors[0].startswith("counter_archive.db")
    assert (tmp_path / "counter_archive.db").read_bytes() == b"\x07" * 50
    # The dead writer's counter file, and the reaper's file of its one lost run (counter_<pid>-<ino>-<mtime>.db).
    assert len([f for f in files(d) if f.startswith("counter_") and f != "counter_archive.db"]) == 2
    collector = DirectoryCollector(d)
    assert merged_samples(collector)[SENT] == 1
    assert collector.last.files_unreadable == 1


def test_pid_reuse_carries_on_in_a_dead_file_and_is_compacted_once(tmp_path: Any) -> None:
    d = str(tmp_path)
    dead = write_as_dead_process(d, one_task(0))
    # A new process gets the dead one's pid (open_owned is what Store.file calls with os.getpid()).
    reborn = open_owned(d, "counter", dead)
    key = next(k for k, _, _ in read_entries(open(os.path.join(d, f"counter_{dead}.db"), "rb").read()))
    reborn.add(reborn.slot(key), 1)
    assert compaction.compact(d).live == 1, "the reborn writer's file is live: not swallowed"
    assert os.path.exists(os.path.join(d, f"counter_{dead}.db"))
    assert merged_samples(DirectoryCollector(d))[SENT] == 2
    reborn.add(reborn.slot(key), 1)
    reborn.close()  # the reborn process dies too
    compaction.compact(d)
    assert not os.path.exists(os.path.join(d, f"counter_{dead}.db"))
    assert merged_samples(DirectoryCollector(d))[SENT] == 3
    # And a third life with the same pid starts afresh next to the archive.
    third = open_owned(d, "counter", dead)
    third.add(third.slot(key), 1)
    assert merged_samples(DirectoryCollector(d))[SENT] == 4
    third.close()


def test_same_pid_live_in_another_namespace_gets_its_own_file(tmp_path: Any) -> None:
    d = str(tmp_path)
    first = open_owned(d, "counter", 1)  # pid 1 in one container
    second = open_owned(d, "counter", 1)  # pid 1 in another, same directory
    assert (os.path.basename(first.path), os.path.basename(second.path)) == ("counter_1.db", "counter_1-1.db")
    first.add(first.slot("k"), 1)
    second.add(second.slot("k"), 2)
    assert compaction.compact(d).live == 2
    first.close()
    second.close()
    assert compaction.compact(d).absorbed == 2
    with open(os.path.join(d, "counter_archive.db"), "rb") as f:
        assert [(k, v) for k, v, _ in read_entries(f.read())] == [("k", 3.0), (compaction.COMPACTED_KEY, 2.0)]


def test_a_live_gauge_file_is_replaced_not_inherited_and_never_half_made(tmp_path: Any) -> None:
    d = str(tmp_path)
    f = open_owned(d, "gauge_livesum", 42)
    f.set(f.slot("k"), 5)
    f.close()  # writer 42 dies
    again = open_owned(d, "gauge_livesum", 42)
    with open(again.path, "rb") as raw:
        assert list(read_entries(raw.read())) == []
    again.close()
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_foreign_prometheus_client_files_are_never_compacted(tmp_path: Any) -> None:
    d = str(tmp_path)
    foreign = MetricFile(os.path.join(d, "counter_77.db"))  # no writer lock, no tag: judged by nobody
    foreign._map[4:8] = b"\0\0\0\0"
    foreign.add(foreign.slot('["x", "x_total", {}, "h"]'), 1)
    foreign.close()
    assert compaction.compact(d).absorbed == 0
    assert files(d) == ["counter_77.db"]


def test_abandoned_temporary_files_are_removed_only_when_old(tmp_path: Any) -> None:
    d = str(tmp_path)
    young, old = tmp_path / ".counter_5.db.5.1.tmp", tmp_path / ".counter_6.db.6.1.tmp"
    young.write_bytes(b"")
    old.write_bytes(b"")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    compaction.compact(d)
    assert young.exists() and not old.exists()


def test_staged_files_are_never_deleted_on_the_word_of_a_damaged_archive(tmp_path: Any) -> None:
    d = str(tmp_path)
    write_as_dead_process(d, one_task(0))
    with crashing_after("stage"):
        compaction.compact(d)  # a crash left .compact-1 behind
    staged = os.listdir(os.path.join(d, ".compact-1"))
    assert len(staged) == 4  # counter, histogram, gauge_max, and the reaper's file of the lost run
    # Then the counter archive is damaged, with a header claiming a generation far beyond 1.
    (tmp_path / "counter_archive.db").write_bytes(b"\x40\x00\x00\x00\xff\xff\xff\x7f" + b"\x01" * 56)
    result = compaction.compact(d)
    assert result.errors and result.errors[0].startswith("counter_archive.db")
    assert [f for f in os.listdir(os.path.join(d, ".compact-1")) if f.startswith("counter_")], "kept"
    s = merged_samples(DirectoryCollector(d))
    assert s[SENT] == 1, "still counted, from staging, since the damaged archive's generation is not trusted"
    assert s[RUNTIME_COUNT] == 1, "the histogram archive was written as usual"


def test_a_first_compaction_during_an_unlocked_read_is_read_again(tmp_path: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any compaction there is no lock file to take; if one starts mid-read, the read is redone."""
    d = str(tmp_path)
    for i in range(3):
        write_as_dead_process(d, one_task(i))
    assert not os.path.exists(os.path.join(d, LOCK_NAME))
    collector = DirectoryCollector(d)
    plan = collector._plan
    calls = []

    def plan_then_compact() -> Any:
        out = plan()
        if not calls:
            compaction.compact(d)  # moves the files listed a moment ago into the archive
        calls.append(out)
        return out

    monkeypatch.setattr(collector, "_plan", plan_then_compact)
    s = merged_samples(collector)
    assert len(calls) == 2
    assert (s[SENT], s[RUNTIME_COUNT]) == (3, 3)
