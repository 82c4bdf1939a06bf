"""What the worker main holds, runs and consumes, read on its tick (worker_state.py), against real workers.

One worker per pool (prefork, threads, gevent, eventlet, solo) runs at once on
Redis, each on a queue of its own, busy with a 30 s task per pool slot and 8
quick tasks prefetched behind them (prefetch multiplier 10) plus one due in
8 s: while they run the scrape must read the oldest run's age, the time
limits, the exact requests each worker holds (reserved, scheduled) while the
real probe reads the queue empty, what each consumes, and the memory /proc
reads. A second test runs two workers on different queues (Redis, RabbitMQ)
and checks consuming, slots per queue, and cancel_consumer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, Samples, WorkerProcess, env_for, exporter, value, wait_until, worker

APP = "tests.state_app"
#: (pool, concurrency)
POOLS = [("prefork", 2), ("threads", 2), ("gevent", 2), ("eventlet", 2), ("solo", 1)]
LONG = 30
SHORT = 8
COUNTDOWN = 12
PREFETCH = 10
#: (reserved, scheduled, celery_queue_length) while every slot runs a long task. prefork and threads
#: hold what they prefetched and the countdown task in the timer. gevent and eventlet take one
#: message more than they have slots and stop: the consumer blocks handing it to a full pool (gevent's
#: Pool.spawn waits for a free slot), so the rest, the countdown task too, waits in Redis. Solo runs its
#: task inside the consumer's loop, which takes nothing more until the task ends.
HELD = {"prefork": (SHORT, 1, 0), "threads": (SHORT, 1, 0), "gevent": (1, 0, SHORT),
        "eventlet": (1, 0, SHORT), "solo": (0, 0, SHORT + 1)}
#: s.sleep's own time_limit in tests/state_app.py; the workers' --time-limit holds for s.ok.
SLEEP_LIMIT = 120
WORKER_LIMIT = 600


def produce(env: dict[str, str], scenario: str, *args: Any) -> None:
    out = subprocess.run([sys.executable, "-m", APP, scenario, *map(str, args)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"producer {scenario} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return found


def resident(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def near(got: float, want: float, within: float = 0.10) -> bool:
    return want > 0 and abs(got - want) <= within * want


@pytest.mark.serial  # waits measured against the tasks' own durations: run alone
def test_held_running_and_memory_on_every_pool(redis_url: str, tmp_path: Path) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    queue = {pool: f"state_{pool}" for pool, _ in POOLS}
    with ExitStack() as stack:
        workers: dict[str, WorkerProcess] = {
            pool: stack.enter_context(worker(env, str(tmp_path), "--prefetch-multiplier", str(PREFETCH),
                                             "--time-limit", str(WORKER_LIMIT),
                                             pool=pool, concurrency=n, queues=queue[pool], app=APP,
                                             hostname=f"{pool}@state"))
            for pool, n in POOLS
        }
        ex = stack.enter_context(exporter(
            str(tmp_path), "--metrics-dir", metrics_dir, "--worker-timeout", "5", "--broker-url", redis_url,
            "--probe-interval", "1", "--probe-timeout", "1", *[a for q in queue.values() for a in ("--queue", q)]))
        began = time.monotonic()
        for pool, n in POOLS:
            produce(env, "busy", queue[pool], n, LONG, SHORT, COUNTDOWN)
        published = time.monotonic()

        def vhost_db() -> str:
            return redis_url.rsplit("/", 1)[1]

        # While the long tasks run: exact requests held, the broker's queue empty.
        def holding() -> Samples | None:
            s = ex.scrape()
            for pool, n in POOLS:
                h, q = workers[pool].hostname, queue[pool]
                held = (value(s, "celery_worker_tasks_reserved", hostname=h, queue_name=q),
                        value(s, "celery_worker_tasks_scheduled", hostname=h, queue_name=q),
                        value(s, "celery_queue_length", queue_name=q, vhost=vhost_db()))
                if value(s, "celery_worker_tasks_active", hostname=h) != n or held != HELD[pool]:
                    return None
            return s

        try:
            s = wait_until(holding, COUNTDOWN - 4, "every worker to hold its prefetched and scheduled tasks")
        except AssertionError:
            raise AssertionError(f"last scrape: {held_summary(ex.scrape(), workers, queue)}") from None
        assert s is not None
        assert time.monotonic() - published < COUNTDOWN, "the countdown was due before it was seen held"
        for pool, _ in POOLS:
            h, q = workers[pool].hostname, queue[pool]
            assert value(s, "celery_worker_consuming", hostname=h, queue_name=q) == 1, pool
            assert value(s, "celery_worker_consuming", hostname=h) == 1, pool
            assert value(s, "celery_task_time_limit_seconds", name="s.sleep") == SLEEP_LIMIT
            assert value(s, "celery_task_time_limit_seconds", name="s.ok") == WORKER_LIMIT

        # Memory, against /proc read here: main and pool processes (prefork), each within 10 %.
        s = ex.scrape()
        for pool, _ in POOLS:
            w = workers[pool]
            kids = children(w.proc.pid) if pool == "prefork" else []
            want = resident(w.proc.pid) + sum(resident(k) for k in kids)
            got = value(s, "celery_worker_resident_memory_bytes", hostname=w.hostname)
            assert near(got, want), f"{pool}: resident memory {got:.0f}, /proc says {want}"
            if pool == "prefork":
                assert len(kids) == 2, kids
                biggest = max(resident(k) for k in kids)
                got = value(s, "celery_worker_pool_process_max_resident_memory_bytes", hostname=w.hostname)
                assert near(got, biggest), f"largest pool process {got:.0f}, /proc says {biggest}"
            else:
                assert not any(n == "celery_worker_pool_process_max_resident_memory_bytes"
                               and dict(ls).get("hostname") == w.hostname for n, ls in s), pool

        # The countdown comes due: it leaves scheduled for reserved (the pool is still busy).
        def due() -> Samples | None:
            r = ex.scrape()
            for pool, _ in POOLS:
                h, q = workers[pool].hostname, queue[pool]
                if HELD[pool][1] and (value(r, "celery_worker_tasks_scheduled", hostname=h, queue_name=q),
                                       value(r, "celery_worker_tasks_reserved", hostname=h, queue_name=q)) != (0, 9):
                    return None
            return r

        wait_until(due, COUNTDOWN + 10, "the countdown tasks to come due")

        # The oldest run's age climbs with the long tasks.
        def old() -> Samples | None:
            r = ex.scrape()
            ages = [value(r, "celery_task_oldest_running_age_seconds", name="s.sleep", queue_name=queue[p])
                    for p, _ in POOLS]
            return r if min(ages) >= LONG - 5 else None

        try:
            s = wait_until(old, LONG + 10, f"every oldest-running age to reach {LONG - 5} s", interval=0.5)
        except AssertionError:
            r = ex.scrape()
            raise AssertionError({p: value(r, "celery_task_oldest_running_age_seconds", queue_name=queue[p])
                                  for p, _ in POOLS}) from None
        assert s is not None
        for pool, _ in POOLS:
            assert value(s, "celery_task_oldest_running_age_seconds", name="s.sleep",
                         queue_name=queue[pool]) <= time.monotonic() - began, pool

        # Everything ran: nothing held, nothing running, every series written at 0.
        def done() -> Samples | None:
            r = ex.scrape()
            for pool, n in POOLS:
                h, q = workers[pool].hostname, queue[pool]
                if (value(r, "celery_task_succeeded_total", name="s.sleep", queue_name=q),
                        value(r, "celery_task_succeeded_total", name="s.ok", queue_name=q),
                        value(r, "celery_worker_tasks_active", hostname=h),
                        value(r, "celery_worker_tasks_reserved", hostname=h),
                        value(r, "celery_worker_tasks_scheduled", hostname=h),
                        value(r, "celery_task_oldest_running_age_seconds", queue_name=q)) != (n, SHORT + 1, 0, 0, 0, 0):
                    return None
            return r

        try:
            s = wait_until(done, 30, "every task to finish and the gauges to read 0")
        except AssertionError:
            raise AssertionError(f"last scrape: {held_summary(ex.scrape(), workers, queue)}") from None
        assert s is not None
        for pool, _ in POOLS:
            h, q = workers[pool].hostname, queue[pool]
            for metric in ("celery_worker_tasks_reserved", "celery_worker_tasks_scheduled"):
                assert (metric, frozenset({("hostname", h), ("queue_name", q)})) in s, (pool, metric)
            assert ("celery_task_oldest_running_age_seconds",
                    frozenset({("name", "s.sleep"), ("queue_name", q)})) in s, pool
        assert value(s, "celery_exporter_handler_errors_total") == 0
    print(f"\nfive pools, {LONG} s tasks: {time.monotonic() - began:.0f} s")


def held_summary(s: Samples, workers: dict[str, WorkerProcess], queue: dict[str, str]) -> dict[str, Any]:
    return {pool: {
        "active": value(s, "celery_worker_tasks_active", hostname=w.hostname),
        "reserved": value(s, "celery_worker_tasks_reserved", hostname=w.hostname, queue_name=queue[pool]),
        "scheduled": value(s, "celery_worker_tasks_scheduled", hostname=w.hostname, queue_name=queue[pool]),
        "queue_length": value(s, "celery_queue_length", queue_name=queue[pool]),
        "oldest": value(s, "celery_task_oldest_running_age_seconds", queue_name=queue[pool]),
    } for pool, w in workers.items()}


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")


def test_consuming_and_slots_per_queue(broker_url: str, tmp_path: Path) -> None:
    """Worker a consumes q1,q2 with 2 processes, b consumes q2,q3 with 3 threads; then a cancels q2, then stops."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(broker_url, metrics_dir)
    with worker(env, str(tmp_path), pool="prefork", concurrency=2, queues="q1,q2", app=APP,
                hostname="a@state") as a, \
            worker(env, str(tmp_path), pool="threads", concurrency=3, queues="q2,q3", app=APP,
                   hostname="b@state") as b, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:

        def consuming(s: Samples) -> dict[tuple[str, str], float]:
            return {(h, q): value(s, "celery_worker_consuming", hostname=h, queue_name=q)
                    for h in (a.hostname, b.hostname) for q in ("q1", "q2", "q3")
                    if any(n == "celery_worker_consuming" and ls == {("hostname", h), ("queue_name", q)}
                           for n, ls in s)}

        def slots(s: Samples) -> dict[str, float]:
            return {q: sum(value(s, "celery_worker_consuming", hostname=h, queue_name=q)
                           * value(s, "celery_worker_pool_processes", hostname=h)
                           for h in (a.hostname, b.hostname)) for q in ("q1", "q2", "q3")}

        both = {(a.hostname, "q1"): 1, (a.hostname, "q2"): 1, (b.hostname, "q2"): 1, (b.hostname, "q3"): 1}
        def reads(want: dict[tuple[str, str], int]) -> Samples | None:
            r = ex.scrape()
            return r if consuming(r) == want else None

        s = wait_until(lambda: reads(both), 10, "both workers consuming")
        assert slots(s) == {"q1": 2, "q2": 5, "q3": 3}
        for (h, q) in both:  # nothing held yet: at 0, not absent
            for metric in ("celery_worker_tasks_reserved", "celery_worker_tasks_scheduled"):
                assert s.get((metric, frozenset({("hostname", h), ("queue_name", q)}))) == 0, (metric, h, q)

        produce(env, "cancel", "q2", a.hostname)
        after = {**both, (a.hostname, "q2"): 0}
        s = wait_until(lambda: reads(after), 10, "a to stop consuming q2")
        assert slots(s) == {"q1": 2, "q2": 3, "q3": 3}

        a.proc.terminate()  # a graceful shutdown: everything a consumed reads 0 at once
        a.proc.wait(30)
        s = ex.scrape()
        assert value(s, "celery_worker_consuming", hostname=a.hostname) == 0
        assert value(s, "celery_worker_resident_memory_bytes", hostname=a.hostname) == 0
        assert value(s, "celery_worker_consuming", hostname=b.hostname) == 2
        assert value(s, "celery_exporter_handler_errors_total") == 0


