"""A directory no Celery worker tends (a web pod whose processes publish and
recycle) is compacted by the exporter itself, with no count lost."""

from __future__ import annotations

import os
from pathlib import Path

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from tests.harness import exporter, value, wait_until, write_as_dead_process


def publish_and_die(directory: str, n: int) -> None:
    def body(store: Store) -> None:
        m.Recorder(store, c.SENT).labels("proj.send_mail", "mail").inc(n)

    write_as_dead_process(directory, body)


def test_serve_compacts_dead_publishers_files(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for i in range(40):
        publish_and_die(str(metrics), i + 1)
    assert len(os.listdir(metrics)) == 40
    with exporter(str(tmp_path), "--metrics-dir", str(metrics), "--compact-interval", "0.5") as ex:
        wait_until(lambda: sorted(os.listdir(metrics)) == [".compact.lock", "counter_archive.db"], 30,
                   "the exporter to fold the 40 dead publishers' files into the archive")
        s = ex.scrape()
        assert value(s, "celery_task_sent_total", name="proj.send_mail", queue_name="mail") == sum(range(1, 41))
        assert value(s, "celery_exporter_metrics_files", state="unreadable") == 0
        publish_and_die(str(metrics), 1000)  # and after: the archive keeps growing, nothing doubles
        wait_until(lambda: sorted(os.listdir(metrics)) == [".compact.lock", "counter_archive.db"], 30,
                   "the newcomer to be compacted too")
        s = ex.scrape()
        assert value(s, "celery_task_sent_total", name="proj.send_mail", queue_name="mail") == 820 + 1000


def test_compact_interval_zero_leaves_files_alone(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for _ in range(3):
        publish_and_die(str(metrics), 1)
    with exporter(str(tmp_path), "--metrics-dir", str(metrics), "--compact-interval", "0") as ex:
        assert value(ex.scrape(), "celery_task_sent_total", name="proj.send_mail") == 3
        assert value(ex.scrape(), "celery_exporter_metrics_files", state="read") == 3
    assert len([f for f in os.listdir(metrics) if f.endswith(".db")]) == 3
