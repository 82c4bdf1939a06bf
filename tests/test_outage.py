"""A broker outage, end to end, through the real exporter process's /metrics.

Each test starts `celery-signal-exporter serve` as a real process, waits for
`celery_broker_up 1`, takes the broker down for real, and checks over HTTP
that the outage shows as `celery_broker_up 0` plus counted probe errors while
every /metrics request keeps answering 200 quickly (the probe never runs
inside a scrape) and /readyz keeps answering; then it brings the broker back
and waits for `celery_broker_up 1` again.

Redis: a private redis-server on a free port is killed and restarted on the
same port (the shared Redis on 6379 is never touched). RabbitMQ: the shared
node is stopped with `rabbitmqctl stop_app` and always started again with
`start_app`, and the test waits for its management API before it ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ROOT, ExporterProcess, Samples, exporter, parse, value, wait_until
from tests.test_probe_loop import RedisServer

#: Seconds between probes (and the probe timeout) given to the exporter.
INTERVAL = 1.0
#: Generous bound on one /metrics request: it only reads cached probe
#: results, so even on a busy shared machine it must stay far below this.
SCRAPE_BOUND = 2.0
#: Scrapes taken while the broker is down, besides those of the wait loops.
OUTAGE_SCRAPES = 6

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
RABBIT_LABEL = "amqp://127.0.0.1:5672//"
RABBIT_OVERVIEW = "http://127.0.0.1:15672/api/overview"


class Scraper:
    """Scrapes /metrics, failing on anything but a quick 200, and keeps timings."""

    def __init__(self, ex: ExporterProcess) -> None:
        self.ex = ex
        self.timings: list[float] = []
        self.last_body = ""

    def scrape(self) -> Samples:
        start = time.monotonic()
        try:
            response = self.ex.get("/metrics")
        except httpx.HTTPError as exc:
            pytest.fail(f"/metrics did not answer ({type(exc).__name__}: {exc})\n{self.ex.log()[-3000:]}")
        elapsed = time.monotonic() - start
        self.timings.append(elapsed)
        if response.status_code != 200:
            pytest.fail(f"/metrics answered {response.status_code}: {response.text[:2000]}")
        if elapsed >= SCRAPE_BOUND:
            pytest.fail(f"/metrics took {elapsed:.2f}s (bound {SCRAPE_BOUND}s): a scrape waited for the broker")
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


def exporter_env() -> dict[str, str]:
    """This environment without anything that would reconfigure the exporter."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CELERY_EXPORTER_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = ROOT
    return env


@pytest.fixture
def metrics_dir(tmp_path: Path) -> str:
    path = tmp_path / "metrics"
    path.mkdir()
    return str(path)


def serve_args(broker_url: str, metrics_dir: str) -> tuple[str, ...]:
    return (
        "--metrics-dir",
        metrics_dir,
        "--broker-url",
        broker_url,
        "--probe-interval",
        str(INTERVAL),
        "--probe-timeout",
        str(INTERVAL),
        "--log-level",
        "debug",
    )


def assert_outage_seen(scraper: Scraper, broker: str, errors_before: float) -> None:
    """While the broker is down: up reads 0 soon, scrapes stay quick 200s,
    probe errors count up and /readyz still answers."""
    wait_until(lambda: scraper.up(broker) == 0.0, 10 * INTERVAL, f"celery_broker_up 0 for {broker}")
    for _ in range(OUTAGE_SCRAPES):
        assert scraper.up(broker) == 0.0, f"celery_broker_up flapped back to 1 for {broker} while it is down"
        time.sleep(INTERVAL / 2)
    errors = scraper.errors(broker)
    assert errors > errors_before, f"probe errors for {broker} did not increase ({errors_before} -> {errors})"
    readyz = scraper.ex.get("/readyz")
    # Ready stays true: the broker was probed once, and the outage is a metric.
    assert readyz.status_code == 200, f"/readyz answered {readyz.status_code}: {readyz.text}"


