"""Periodic tasks watched from beat's schedule, against real processes.

A real `celery beat` (tests/beat_app.py: entries every 1-3 s, interval and
crontab-style, one that always fails, one that outlasts its interval, one
whose runs expire), real workers, the real exporter (one for beat's
directory, one for the workers', as the beat and worker pods have) and a real
Prometheus evaluating the generated rules with the short profile's windows.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from celery_signal_exporter.mixin.rules import rule_groups
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.catalogue_support import BEAT, documented, exposed
from tests.harness import ROOT, beat, env_for, exporter, free_port, has, value, wait_until, worker
from tests.mixin_support import PERIODIC_DASHBOARD, dashboards, panels, substitute
from tests.profiles import short_profile
from tests.recorded import merged_samples
from tests.stack import Prometheus, monitoring


def beat_up(directory: str) -> bool:
    samples = merged_samples(DirectoryCollector(directory, worker_timeout=3))
    return any(k.startswith("celery_beat_up{") and v == 1 for k, v in samples.items())


#: tests.beat_app's scheduler, whose schedule changes at run time, checked every second.
CHANGING = ("-S", "tests.beat_app:ChangingScheduler", "--max-interval", "1")


def publish_blocker(env: dict[str, str], seconds: float) -> None:
    """One long run on the `late` queue, so that the runs of the `late` entry wait behind it and expire."""
    code = f"from tests.beat_app import sleep; sleep.apply_async(({seconds},), queue='late')"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)


def firing(prom: Prometheus, alertname: str, **labels: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts("firing")
            if a["labels"]["alertname"] == alertname and all(a["labels"].get(k) == v for k, v in labels.items())]


def entries_firing(prom: Prometheus, alertname: str) -> set[str]:
    return {a["labels"].get("entry", "") for a in firing(prom, alertname)}


def empty_periodic_panels(prom: Prometheus) -> list[str]:
    """The Periodic tasks dashboard's queries that return nothing, with its variables at All."""
    return [f"{p['title']} / {t['refId']}: {t['expr']}" for p in panels(dashboards()[PERIODIC_DASHBOARD])
            for t in p["targets"] if not prom.query(substitute(t["expr"]))]


def rules() -> dict[str, Any]:
    return {"celery-rules.yml": rule_groups(short_profile())}


