"""Broker outages end to end: real worker, real producers, real `serve`.

Each test runs a prefork worker and the exporter against a broker of its
own, publishes a known batch, takes the broker down for real in the middle
of the run, and checks over HTTP that:

- every /metrics request keeps answering 200 (within the client's 5 s
  timeout: the probe never runs inside a scrape), /readyz keeps answering,
  `celery_broker_up` reads 0 and probe errors keep counting up;
- the worker process survives, and a producer publishing during the outage
  fails with the broker's own error only, and is not counted as sent;
- everything recovers by itself when the broker returns: `celery_broker_up`
  is 1 again, the same worker picks up a second batch, and every signal-side
  count is exact over both batches.

The shared Redis and RabbitMQ are never touched, since other test runs use
them. Redis: a private `redis-server` on a free port is SIGKILLed and started
again on the same port (empty, as after a crash). RabbitMQ: a private node
(own node name, AMQP, distribution and management ports, data and logs under
the test's tmp directory, its own Erlang cookie) is stopped with
`rabbitmqctl stop_app` and started with `start_app`; it takes about 4 s to
boot and 6 s to stop and restart on the development VM.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    ROOT,
    ExporterProcess,
    RedisServer,
    Samples,
    env_for,
    exporter,
    parse,
    produce,
    value,
    wait_until,
    worker,
)
from tests.rabbit_node import RabbitNode, rabbit_node

#: Seconds between probes (and the probe timeout) given to the exporter.
INTERVAL = 1.0
#: The client's timeout for one /metrics request: "answers quickly" means
#: it answered within this, however loaded the shared machine is.
CLIENT_TIMEOUT = 5.0
#: Scrapes taken while the broker is down, besides those of the wait loops.
OUTAGE_SCRAPES = 4
BEFORE, AFTER = 20, 15


class Scraper:
    """Scrapes /metrics, failing on anything but a 200 within the client timeout."""

    def __init__(self, ex: ExporterProcess) -> None:
        self.ex = ex
        self.count = 0
        self.last_body = ""

    def scrape(self) -> Samples:
        try:
            response = httpx.get(self.ex.url + "/metrics", timeout=CLIENT_TIMEOUT)
        except httpx.HTTPError as exc:
            pytest.fail(f"/metrics did not answer within {CLIENT_TIMEOUT}s ({type(exc).__name__}: {exc})\n"
                        f"{self.ex.log()[-3000:]}")
        if response.status_code != 200:
            pytest.fail(f"/metrics answered {response.status_code}: {response.text[:2000]}")
        self.count += 1
        self.last_body = response.text
        return parse(response.text)

    def up(self, broker: str) -> float:
        samples = self.scrape()
        if not any(n == "celery_broker_up" and ("broker", broker) in ls for n, ls in samples):
            pytest.fail(f"no celery_broker_up for {broker} in /metrics:\n{self.last_body[:3000]}")
        return value(samples, "celery_broker_up", broker=broker)

    def errors(self, broker: str) -> float:
        """Probe errors for `broker`, summed over every reason."""
        return value(self.scrape(), "celery_exporter_probe_errors_total", broker=broker)


@pytest.fixture
def metrics_dir(tmp_path: Path) -> str:
    path = tmp_path / "metrics"
    path.mkdir()
    return str(path)


def serve_args(broker_url: str, metrics_dir: str, *extra: str) -> tuple[str, ...]:
    return ("--metrics-dir", metrics_dir, "--broker-url", broker_url, "--probe-interval", str(INTERVAL),
            "--probe-timeout", str(INTERVAL), "--log-level", "debug", *extra)


def succeeded(scraper: Scraper, n: int) -> Samples | None:
    s = scraper.scrape()
    return s if value(s, "celery_task_succeeded_total", name="t.ok") >= n else None


def publish_during_outage(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A producer run while the broker is down: Celery's own publish retries
    give up and it exits with kombu's OperationalError."""
    return subprocess.run([sys.executable, "-m", "tests.workload_app", "many", "5"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def run_outage(tmp: str, metrics_dir: str, broker_url: str, label: str, serve_extra: tuple[str, ...],
               down: Callable[[], None], back: Callable[[], None]) -> str:
    """The whole scenario on one broker; returns the exporter's log."""
    env = env_for(broker_url, metrics_dir)
    with worker(env, tmp, concurrency=2) as w, \
            exporter(tmp, *serve_args(broker_url, metrics_dir, *serve_extra)) as ex:
        scraper = Scraper(ex)
        wait_until(lambda: scraper.up(label) == 1.0, 30, f"celery_broker_up 1 for {label} before the outage")
        produce(env, "many", BEFORE)
        wait_until(lambda: succeeded(scraper, BEFORE), 60, f"the first {BEFORE} tasks")
        errors_before = scraper.errors(label)

        down()
        wait_until(lambda: scraper.up(label) == 0.0, 10 * INTERVAL, f"celery_broker_up 0 for {label}")
        seen = [scraper.errors(label)]
        for _ in range(OUTAGE_SCRAPES):
            time.sleep(INTERVAL)
            assert scraper.up(label) == 0.0, f"celery_broker_up went back to 1 for {label} while it is down"
            seen.append(scraper.errors(label))
        assert seen[0] > errors_before and seen[-1] > seen[0], f"probe errors did not keep counting up: {seen}"
        readyz = httpx.get(ex.url + "/readyz", timeout=CLIENT_TIMEOUT)
        # Ready stays true: the broker was probed once, and the outage is a metric.
        assert readyz.status_code == 200, f"/readyz answered {readyz.status_code}: {readyz.text}"
        failed = publish_during_outage(env)
        assert failed.returncode != 0, "a producer published with the broker down"
        assert "OperationalError" in failed.stderr, failed.stderr[-3000:]
        assert w.proc.poll() is None, f"the worker died during the outage:\n{w.log()[-3000:]}"

        back()
        wait_until(lambda: scraper.up(label) == 1.0, 10 * INTERVAL + 5, f"celery_broker_up 1 for {label} again")
        produce(env, "many", AFTER)
        s = wait_until(lambda: succeeded(scraper, BEFORE + AFTER), 90, f"the {AFTER} tasks after the outage")
        time.sleep(1.5)  # a later, unexpected count would show in the next scrape
        s = scraper.scrape()
        assert w.proc.poll() is None, "the worker exited"
        worker_log = w.log()
        hostname = w.hostname
        assert scraper.count >= OUTAGE_SCRAPES + 4

    def v(metric: str, /, **labels: str) -> float:
        return value(s, metric, **labels)

    total = BEFORE + AFTER
    # Exact: the producer that failed during the outage published nothing and counted nothing.
    assert v("celery_task_sent_total", name="t.ok", queue_name="alpha") == total
    assert v("celery_task_sent_total") == total
    assert v("celery_task_received_total", name="t.ok", queue_name="alpha") == total
    assert v("celery_task_started_total", name="t.ok", queue_name="alpha") == total
    assert v("celery_task_succeeded_total", name="t.ok", queue_name="alpha") == total
    assert v("celery_task_failed_total") == 0
    assert v("celery_task_runtime_seconds_count", name="t.ok") == total
    assert v("celery_task_queue_wait_seconds_count", name="t.ok") == total
    assert v("celery_task_in_progress") == 0
    assert v("celery_worker_up", hostname=hostname) == 1, "the same worker is not up after the outage"
    assert v("celery_exporter_handler_errors_total") == 0, worker_log[-3000:]
    assert "csx" not in worker_log.lower() and "exporter/" not in worker_log, \
        f"the instrumentation shows up in the worker's log:\n{worker_log[-3000:]}"
    return ex.log()


def assert_logged_once(log: str, label: str, reason: str) -> None:
    """The outage is one WARNING line; the repeats are at DEBUG."""
    warnings = [line for line in log.splitlines() if " WARNING " in line and f"broker {label} probe failed" in line]
    assert len(warnings) == 1, f"expected one WARNING for the outage, got {len(warnings)}:\n" + "\n".join(warnings)
    assert f"probe failed ({reason})" in warnings[0], warnings[0]
    assert f"broker {label} up:" in log, "the recovery was not logged"


# -- Redis ---------------------------------------------------------------------


def test_redis_outage_mid_run(tmp_path: Path, metrics_dir: str) -> None:
    with RedisServer(tmp_path) as redis:  # fails loudly when redis-server is missing
        url = f"{redis.url}/0"
        log = run_outage(str(tmp_path), metrics_dir, url, url, (), redis.kill, redis.start)
    assert_logged_once(log, url, "connection")


# -- RabbitMQ ------------------------------------------------------------------


@pytest.fixture
def private_rabbitmq(tmp_path: Path) -> Iterator[RabbitNode]:
    with rabbit_node(str(tmp_path)) as node:
        yield node


def test_rabbitmq_outage_mid_run(tmp_path: Path, metrics_dir: str, private_rabbitmq: RabbitNode) -> None:
    node = private_rabbitmq
    log = run_outage(str(tmp_path), metrics_dir, node.amqp_url, node.label,
                     ("--rabbitmq-management-url", node.management_url), node.stop_app, node.start_app)
    assert_logged_once(log, node.label, "connection")
    for secret in ("guest:guest", ":guest@", "guest@"):
        assert secret not in log, f"{secret!r} leaked into the exporter's log"
