"""The worker main's heartbeat tick: a solo worker busy with a long task, and a directory full of junk."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from celery_signal_exporter import catalogue as c
from celery_signal_exporter import compact as compaction
from celery_signal_exporter.directory import series_key
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store, open_owned
from tests.harness import (
    JUNK,
    Samples,
    env_for,
    exporter,
    make_junk,
    produce,
    settle,
    value,
    wait_until,
    worker,
    write_as_dead_process,
)


def test_a_solo_worker_busy_with_a_long_task_reads_up(redis_url: str, tmp_path: Path) -> None:
    """An 18 s task on the solo pool, scraped with --worker-timeout 5: up, active and pool all along.

    The solo pool runs the task inside the consumer's event loop, so a tick on the
    consumer's timer would not come for 18 s: the worker would read down and lose its pool.
    """
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), pool="solo", concurrency=1) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--worker-timeout", "5") as ex:
        produce(env, "sleepers", 1, 18)
        wait_until(lambda: value(ex.scrape(), "celery_task_in_progress", name="t.sleep") == 1, 30,
                   "the long task to start")
        # The first tick after the start (0.5 s here) is what first says the worker is busy.
        wait_until(lambda: value(ex.scrape(), "celery_worker_tasks_active", hostname=w.hostname) == 1, 5,
                   "a tick while the task runs")
        during: list[tuple[float, float, float, float]] = []
        began = time.monotonic()
        while True:
            s = ex.scrape()
            if value(s, "celery_task_succeeded_total", name="t.sleep") == 1:
                break
            during.append((time.monotonic() - began, value(s, "celery_worker_up", hostname=w.hostname),
                           value(s, "celery_worker_tasks_active", hostname=w.hostname),
                           value(s, "celery_worker_pool_processes", hostname=w.hostname)))
            assert time.monotonic() - began < 60, "the task never finished"
            time.sleep(1.0)
        assert during[-1][0] >= 12, f"scraped for {during[-1][0]:.0f} s of the task only: {during}"
        assert len(during) >= 10
        assert all(row[1:] == (1, 1, 1) for row in during), f"(seconds, up, active, pool) while busy: {during}"
        def idle() -> Samples | None:
            r = ex.scrape()
            return r if value(r, "celery_worker_tasks_active", hostname=w.hostname) == 0 else None

        after = wait_until(idle, 10, "active back to 0")
        assert after is not None
        assert value(after, "celery_worker_up", hostname=w.hostname) == 1
        assert value(after, "celery_worker_pool_processes", hostname=w.hostname) == 1
        assert value(after, "celery_task_in_progress") == 0
    print(f"\nsolo: {len(during)} scrapes over {during[-1][0]:.0f} s of an 18 s task, all up 1, active 1, pool 1")


def fingerprint(directory: str, names: set[str]) -> str:
    """A digest of the names given and their contents, to show that nothing was touched."""
    digest = hashlib.sha256()
    for name in sorted(names):
        with open(os.path.join(directory, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def write_dead(directory: str, sent: int) -> int:
    """A real process that counts `sent` publishes, dies mid-task (in progress 1), and exits."""

    def body(store: Store) -> None:
        m.Recorder(store, c.SENT).labels("a", "q").inc(sent)
        m.Recorder(store, c.IN_PROGRESS).labels("a", "q").inc()

    return write_as_dead_process(directory, body)


def test_a_tick_opens_only_what_may_have_changed(tmp_path: Any) -> None:
    """50 000 junk files: judged once, then a tick opens only live writers' files; nothing deleted."""
    d = str(tmp_path / "metrics")
    make_junk(d)
    junk = set(os.listdir(d))
    before = fingerprint(d, junk)
    live = Store(d)
    m.Recorder(live, c.SENT).labels("a", "q").inc(5)  # a live writer: counter_<us>.db, judged on every tick
    write_dead(d, 3)

    first = compaction.compact(d, by_pid=True)
    assert first.relisted and first.absorbed == 1 and first.reaped == 1 and first.lost_runs == 1
    assert first.opened >= 2 * JUNK // 3, "the first tick judges every file under one of our names"
    costs = []
    settle(d)
    for _ in range(3):
        r = compaction.compact(d, by_pid=True)
        costs.append((r.relisted, r.opened, r.live))
    # The first of these re-lists (the last tick changed the directory), the rest do not;
    # none opens more than this process's own counter file.
    assert costs == [(True, 1, 1), (False, 1, 1), (False, 1, 1)], costs
    view = compaction._views[d]
    assert len(view.verdicts) == len([n for n in junk if n.endswith(".db")]), "every junk .db judged once"
    assert len(view.verdicts) + len(view.work) + len(view.ignored) <= len(os.listdir(d)), "bounded by the listing"

    # The memory follows the directory: junk that goes is forgotten at the next listing.
    gone = sorted(n for n in junk if n.startswith("counter_"))[: 10_000]
    for name in gone:
        os.unlink(os.path.join(d, name))
    junk -= set(gone)
    before = fingerprint(d, junk)
    settle(d)
    r = compaction.compact(d, by_pid=True)
    assert r.relisted and r.opened == 1
    assert len(view.verdicts) + len(view.work) + len(view.ignored) <= len(os.listdir(d))
    assert not any(name in view.verdicts for name in gone)

    assert junk <= set(os.listdir(d)) and fingerprint(d, junk) == before, "junk is never touched"
    from celery_signal_exporter.server.collect import DirectoryCollector
    from tests.recorded import merged_samples

    s = merged_samples(DirectoryCollector(d))
    assert s['celery_task_sent_total{name="a",queue_name="q"}'] == 8
    assert s['celery_task_failed_total{exception="WorkerLostError",name="a",queue_name="q"}'] == 1
    live.close()