@pytest.mark.serial  # alerts awaited within 40 s of a short-profile Prometheus: run at normal priority
def test_beat_schedule_runs_alerts_and_a_dead_beat(tmp_path: Path, redis_url: str) -> None:
    tmp = str(tmp_path)
    beat_dir, worker_dir = tmp_path / "beat-metrics", tmp_path / "worker-metrics"
    beat_dir.mkdir()
    worker_dir.mkdir()
    flag = tmp_path / "change-schedule"
    beat_env = env_for(redis_url, str(beat_dir), CSX_TEST_BEAT_CHANGE=str(flag), CSX_TEST_BEAT_LATE="1")
    worker_env = env_for(redis_url, str(worker_dir))
    publish_blocker(worker_env, 18)
    worker_port = free_port()  # the worker pod's sidecar, replaced later on the same address
    sidecar_args = ("--metrics-dir", str(worker_dir), "--worker-timeout", "3")
    with (
        worker(worker_env, tmp, concurrency=3, queues="periodic", app="tests.beat_app") as main_worker,
        worker(worker_env, tmp, concurrency=1, queues="late", app="tests.beat_app"),
        ExitStack() as worker_sidecar,
        exporter(tmp, "--metrics-dir", str(beat_dir), "--worker-timeout", "3") as beat_exporter,
        # No Alertmanager: these tests read alert states from Prometheus itself.
        monitoring(tmp, {"celery-worker": f"127.0.0.1:{worker_port}", "celery-beat": f"127.0.0.1:{beat_exporter.port}"},
                   rules(), alerting=False) as mon,
    ):
        prom = mon.prom
        worker_exporter = worker_sidecar.enter_context(exporter(tmp, *sidecar_args, port=worker_port))
        with beat(beat_env, tmp, *CHANGING) as beat_proc:
            started = time.time()
            # The schedule as beat reads it: intervals exact, crontab-style ones too.
            def schedule_read() -> Any:
                s = beat_exporter.scrape()
                once = all(has(s, "celery_beat_entry_last_dispatch_timestamp_seconds", entry=name)
                           for name in ("aligned-3s", "every-1s", "echo-a", "echo-b", "slow"))
                return s if once else None

            s = wait_until(schedule_read, 30, "beat to dispatch every entry once")
            intervals = {"every-1s": 1.0, "echo-a": 2.0, "echo-b": 2.0, "aligned-3s": 3.0, "always-fails": 1.0,
                         "slow": 2.0, "removed": 1.0, "late": 1.0}
            for name, every in intervals.items():
                assert value(s, "celery_beat_entry_interval_seconds", entry=name) == every, name
            assert value(s, "celery_beat_entry_interval_seconds", entry="echo-a", name="b.echo") == 2.0
            assert value(s, "celery_beat_up") == 1.0
            # Dispatch times exact: the crontab-style entry goes out on its wall-clock multiple of 3 s, and
            # each dispatch names the next due time one interval on.
            aligned = value(s, "celery_beat_entry_last_dispatch_timestamp_seconds", entry="aligned-3s")
            assert min(aligned % 3, 3 - aligned % 3) < 0.25, aligned
            due = value(s, "celery_beat_entry_next_due_timestamp_seconds", entry="aligned-3s")
            assert min(due % 3, 3 - due % 3) < 0.01 and due > aligned, (due, aligned)
            for name in ("every-1s", "echo-a", "slow"):
                s = beat_exporter.scrape()
                gap = (value(s, "celery_beat_entry_next_due_timestamp_seconds", entry=name)
                       - value(s, "celery_beat_entry_last_dispatch_timestamp_seconds", entry=name))
                assert abs(gap - intervals[name]) < 0.1, (name, gap)
            time.sleep(6)
            s = beat_exporter.scrape()
            elapsed = time.time() - started
            sent = value(s, "celery_beat_entry_dispatched_total", entry="every-1s")
            assert elapsed - 2 <= sent <= elapsed + 2, (sent, elapsed)
            assert value(s, "celery_beat_entry_dispatch_failures_total") == 0

            # The workers' side, per entry: two entries of one task apart, fresh successes, none for the failing.
            w = worker_exporter.scrape()
            now = time.time()
            for name in ("every-1s", "echo-a", "echo-b", "aligned-3s"):
                last = value(w, "celery_beat_entry_last_success_timestamp_seconds", entry=name)
                assert now - 4 < last <= now, (name, now - last)
            assert value(w, "celery_beat_entry_started_total", entry="echo-a", name="b.echo") >= 2
            assert value(w, "celery_beat_entry_started_total", entry="echo-b", name="b.echo") >= 2
            assert not has(w, "celery_beat_entry_last_success_timestamp_seconds", entry="always-fails")
            assert value(w, "celery_beat_entry_started_total", entry="always-fails") >= 4

            # Alerts: the failing entry does not succeed, the slow one overlaps, the late one expires.
            wait_until(lambda: "always-fails" in entries_firing(prom, "CeleryPeriodicTaskNotSucceeding"), 40,
                       "CeleryPeriodicTaskNotSucceeding for always-fails")
            wait_until(lambda: "slow" in entries_firing(prom, "CeleryPeriodicTaskOverlapping"), 40,
                       "CeleryPeriodicTaskOverlapping for slow")
            assert value(worker_exporter.scrape(), "celery_beat_entry_overlaps_total", entry="slow") >= 1
            wait_until(lambda: "late" in entries_firing(prom, "CeleryPeriodicTaskExpiring"), 40,
                       "CeleryPeriodicTaskExpiring for late")
            for alert in ("CeleryPeriodicTaskNotSucceeding", "CeleryPeriodicTaskOverlapping",
                          "CeleryPeriodicTaskExpiring"):
                quiet = entries_firing(prom, alert) & {"every-1s", "echo-a", "echo-b", "aligned-3s"}
                assert not quiet, (alert, quiet)
            assert not firing(prom, "CeleryBeatDown") and not firing(prom, "CeleryPeriodicTaskMissed")
            # Every panel of the Periodic tasks dashboard has something to show, alert states included.
            wait_until(lambda: not empty_periodic_panels(prom), 20, "every Periodic tasks panel to have data")

            # The schedule changes at run time: a new entry appears, a removed one's series goes.
            flag.touch()

            def changed() -> bool:
                s = beat_exporter.scrape()
                return (has(s, "celery_beat_entry_last_dispatch_timestamp_seconds", entry="added")
                        and not any(has(s, m, entry="removed") for m in (
                            "celery_beat_entry_interval_seconds", "celery_beat_entry_next_due_timestamp_seconds",
                            "celery_beat_entry_last_dispatch_timestamp_seconds")))

            wait_until(changed, 20, "the added entry to appear and the removed one's series to go")
            assert value(beat_exporter.scrape(), "celery_beat_entry_interval_seconds", entry="added") == 1.0

            # On Redis the worker receives the expired runs once the long run ends, and counts them.
            wait_until(lambda: value(worker_exporter.scrape(), "celery_beat_entry_expired_total", entry="late") > 0,
                       40, "expired runs of late counted by the worker")

            # Beat and its workers, together, serve exactly the catalogue's beat section.
            text = beat_exporter.get("/metrics").text + worker_exporter.get("/metrics").text
            seen = {n: ls for n, ls in exposed(text).items() if n.startswith("celery_beat_")}
            assert seen == documented(BEAT)

            beat_proc.proc.send_signal(signal.SIGKILL)
            beat_proc.proc.wait()

        # Beat is dead: it is down, and its entries are missed.
        wait_until(lambda: firing(prom, "CeleryBeatDown"), 40, "CeleryBeatDown")
        wait_until(lambda: "every-1s" in entries_firing(prom, "CeleryPeriodicTaskMissed"), 40,
                   "CeleryPeriodicTaskMissed")

        # The worker pod is replaced: its sidecar, a fresh metrics directory, a new worker. Nothing beat
        # said changes.
        main_worker.proc.send_signal(signal.SIGTERM)
        main_worker.proc.wait(30)
        worker_sidecar.close()
        shutil.rmtree(worker_dir)
        worker_dir.mkdir()
        with (
            worker(worker_env, tmp, concurrency=1, queues="periodic", app="tests.beat_app"),
            exporter(tmp, *sidecar_args, port=worker_port) as worker_exporter,
        ):
            wait_until(lambda: not has(worker_exporter.scrape(), "celery_beat_entry_started_total", entry="every-1s"),
                       20, "the fresh worker directory to hold no beat run")
            wait_until(lambda: prom.query('up{job="celery-worker"} == 1'), 20, "Prometheus to scrape the new sidecar")
            time.sleep(5)  # several evaluations with the worker's series gone
            assert firing(prom, "CeleryBeatDown")
            missed = entries_firing(prom, "CeleryPeriodicTaskMissed")
            assert {"every-1s", "echo-a", "echo-b", "aligned-3s", "added"} <= missed, missed
            assert value(beat_exporter.scrape(), "celery_beat_up") == 0.0