# -- Redis ---------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()  # fails loudly when redis-server is missing
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_redis_outage_through_metrics(tmp_path: Path, metrics_dir: str, private_redis: RedisServer) -> None:
    broker = private_redis.url  # no credentials: the label is the URL
    with exporter(str(tmp_path), *serve_args(private_redis.url, metrics_dir), env=exporter_env()) as ex:
        scraper = Scraper(ex)
        wait_until(lambda: scraper.up(broker) == 1.0, 20, "celery_broker_up 1 before the outage")
        errors_before = scraper.errors(broker)
        assert value(scraper.scrape(), "celery_exporter_probe_errors_total", broker=broker, reason="connection") == 0

        private_redis.kill()
        killed = time.monotonic()
        scraper.timings.clear()
        assert_outage_seen(scraper, broker, errors_before)
        down_for = time.monotonic() - killed
        connection_errors = value(
            scraper.scrape(), "celery_exporter_probe_errors_total", broker=broker, reason="connection"
        )
        assert connection_errors >= 1, f"no connection errors counted after {down_for:.1f}s of outage"
        outage_timings = list(scraper.timings)

        private_redis.start()  # same port
        wait_until(lambda: scraper.up(broker) == 1.0, 10 * INTERVAL + 5, "celery_broker_up 1 after the restart")
        assert ex.get("/readyz").status_code == 200

    assert len(outage_timings) >= OUTAGE_SCRAPES
    assert max(outage_timings) < SCRAPE_BOUND


# -- RabbitMQ ------------------------------------------------------------------


def rabbitmqctl(binary: str, *args: str, timeout: float = 120) -> None:
    try:
        out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rabbitmqctl {' '.join(args)} did not finish within {timeout:.0f}s", pytrace=False)
    if out.returncode != 0:
        pytest.fail(
            f"rabbitmqctl {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}",
            pytrace=False,
        )


def management_answers() -> bool:
    try:
        return httpx.get(RABBIT_OVERVIEW, auth=("guest", "guest"), timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_rabbitmq_outage_through_metrics(tmp_path: Path, metrics_dir: str, amqp_base_url: str) -> None:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("rabbitmqctl is not installed; bash .ci/services.sh installs RabbitMQ", pytrace=False)
    if not management_answers():
        pytest.fail(f"the RabbitMQ management API does not answer at {RABBIT_OVERVIEW}", pytrace=False)
    broker = RABBIT_LABEL
    bodies: list[str] = []
    with exporter(str(tmp_path), *serve_args(RABBIT_URL, metrics_dir), env=exporter_env()) as ex:
        scraper = Scraper(ex)
        wait_until(lambda: scraper.up(broker) == 1.0, 30, "celery_broker_up 1 before the outage")
        bodies.append(scraper.last_body)
        errors_before = scraper.errors(broker)

        stopped = time.monotonic()
        try:
            rabbitmqctl(binary, "stop_app")
            stop_took = time.monotonic() - stopped
            scraper.timings.clear()
            assert_outage_seen(scraper, broker, errors_before)
            bodies.append(scraper.last_body)
            outage_timings = list(scraper.timings)
        finally:
            restarting = time.monotonic()
            rabbitmqctl(binary, "start_app", timeout=180)
            rabbitmqctl(binary, "await_startup", timeout=180)
            wait_until(management_answers, 120, "the RabbitMQ management API after start_app")
            back_took = time.monotonic() - restarting

        wait_until(lambda: scraper.up(broker) == 1.0, 30, "celery_broker_up 1 after start_app")
        bodies.append(scraper.last_body)
        assert ex.get("/readyz").status_code == 200
        log = ex.log()

    print(f"rabbitmq: stop_app {stop_took:.1f}s, start_app until the API answered {back_took:.1f}s")
    assert len(outage_timings) >= OUTAGE_SCRAPES
    assert max(outage_timings) < SCRAPE_BOUND
    assert f"broker {broker} probe failed" in log, f"the outage was not logged:\n{log[-3000:]}"
    for text, what in [*((b, "/metrics") for b in bodies), (log, "the exporter's log")]:
        for secret in ("guest:guest", ":guest@", "guest@"):
            assert secret not in text, f"{secret!r} leaked into {what}"
    assert "guest" not in "".join(bodies), "the RabbitMQ user or password leaked into /metrics"
