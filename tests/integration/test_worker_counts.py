"""A known workload through a real prefork worker on real brokers: every count exact."""

from __future__ import annotations

import pytest

from tests.harness import Samples, env_for, exporter, has, produce, value, wait_until, worker


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url"))


def test_known_workload_counts_exactly(broker_url: str, tmp_path: pytest.TempPathFactory) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(broker_url, metrics_dir)
    # Celery turns `expires` into an AMQP message TTL (0 for a time already past), so RabbitMQ drops
    # expired messages itself when no consumer is ready for them; Redis hands them over. They are sent
    # before the worker starts: on RabbitMQ a ready consumer would take some of them, as many as the
    # machine's speed decides.
    produce(env, "expired")
    expired = 4 if broker_url.startswith("redis") else 0
    with worker(env, str(tmp_path), concurrency=2) as w, exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "counts")

        def settled() -> Samples | None:
            s = ex.scrape()
            done = value(s, "celery_task_succeeded_total") + value(s, "celery_task_failed_total")
            return s if done >= 30 + 10 + 5 and value(s, "celery_task_revoked_total") >= 3 + expired \
                and value(s, "celery_task_rejected_total") >= 1 else None

        s = wait_until(settled, 90, "the workload to finish")
        log = w.log()

    def v(metric: str, /, **labels: str) -> float:
        return value(s, metric, **labels)

    # Published: every apply_async, including the retries the worker republished.
    assert v("celery_task_sent_total", name="t.ok", queue_name="alpha") == 20 + 4 + 3
    assert v("celery_task_sent_total", name="t.ok", queue_name="beta") == 10
    assert v("celery_task_sent_total", name="t.fail", queue_name="alpha") == 10
    assert v("celery_task_sent_total", name="t.retry_twice", queue_name="beta") == 5 * 3
    assert v("celery_task_sent_total", name="t.no_such_task", queue_name="alpha") == 1
    # Received: expired and pre-revoked messages are discarded before Celery's task_received.
    assert v("celery_task_received_total", name="t.ok", queue_name="alpha") == 20
    assert v("celery_task_received_total", name="t.ok", queue_name="beta") == 10
    assert v("celery_task_received_total", name="t.fail", queue_name="alpha") == 10
    assert v("celery_task_received_total", name="t.retry_twice", queue_name="beta") == 15
    assert v("celery_task_started_total", name="t.ok") == 30
    assert v("celery_task_started_total", name="t.retry_twice", queue_name="beta") == 15
    assert v("celery_task_succeeded_total", name="t.ok", queue_name="alpha") == 20
    assert v("celery_task_succeeded_total", name="t.ok", queue_name="beta") == 10
    assert v("celery_task_succeeded_total", name="t.retry_twice", queue_name="beta") == 5
    assert v("celery_task_failed_total", name="t.fail", queue_name="alpha", exception="ValueError") == 6
    assert v("celery_task_failed_total", name="t.fail", queue_name="alpha", exception="KeyError") == 4
    assert v("celery_task_failed_total") == 10
    assert v("celery_task_retried_total", name="t.retry_twice", queue_name="beta") == 10
    assert v("celery_task_revoked_total", name="t.ok", queue_name="alpha", reason="expired") == expired
    assert v("celery_task_revoked_total", name="t.ok", queue_name="alpha", reason="revoked") == 3
    assert v("celery_task_revoked_total") == 3 + expired
    assert v("celery_task_rejected_total", queue_name="alpha") == 1
    # Histograms count every execution that finished, and only those.
    completed = 30 + 10 + 15
    assert v("celery_task_runtime_seconds_count") == completed
    assert v("celery_task_queue_wait_seconds_count") == completed
    assert v("celery_task_runtime_seconds_bucket", le="+Inf") == completed
    assert v("celery_task_in_progress") == 0
    assert has(s, "celery_task_last_success_timestamp_seconds", name="t.retry_twice")
    assert v("celery_worker_up", hostname=w.hostname) == 1
    assert v("celery_worker_pool_processes", hostname=w.hostname) == 2
    assert v("celery_worker_tasks_active", hostname=w.hostname) == 0
    assert v("celery_exporter_handler_errors_total") == 0, log
    assert v("celery_exporter_metrics_files", state="unreadable") == 0


def test_queue_wait_excludes_countdown_and_includes_hold_back(broker_url: str,
                                                              tmp_path: pytest.TempPathFactory) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(broker_url, metrics_dir)
    with worker(env, str(tmp_path), concurrency=1) as _, exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        produce(env, "hold_back")
        s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total", name="t.waiter") == 3
                       and r, 60, "the held-back waiters")
        # Held behind a 2 s task on a single process: every waiter waited over 1.5 s.
        assert value(s, "celery_task_queue_wait_seconds_count", name="t.waiter") == 3
        assert value(s, "celery_task_queue_wait_seconds_bucket", name="t.waiter", le="1.5") == 0
        assert value(s, "celery_task_queue_wait_seconds_sum", name="t.waiter") >= 3 * 1.5
        # The blocker's own runtime lands between 1.5 and 3 seconds.
        assert value(s, "celery_task_runtime_seconds_bucket", name="t.sleep", le="1.5") == 0
        assert value(s, "celery_task_runtime_seconds_bucket", name="t.sleep", le="3") == 1

        produce(env, "countdown")
        s = wait_until(lambda: (r := ex.scrape()) and value(r, "celery_task_succeeded_total", name="t.later") == 1
                       and r, 30, "the countdown task")
        # Due 3 s after publish: the countdown is not queue wait.
        assert value(s, "celery_task_queue_wait_seconds_bucket", name="t.later", le="1") == 1