def test_a_folded_task_shows_its_age_folded_and_is_counted_once(redis_url: str, tmp_path: Path) -> None:
    """With a cap of one task name, a running t.sleep reads under the fold; ticks add no dropped count."""
    from tests.harness import produce as produce_workload

    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir, CSX_TEST_MAX_NAMES="1")
    with worker(env, str(tmp_path), pool="threads", concurrency=2) as w, \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce_workload(env, "many", 1)  # t.ok takes the one name
        wait_until(lambda: value(ex.scrape(), "celery_task_succeeded_total", name="t.ok") == 1, 20, "t.ok to run")
        produce_workload(env, "sleepers", 1, 5)
        s = wait_until(lambda: (lambda r: r if value(r, "celery_task_oldest_running_age_seconds",
                                                     name="__overflow__") > 0.5 else None)(ex.scrape()),
                       20, "the folded run's age")
        dropped = value(s, "celery_exporter_dropped_label_values_total")
        assert dropped > 0
        time.sleep(2.0)  # four ticks
        s = ex.scrape()
        assert value(s, "celery_exporter_dropped_label_values_total") == dropped
        assert value(s, "celery_task_oldest_running_age_seconds", name="__overflow__") > 2.5
        assert not any(n == "celery_task_oldest_running_age_seconds" and ("name", "t.sleep") in ls for n, ls in s)
        assert value(s, "celery_worker_tasks_active", hostname=w.hostname) == 1
        wait_until(lambda: value(ex.scrape(), "celery_task_oldest_running_age_seconds", name="__overflow__") == 0,
                   20, "the folded age back to 0")