@pytest.mark.serial  # alerts awaited within 40 s of a short-profile Prometheus: run at normal priority
def test_expiring_on_rabbitmq_where_the_broker_drops_expired_runs(tmp_path: Path, amqp_url: str) -> None:
    """On RabbitMQ `expires` is a message TTL: the broker drops the runs, no worker sees them,
    and the alert fires from dispatched runs that never started."""
    tmp = str(tmp_path)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = env_for(amqp_url, str(metrics_dir), CSX_TEST_BEAT_LATE="1")
    publish_blocker(env, 25)
    with (
        worker(env, tmp, concurrency=1, queues="late", app="tests.beat_app"),
        exporter(tmp, "--metrics-dir", str(metrics_dir), "--worker-timeout", "3") as ex,
        monitoring(tmp, {"celery-worker": f"127.0.0.1:{ex.port}"}, rules(), alerting=False) as mon,
        beat(env, tmp, *CHANGING),
    ):
        prom = mon.prom
        wait_until(lambda: "late" in entries_firing(prom, "CeleryPeriodicTaskExpiring"), 40,
                   "CeleryPeriodicTaskExpiring for late on RabbitMQ")
        s = ex.scrape()
        assert value(s, "celery_beat_entry_dispatched_total", entry="late") >= 5
        assert value(s, "celery_beat_entry_started_total", entry="late") == 0


