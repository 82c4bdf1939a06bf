"""Label values from outside input stay bounded, and received counts deliveries.

A 100 KB task, queue or exception name is cut to 200 characters; a producer
inventing routing keys folds queue names past `max_queue_names`; messages a
worker prefetched and gave back at a warm shutdown are received again and
counted as redelivered.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from celery_signal_exporter.labels import MAX_LABEL_LENGTH, OVERFLOW, cut
from tests.harness import ExporterProcess, Samples, env_for, exporter, produce, value, wait_until, worker

# As in tests/workload_app.py, which is not imported here: importing it instruments this process.
LONG_NAMES = ["t.long_" + "x" * 100_000 + end for end in ("a", "b")]
LONG_QUEUE = "q" * 100_000
#: instrument()'s default max_queue_names.
QUEUE_CAP = 100


def scrape_when(ex: ExporterProcess, ready: Callable[[Samples], bool], timeout: float, what: str) -> Samples:
    """The first scrape for which `ready` holds."""
    found: list[Samples] = []

    def check() -> bool:
        found[:] = [ex.scrape()]
        return ready(found[0])

    wait_until(check, timeout, what)
    return found[0]


def label_values(s: Samples, metric: str, label: str) -> dict[str, float]:
    """label value -> summed value, over the samples of `metric`."""
    found: dict[str, float] = {}
    for (name, labels), v in s.items():
        if name == metric:
            key = dict(labels)[label]
            found[key] = found.get(key, 0.0) + v
    return found


def test_100kb_names_are_cut_to_200_characters(redis_url: str, tmp_path: Any) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    with worker(env, str(tmp_path), concurrency=1), exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "long_labels")
        s = scrape_when(ex, lambda r: value(r, "celery_task_succeeded_total") == 2
                        and value(r, "celery_task_failed_total") == 1, 60, "the long-named tasks to finish")
        text = ex.get("/metrics").text
    short = [cut(name) for name in LONG_NAMES]
    # The two names differ only in their last character: the hash keeps them apart.
    assert short[0] != short[1]
    assert [len(n) for n in short] == [MAX_LABEL_LENGTH] * 2
    # Producer, worker main and pool process cut each name alike, so their series meet.
    for name in short:
        for metric in ("celery_task_sent_total", "celery_task_received_total", "celery_task_started_total",
                       "celery_task_succeeded_total", "celery_task_runtime_seconds_count"):
            assert value(s, metric, name=name, queue_name="alpha") == 1, metric
    names = set(label_values(s, "celery_task_sent_total", "name"))
    assert max(len(n) for n in names) == MAX_LABEL_LENGTH
    assert names == {*short, "t.raise_long", "t.ok"}
    assert value(s, "celery_task_failed_total", name="t.raise_long", exception=cut("E" * 100_000)) == 1
    assert value(s, "celery_task_sent_total", name="t.ok", queue_name=cut(LONG_QUEUE)) == 1
    # Each process counts a cut once per value: two names in the producer, the worker main and the child.
    assert value(s, "celery_exporter_label_values_truncated_total", label="name") == 3 * 2
    assert value(s, "celery_exporter_label_values_truncated_total", label="queue_name") == 1
    assert value(s, "celery_exporter_label_values_truncated_total", label="exception") == 1
    # Uncut, one 100 KB name made every scrape 4.8 MiB and each child's histogram file 4 MiB.
    assert len(text) < 100_000, len(text)
    sizes = {f: os.path.getsize(os.path.join(metrics_dir, f)) for f in os.listdir(metrics_dir)}
    assert max(sizes.values()) <= 256 * 1024, sizes


def test_invented_routing_keys_fold_into_overflow(tmp_path: Any) -> None:
    """One task published to 5 000 routing keys: the producer keeps 100 queue names and folds the rest."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for("memory://", metrics_dir)  # kombu's in-process transport: the producer side only
    produce(env, "routing_keys", 5_000)
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        text = ex.get("/metrics").text
        s = ex.scrape()
    sent = label_values(s, "celery_task_sent_total", "queue_name")
    assert len(sent) == QUEUE_CAP + 1
    assert sent[OVERFLOW] == 5_000 - QUEUE_CAP
    assert all(v == 1 for q, v in sent.items() if q != OVERFLOW)
    assert sum(sent.values()) == 5_000, "every publish is counted"
    assert value(s, "celery_exporter_dropped_label_values_total", label="queue_name") == 5_000 - QUEUE_CAP
    assert value(s, "celery_exporter_dropped_label_values_total", label="name") == 0
    # Bounded by the cap: 101 queue labels x (sent + a publish histogram of 9 buckets) is about 105 kB;
    # the 5 000 routing keys unfolded would be about 5 MB.
    assert len(text) < 200_000, len(text)


def test_worker_folds_queue_names_past_the_cap(redis_url: str, tmp_path: Any) -> None:
    """A worker consuming 130 queues labels 100 of them; the pool process carries the folded label too."""
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir)
    n = QUEUE_CAP + 30
    queues = ",".join(f"cap.{i}" for i in range(n))
    with worker(env, str(tmp_path), concurrency=2, queues=queues), \
            exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "to_queues", n)
        s = scrape_when(ex, lambda r: value(r, "celery_task_succeeded_total") == n, 90, f"{n} tasks to succeed")
    for metric in ("celery_task_sent_total", "celery_task_received_total", "celery_task_succeeded_total"):
        by_queue = label_values(s, metric, "queue_name")
        assert len(by_queue) == QUEUE_CAP + 1, metric
        assert by_queue[OVERFLOW] == n - QUEUE_CAP, metric
        assert sum(by_queue.values()) == n, metric
    # 30 folds in the producer and 30 in the worker main; the child takes the main's label as it is.
    assert value(s, "celery_exporter_dropped_label_values_total", label="queue_name") == 2 * (n - QUEUE_CAP)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_restored_prefetched_messages_count_as_redelivered(
    broker: str, request: pytest.FixtureRequest, tmp_path: Any,
) -> None:
    """-c 1 with a prefetch of 10: a warm shutdown gives back what was prefetched, the next worker gets it again."""
    url = request.getfixturevalue("redis_url" if broker == "redis" else "amqp_url")
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(url, metrics_dir)
    tasks = 8
    prefetch = ("--prefetch-multiplier", "10")
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        with worker(env, str(tmp_path), *prefetch, concurrency=1):
            produce(env, "sleepers", tasks, 1)
            scrape_when(ex, lambda r: value(r, "celery_task_received_total") == tasks
                        and value(r, "celery_task_started_total") >= 1, 60, "every task prefetched, one started")
        # The worker finished what it had started (warm shutdown) and gave the rest back.
        first = ex.scrape()
        finished = value(first, "celery_task_succeeded_total")
        assert 1 <= finished < tasks
        assert value(first, "celery_task_redelivered_total") == 0
        with worker(env, str(tmp_path), *prefetch, concurrency=1):
            s = scrape_when(ex, lambda r: value(r, "celery_task_succeeded_total") == tasks, 90,
                            "the given-back tasks to run on the next worker")
    restored = tasks - finished
    assert value(s, "celery_task_received_total") == tasks + restored
    assert value(s, "celery_task_redelivered_total", name="t.sleep", queue_name="alpha") == restored
    assert value(s, "celery_task_received_total") - value(s, "celery_task_redelivered_total") == tasks
    assert value(s, "celery_task_started_total") == tasks, "each task ran once"
