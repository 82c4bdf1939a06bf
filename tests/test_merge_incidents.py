"""The merge's part in issue 17's targets, on real files written by real (forked, then dead) processes:

- `celery_task_revoked_total{reason="expired"}` is served at 0 beside each task's counters until a
  real expiry takes over, never twice, never going back, and only where a task counter exists;
- a worker's stopped mark (heartbeat 0, written at graceful shutdown) ends its `celery_worker_up`
  series, through compaction and against older or newer words of the same hostname.
"""

from __future__ import annotations

import time
from pathlib import Path

from celery_signal_exporter import catalogue as c
from celery_signal_exporter import compact as compaction
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.recorded import merged_samples
from tests.test_compaction import write_as_dead_process

EXPIRED = 'celery_task_revoked_total{name="%s",queue_name="%s",reason="expired"}'


def revoked(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.startswith("celery_task_revoked_total")}


def test_expired_is_served_at_zero_beside_task_counters_until_a_real_expiry(tmp_path: Path) -> None:
    d = str(tmp_path)
    collector = DirectoryCollector(d)
    assert revoked(merged_samples(collector)) == {}, "no task counter, no made-up series"
    write_as_dead_process(d, lambda s: m.Recorder(s, c.SENT).labels("a", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.RECEIVED).labels("b", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.STARTED).labels("b", "r").inc())
    # A revoke for another reason is no expiry: the 0 stays beside it.
    write_as_dead_process(d, lambda s: m.Recorder(s, c.REVOKED).labels("b", "q", "revoked").inc())
    # Other task metrics (failures, runtime) do not add a pair of their own.
    write_as_dead_process(d, lambda s: m.Recorder(s, c.FAILED).labels("c", "q", "ValueError").inc())
    first = revoked(merged_samples(collector))
    assert first == {
        EXPIRED % ("a", "q"): 0, EXPIRED % ("b", "q"): 0, EXPIRED % ("b", "r"): 0,
        'celery_task_revoked_total{name="b",queue_name="q",reason="revoked"}': 1,
    }
    write_as_dead_process(d, lambda s: m.Recorder(s, c.REVOKED).labels("a", "q", "expired").inc())
    second = revoked(merged_samples(collector))
    assert second[EXPIRED % ("a", "q")] == 1, "the real series takes over, once"
    assert set(second) == set(first)
    compaction.compact(d)
    assert revoked(merged_samples(collector)) == second, "compaction changes nothing"


def test_expired_zero_is_rendered_on_the_metrics_page(tmp_path: Path) -> None:
    from celery_signal_exporter.server.service import Exporter, ServiceConfig

    write_as_dead_process(str(tmp_path), lambda s: m.Recorder(s, c.RECEIVED).labels("a", "q").inc())
    body, _ = Exporter(ServiceConfig(metrics_dir=str(tmp_path))).render(None)
    text = body.decode()
    assert 'celery_task_revoked_total{name="a",queue_name="q",reason="expired"} 0.0\n' in text
    assert text.count("# TYPE celery_task_revoked") == 1, "one family, whoever made it"


def test_retries_exhausted_is_served_at_zero_beside_started_until_a_run_gives_up(tmp_path: Path) -> None:
    """A task's first exhausted retries must be an increase: 0 beside every started (name, queue)."""
    d = str(tmp_path)
    collector = DirectoryCollector(d)

    def exhausted() -> dict[str, float]:
        return {k: v for k, v in merged_samples(collector).items()
                if k.startswith("celery_task_retries_exhausted_total")}

    write_as_dead_process(d, lambda s: m.Recorder(s, c.SENT).labels("only-sent", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.STARTED).labels("a", "q").inc())
    write_as_dead_process(d, lambda s: m.Recorder(s, c.STARTED).labels("b", "q").inc())
    key = 'celery_task_retries_exhausted_total{name="%s",queue_name="q"}'
    assert exhausted() == {key % "a": 0, key % "b": 0}, "a started task only; a sent one has no runs"
    write_as_dead_process(d, lambda s: m.Recorder(s, c.RETRIES_EXHAUSTED).labels("a", "q").inc())
    assert exhausted() == {key % "a": 1, key % "b": 0}, "the real series takes over, once"
    compaction.compact(d)
    assert exhausted() == {key % "a": 1, key % "b": 0}, "compaction changes nothing"


def test_a_stopped_mark_ends_the_up_series_and_a_vanished_worker_reads_0(tmp_path: Path) -> None:
    d = str(tmp_path)
    now = time.time()

    def beat(host: str, value: float, stamp: float) -> None:
        write_as_dead_process(d, lambda s: (m.Recorder(s, c.HEARTBEAT).labels(host).set(value, stamp),
                                            m.Recorder(s, c.POOL_PROCESSES).labels(host).set(2)))

    beat("retired@h", now - 30, now - 30)  # its last beat, then its graceful stop
    beat("retired@h", 0.0, now - 29)
    beat("killed@h", now - 30, now - 30)  # SIGKILL: the last beat is all there is
    beat("back@h", 0.0, now - 60)  # stopped once, then came back and vanished
    beat("back@h", now - 30, now - 30)
    store = Store(d)
    m.Recorder(store, c.HEARTBEAT).labels("live@h").set(now, now)
    collector = DirectoryCollector(d, worker_timeout=10)
    for when in ("before compaction", "after compaction"):
        ours = {k: v for k, v in merged_samples(collector).items() if k.startswith("celery_worker_")}
        assert ours == {
            'celery_worker_up{hostname="killed@h"}': 0, 'celery_worker_up{hostname="back@h"}': 0,
            'celery_worker_up{hostname="live@h"}': 1,
        }, when
        compaction.compact(d)
    store.close()