def test_a_restarted_beat_drops_entries_it_no_longer_has(tmp_path: Path, redis_url: str) -> None:
    """A beat restarted on the same directory (a container restart) with an entry gone from its schedule:
    the old beat's frozen due time for it must not stay, or CeleryPeriodicTaskMissed would page forever."""
    tmp = str(tmp_path)
    metrics_dir = str(tmp_path / "metrics")

    def merged() -> dict[str, float]:
        return merged_samples(DirectoryCollector(metrics_dir, worker_timeout=3))

    def shows(entry: str) -> bool:
        return any(k.startswith("celery_beat_entry_next_due_timestamp_seconds{") and f'entry="{entry}"' in k
                   for k in merged())

    with beat(env_for(redis_url, metrics_dir, CSX_TEST_BEAT_EXTRA="1"), tmp, *CHANGING) as first:
        wait_until(lambda: shows("gone-later"), 20, "the first beat to write gone-later")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    with beat(env_for(redis_url, metrics_dir), tmp, *CHANGING):
        restarted = time.time()

        def dispatched_again() -> bool:
            s = merged()
            last = [v for k, v in s.items()
                    if k.startswith("celery_beat_entry_last_dispatch_timestamp_seconds{") and '"every-1s"' in k]
            return bool(last) and last[0] > restarted

        wait_until(dispatched_again, 20, "the restarted beat to dispatch")
        assert shows("every-1s") and not shows("gone-later")


def test_embedded_beat_in_a_worker(tmp_path: Path, redis_url: str) -> None:
    """`celery worker -B`: beat runs in a child of the worker and is watched the same."""
    tmp = str(tmp_path)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = env_for(redis_url, str(metrics_dir))
    schedule = os.path.join(tmp, "schedule")
    with worker(env, tmp, "-B", "-s", schedule, concurrency=3, queues="periodic", app="tests.beat_app"):
        wait_until(lambda: beat_up(str(metrics_dir)), 30, "the embedded beat's heartbeat")
        with exporter(tmp, "--metrics-dir", str(metrics_dir), "--worker-timeout", "3") as ex:
            def ran() -> Any:
                s = ex.scrape()
                return s if value(s, "celery_beat_entry_overlaps_total", entry="slow") >= 1 else None

            s = wait_until(ran, 30, "runs of every entry, an overlap of slow")
            assert value(s, "celery_beat_up") == 1.0
            assert value(s, "celery_beat_entry_interval_seconds", entry="aligned-3s") == 3.0
            now = time.time()
            for name in ("every-1s", "echo-a", "echo-b"):
                assert now - 4 < value(s, "celery_beat_entry_last_success_timestamp_seconds", entry=name) <= now
                assert value(s, "celery_beat_entry_dispatched_total", entry=name) >= 1
            assert not has(s, "celery_beat_entry_last_success_timestamp_seconds", entry="always-fails")