def test_a_tick_reaps_a_dead_writers_live_file_once(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One heartbeat tick judges, reads and reaps a dead writer's live gauges exactly once.

    The tick (WorkerMetrics.tick, as the worker's timer runs it) opens the dead
    live file once and reads it through the descriptor whose lock told it the
    writer was dead. Before: the reaper locked one descriptor and read the file
    again by its name, a second open per dead file per tick (and a file
    replaced in between would have been judged by one inode and read from another).
    """
    from celery import Celery

    from celery_signal_exporter.recording.receivers import Instrumentation, Options
    from celery_signal_exporter.recording.worker import WorkerMetrics

    d = str(tmp_path)
    dead = write_dead(d, 3)
    live_name = f"gauge_livesum_{dead}.db"
    tick = WorkerMetrics(Instrumentation(Celery("tick"), Options(metrics_dir=d)))
    consumer = type("Consumer", (), {"hostname": "w@test", "pool": type("Pool", (), {"num_processes": 2})()})()

    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.path.basename(os.fsdecode(path)))
        return real_open(path, *args, **kwargs)

    judged: list[str] = []
    real_reap_live = compaction._reap_live

    def counting_reap_live(directory: str, name: str, *args: Any) -> Any:
        judged.append(name)
        return real_reap_live(directory, name, *args)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(compaction, "_reap_live", counting_reap_live)
    tick.tick(consumer)
    monkeypatch.undo()

    assert judged.count(live_name) == 1, judged
    assert opened.count(live_name) == 1, f"the dead live file opened {opened.count(live_name)} times in one tick"
    assert live_name not in os.listdir(d)
    from celery_signal_exporter.server.collect import DirectoryCollector
    from tests.recorded import merged_samples

    s = merged_samples(DirectoryCollector(d))
    assert s['celery_task_failed_total{exception="WorkerLostError",name="a",queue_name="q"}'] == 1
    assert s['celery_task_sent_total{name="a",queue_name="q"}'] == 3
    assert s['celery_worker_pool_processes{hostname="w@test"}'] == 2
    tick.inst.store.close()


def test_a_foreign_file_adopted_in_place_is_compacted_once_its_verdict_expires(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty counter_<pid>.db is judged foreign; a process with that pid then adopts it in place
    (same name, same inode: the listing cannot tell). Its verdict expires, and it is compacted."""
    d = str(tmp_path)
    pid = 4_000_000 + os.getpid() % 1000  # above any real pid: nobody else writes it
    open(os.path.join(d, f"counter_{pid}.db"), "wb").close()
    monkeypatch.setattr(compaction, "VERDICT_TTL", 1.0)
    first = compaction.compact(d)
    assert (first.absorbed, first.opened) == (0, 1)
    adopted = open_owned(d, "counter", pid)  # what Store.file does in a process with that pid
    key = series_key(c.SENT.name, c.SENT.name + "_total", {"name": "a", "queue_name": "q"}, c.SENT.help)
    adopted.add(adopted.slot(key), 7)
    adopted.close()  # and it dies
    wait_until(lambda: compaction.compact(d).absorbed == 1, 10, "the adopted file to be compacted")
    assert f"counter_{pid}.db" not in os.listdir(d)
    from celery_signal_exporter.server.collect import DirectoryCollector
    from tests.recorded import merged_samples

    assert merged_samples(DirectoryCollector(d))['celery_task_sent_total{name="a",queue_name="q"}'] == 7


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_cpu(pid: int, seconds: float) -> float:
    start = _cpu_seconds(pid)
    time.sleep(seconds)
    return _cpu_seconds(pid) - start


def _run(redis_url: str, tmp: str, junk: int) -> tuple[float, Samples, int]:
    """A real prefork worker on a directory with `junk` files: its main's CPU over 20 s idle, then a workload."""
    os.makedirs(tmp, exist_ok=True)
    metrics_dir = os.path.join(tmp, "metrics")
    make_junk(metrics_dir, junk)
    names = set(os.listdir(metrics_dir))
    before = fingerprint(metrics_dir, names)
    env = env_for(redis_url, metrics_dir)
    with worker(env, tmp, concurrency=2) as w, \
            exporter(tmp, "--metrics-dir", metrics_dir, "--compact-interval", "0") as ex:
        time.sleep(8)  # the first ticks judge the junk once
        cpu = _idle_cpu(w.proc.pid, 20)
        produce(env, "many", 20)
        def done() -> Samples | None:
            r = ex.scrape()
            return r if value(r, "celery_task_succeeded_total") == 20 else None

        s = wait_until(done, 60, "20 tasks")
        assert s is not None
        assert names <= set(os.listdir(metrics_dir)) and fingerprint(metrics_dir, names) == before, \
            "junk untouched, nothing deleted"
    return cpu, s, len(names)


@pytest.mark.serial  # compares tick costs: run alone
def test_junk_in_the_directory_does_not_slow_the_worker_main(redis_url: str, tmp_path: Any) -> None:
    """Idle CPU of a real worker main with 50 000 junk files stays near a clean directory's.

    Before: every tick opened every file under one of our names (idle CPU 0.4% -> 22% measured).
    """
    clean, _, _ = _run(redis_url, str(tmp_path / "clean"), 0)
    dirty, s, n = _run(redis_url, str(tmp_path / "junk"), JUNK)
    print(f"\nworker main CPU over 20 s idle: clean {clean:.2f} s, {n} junk files {dirty:.2f} s")
    assert dirty <= 3 * clean + 0.5, f"junk costs the worker main: {dirty:.2f} s against {clean:.2f} s clean"
    assert value(s, "celery_task_succeeded_total", name="t.ok") == 20
    assert value(s, "celery_task_started_total", name="t.ok") == 20
    assert value(s, "celery_task_in_progress") == 0
