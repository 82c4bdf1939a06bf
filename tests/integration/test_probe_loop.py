"""ProbeLoop against real brokers: metrics, bounds, outages, timeouts, secrets.

Outages use a private redis-server on a free port (the shared Redis and
RabbitMQ stay up for tests running alongside) and, for RabbitMQ, management
ports where nothing answers. The only timing assertions are generous
"within one interval" liveness checks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.connection import Connection
from kombu.messaging import Queue
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from celery_signal_exporter.probes import BrokerSnapshot, NodeStats, ProbeError, ProbeOptions, probe_for_url
from celery_signal_exporter.probes.base import Alarms
from celery_signal_exporter.probes.rabbitmq import RabbitMQProbe, RabbitMQSettings
from celery_signal_exporter.probes.redis import RedisProbe
from celery_signal_exporter.redact import redact_url, scrub, secrets_of
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.probe_loop import ProbeGroup, ProbeLoop
from celery_signal_exporter.server.serving import build_probes
from tests.harness import RedisServer

# -- helpers ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: a hung broker."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes handshakes; nobody ever reads
    yield int(listener.getsockname()[1])
    listener.close()


def samples(families: Iterable[Metric]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} for easy exact assertions."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in families:
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(families: Iterable[Metric], name: str, **labels: str) -> float | None:
    return samples(families).get(name, {}).get(tuple(sorted(labels.items())))


def wait_for(check: Callable[[], bool], limit: float, what: str) -> float:
    """Poll until `check()`; returns the seconds it took, fails after `limit`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            pytest.fail(f"{what} not seen within {limit:.1f}s")
        time.sleep(0.05)
    return time.monotonic() - start


def redis_loop(url: str, config: ServeConfig | None = None, **kwargs: Any) -> ProbeLoop:
    config = config or ServeConfig()
    return ProbeLoop(probe_for_url(url, ProbeOptions(timeout=config.probe_timeout)), url, config, **kwargs)


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("loop-test", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9]}
    yield app
    app.close()


# -- redaction ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp://127.0.0.1:5672//"),
        ("redis://:p@ss:w/rd%#?@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://user:pw@host:6380/1?ssl_cert_reqs=required", "rediss://host:6380/1"),
        ("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379/2", "sentinel://h1:26379;sentinel://h2:26379/2"),
        ("redis://:pa;ss@host/0", "redis://host/0"),
        ("redis://t0ken@host", "redis://host"),
        ("amqp://u:p%40ss@h/v", "amqp://h/v"),
        ("redis://host/0?password=hunter2", "redis://host/0"),
    ],
)
def test_redact_url(url: str, label: str) -> None:
    assert redact_url(url) == label
    for secret in secrets_of(url):
        assert secret not in label


def test_scrub_masks_every_spelling() -> None:
    url = "redis://:p%40ss/w0rd@10.0.0.1:6379/0"
    text = f"failed {url}; auth p@ss/w0rd; quoted p%40ss%2Fw0rd; raw p%40ss/w0rd"
    cleaned = scrub(text, url)
    assert "w0rd" not in cleaned and "p@ss" not in cleaned
    assert "redis://10.0.0.1:6379/0" in cleaned


def test_probe_for_url_by_scheme() -> None:
    for url in ("redis://h/0", "rediss://h:6380/1", "REDIS://h"):
        assert isinstance(probe_for_url(url), RedisProbe)
    for url in ("amqp://h//", "amqps://h/v", "pyamqp://h"):
        assert isinstance(probe_for_url(url), RabbitMQProbe)
    from celery_signal_exporter.probes.filesystem import FilesystemProbe
    from celery_signal_exporter.probes.sqs import SQSProbe

    assert isinstance(probe_for_url("sqs://AKIAKEY:S3cretKey@sqs.example"), SQSProbe)
    assert isinstance(probe_for_url("filesystem://"), FilesystemProbe)
    with pytest.raises(ValueError, match="no broker probe") as err:
        probe_for_url("mongodb://AKIAKEY:S3cretKey@db.example/q")
    message = str(err.value)
    assert "\n" not in message and "S3cretKey" not in message and "AKIAKEY" not in message


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="timeout"):
        ServeConfig(probe_interval=5, probe_timeout=10)


# -- metrics from a real broker ----------------------------------------------


def test_metrics_from_redis(redis_url: str, app: Celery) -> None:
    for priority in range(10):
        app.send_task("x.y", queue="a", priority=priority)
    app.send_task("x.y", queue="b")
    loop = redis_loop(redis_url, ServeConfig(queues=("d",)), known_queues=lambda: {"c"})
    assert loop.ready() == (False, f"broker {redis_url} not probed yet")
    assert loop.probe_once()
    assert loop.ready()[0]
    got = samples(list(loop.collect()))
    db = redis_url.rsplit("/", 1)[1]
    broker = (("broker", redis_url),)
    assert got["celery_queue_length"] == {
        (("queue_name", q), ("vhost", db)): n for q, n in {"a": 10, "b": 1, "c": 0, "d": 0}.items()
    }
    assert got["celery_broker_up"] == {broker: 1.0}
    assert got["celery_broker_unacked"] == {broker: 0.0}
    assert "celery_queue_unacked" not in got and "celery_queue_consumers" not in got  # Redis cannot tell
    ((labels, used),) = got["celery_broker_memory_used_bytes"].items()
    assert used > 0 and dict(labels)["node"] == redis_url.split("://", 1)[1].rsplit("/", 1)[0]
    assert abs(got["celery_exporter_probe_last_success_timestamp_seconds"][broker] - time.time()) < 60
    assert got["celery_exporter_probe_duration_seconds"][broker] >= 0
    assert got["celery_exporter_probe_errors_total"] == {
        (("broker", redis_url), ("reason", r)): 0.0 for r in ("connection", "timeout", "auth", "protocol", "other")
    }
    assert got["celery_exporter_probe_queues_dropped_total"] == {broker: 0.0}


def test_discovery_include_exclude_and_cap(redis_url: str, app: Celery) -> None:
    for i in range(6):
        app.send_task("x.y", queue=f"q{i}")  # kombu's bindings name them: discovered
    app.send_task("x.y", queue="other")
    options = ServeConfig(queues=("q4",), queue_include=(r"q\d",), queue_exclude=(r"q5",), max_queues=3)
    loop = redis_loop(redis_url, options, known_queues=lambda: {"host.celery.pidbox"})
    assert loop.probe_once()
    got = samples(list(loop.collect()))
    assert sorted(dict(k)["queue_name"] for k in got["celery_queue_length"]) == ["q0", "q1", "q4"]
    dropped = (("broker", redis_url),)
    assert got["celery_exporter_probe_queues_dropped_total"] == {dropped: 2.0}  # q2, q3
    assert loop.probe_once()
    assert samples(list(loop.collect()))["celery_exporter_probe_queues_dropped_total"] == {dropped: 4.0}


def test_default_exclude_drops_celery_plumbing(redis_url: str) -> None:
    plumbing = {"w1@host.celery.pidbox", "abc.reply.celery.pidbox", "celeryev.1234", "amq.gen-xyz"}
    loop = redis_loop(redis_url, known_queues=lambda: plumbing | {"tasks"})
    assert loop.probe_once()
    got = samples(list(loop.collect()))["celery_queue_length"]
    assert [dict(k)["queue_name"] for k in got] == ["tasks"]


def test_failing_known_queues_callback_does_not_stop_probing(redis_url: str) -> None:
    def broken() -> set[str]:
        raise RuntimeError("collector bug")

    loop = redis_loop(redis_url, ServeConfig(queues=("x",)), known_queues=broken)
    assert loop.probe_once()
    assert value(list(loop.collect()), "celery_broker_up", broker=redis_url) == 1.0


def test_rabbitmq_loop_and_exposition(amqp_url: str, amqp_vhost: str, redis_url: str) -> None:
    app = Celery("loop-rabbit", broker=amqp_url, set_as_current=False)
    for _ in range(3):
        app.send_task("x.y", queue="rq")
    app.close()
    # A head with the AMQP timestamp property, 100 s old: the oldest-message age reaches /metrics.
    stamp = int(time.time()) - 100
    with Connection(amqp_url) as conn:
        Queue("rq-aged", routing_key="rq-aged")(conn.channel()).declare()
        conn.Producer().publish(b"{}", routing_key="rq-aged", timestamp=stamp)
    rabbit = ProbeLoop(probe_for_url(amqp_url), amqp_url)
    label = redact_url(amqp_url)
    assert "guest" not in label

    def rabbit_length() -> float | None:
        rabbit.probe_once()
        return value(list(rabbit.collect()), "celery_queue_length", queue_name="rq", vhost=amqp_vhost)

    def aged() -> float | None:
        return value(list(rabbit.collect()), "celery_queue_oldest_message_age_seconds", queue_name="rq-aged",
                     vhost=amqp_vhost)

    wait_for(lambda: rabbit_length() == 3.0 and aged() is not None, 30, "rq length 3 and rq-aged's age")
    families = list(rabbit.collect())
    assert value(families, "celery_queue_unacked", queue_name="rq", vhost=amqp_vhost) == 0.0
    assert value(families, "celery_queue_consumers", queue_name="rq", vhost=amqp_vhost) == 0.0
    age = aged()
    assert age is not None and 100.0 <= age <= time.time() - stamp
    node_alarms = samples(families)["celery_broker_memory_alarm"]
    assert node_alarms and all(dict(k)["broker"] == label for k in node_alarms)

    redis = redis_loop(redis_url, ServeConfig(queues=("rq",)))
    assert redis.probe_once()

    group = ProbeGroup([rabbit, redis])
    assert group.ready() == (True, "2 broker(s) probed")
    registry = CollectorRegistry()
    registry.register(group)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert text.count("# TYPE celery_queue_length gauge") == 1
    assert f'celery_broker_up{{broker="{label}"}} 1.0' in text
    assert f'celery_broker_up{{broker="{redis_url}"}} 1.0' in text
    assert "celery_exporter_probe_errors_total{" in text
    assert "guest" not in text


# -- outages -------------------------------------------------------------------


def test_redis_outage_flips_up_and_recovers(private_redis: RedisServer) -> None:
    interval = 1.0
    url = f"{private_redis.url}/0"
    loop = redis_loop(url, ServeConfig(probe_interval=interval, probe_timeout=0.5, queues=("q",)))
    slowest_collect = 0.0

    def up() -> float | None:
        nonlocal slowest_collect
        start = time.monotonic()
        families = list(loop.collect())
        slowest_collect = max(slowest_collect, time.monotonic() - start)
        return value(families, "celery_broker_up", broker=url)

    loop.start()
    try:
        wait_for(lambda: up() == 1.0, 10, "broker up at start")
        private_redis.kill()
        # Down on the next cycle; the limit is generous because this machine is shared.
        wait_for(lambda: up() == 0.0, 10 * interval, "broker_up 0 after the kill")
        assert loop.ready()[0]  # stays ready: the outage is a metric, not a dead exporter
        families = list(loop.collect())
        assert "celery_queue_length" not in samples(families)  # no stale depths while down
        assert (
            value(families, "celery_exporter_probe_errors_total", broker=url, reason="connection") or 0
        ) >= 1
        private_redis.start()  # same port
        wait_for(lambda: up() == 1.0, 3 * interval + 5, "broker_up 1 after the restart")
        assert value(list(loop.collect()), "celery_queue_length", queue_name="q", vhost="0") == 0.0
    finally:
        loop.stop()
    assert slowest_collect < interval  # collect() never waited for the broker


def test_unreachable_broker_before_first_success() -> None:
    url = "redis://:n0t-the-secret@127.0.0.1:1/0"
    loop = redis_loop(url, ServeConfig(probe_interval=1, probe_timeout=1))
    assert not loop.probe_once()
    ready, reason = loop.ready()
    assert not ready
    assert reason == "broker redis://127.0.0.1:1/0 not reachable: ConnectionError"
    got = samples(list(loop.collect()))
    assert got["celery_broker_up"] == {(("broker", "redis://127.0.0.1:1/0"),): 0.0}
    assert "celery_exporter_probe_last_success_timestamp_seconds" not in got


def test_rabbitmq_management_down_counts_connection_errors() -> None:
    url = "amqp://guest:guest@127.0.0.1:5672//"
    options = ProbeOptions(timeout=2, settings=(RabbitMQSettings(mgmt_port=free_port()),))
    loop = ProbeLoop(probe_for_url(url, options), url, ServeConfig(probe_interval=2, probe_timeout=2))
    assert not loop.probe_once()
    families = list(loop.collect())
    assert value(families, "celery_broker_up", broker="amqp://127.0.0.1:5672//") == 0.0
    assert (
        value(families, "celery_exporter_probe_errors_total", broker="amqp://127.0.0.1:5672//", reason="connection")
        == 1
    )
    assert loop.ready() == (False, "broker amqp://127.0.0.1:5672// not reachable: NetworkError")


def probe_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("probe amqp"))


def test_hung_management_api_times_out_without_piling_up_threads(silent_port: int) -> None:
    url = "amqp://guest:guest@127.0.0.1:5672//"
    # The HTTP call would wait 30 s; the loop gives up on it after 0.3 s.
    probe = probe_for_url(url, ProbeOptions(timeout=30, settings=(RabbitMQSettings(mgmt_port=silent_port),)))
    loop = ProbeLoop(probe, url, ServeConfig(probe_interval=0.4, probe_timeout=0.3))
    before = probe_threads()
    loop.start()
    try:

        def timeouts() -> float:
            got = value(
                list(loop.collect()), "celery_exporter_probe_errors_total", broker=redact_url(url), reason="timeout"
            )
            return got or 0.0

        wait_for(lambda: timeouts() >= 4, 10, "four timed-out cycles")
        assert probe_threads() - before <= 1  # one stuck call, never more
        assert value(list(loop.collect()), "celery_broker_up", broker=redact_url(url)) == 0.0
        assert loop.ready()[1].endswith("not reachable: timeout")
    finally:
        loop.stop()


def test_hung_redis_times_out_in_the_probe(silent_port: int) -> None:
    url = f"redis://127.0.0.1:{silent_port}/0"
    loop = ProbeLoop(probe_for_url(url, ProbeOptions(timeout=0.3)), url,
                     ServeConfig(probe_interval=2, probe_timeout=2))
    assert not loop.probe_once()
    assert value(list(loop.collect()), "celery_exporter_probe_errors_total", broker=url, reason="timeout") == 1.0


# -- secrets ---------------------------------------------------------------------


def test_password_never_reaches_logs_errors_or_metrics(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="the-real-one")
    server.start()
    secret = "S3cr@t:p/ss%#?"
    url = f"redis://admin:{secret}@127.0.0.1:{server.port}/0"
    caplog.set_level(logging.DEBUG)
    try:
        loop = redis_loop(url, ServeConfig(queues=("q",)))
        assert not loop.probe_once()
        assert not loop.probe_once()
        families = list(loop.collect())
        text = "\n".join(
            [caplog.text, *(r.getMessage() for r in caplog.records), str(loop.ready()), repr(samples(families))]
        )
        assert value(families, "celery_exporter_probe_errors_total", broker=redact_url(url), reason="auth") == 2.0
        for spelling in secrets_of(url) | {secret, "S3cr@t", "p/ss"}:
            assert spelling not in text
        assert redact_url(url) == f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.kill()


def test_build_probes_and_group(redis_url: str, amqp_url: str) -> None:
    seen = {"from-instrumentation"}
    (group,) = build_probes(ServeConfig(broker_urls=(redis_url, amqp_url), probe_interval=4, probe_timeout=2))
    loops = group.loops
    assert [type(loop.probe) for loop in loops] == [RedisProbe, RabbitMQProbe]
    assert [loop.config.probe_timeout for loop in loops] == [2, 2]
    group.known_queues = lambda: seen
    assert group.ready()[0] is False
    group.start()
    try:
        wait_for(lambda: group.ready()[0], 10, "both brokers probed")
        db = redis_url.rsplit("/", 1)[1]
        wait_for(
            lambda: value(group.collect(), "celery_queue_length", queue_name="from-instrumentation", vhost=db) == 0,
            10,
            "the instrumentation's queue probed",
        )
        ups = samples(group.collect())["celery_broker_up"]
        assert sorted(dict(k)["broker"] for k in ups) == sorted(redact_url(u) for u in (redis_url, amqp_url))
    finally:
        group.stop()
    with pytest.raises(ValueError, match="no broker probe"):
        build_probes(ServeConfig(broker_urls=("kafka://h",)))


def test_discovery_runs_every_n_cycles_not_every_probe(redis_url: str, app: Celery) -> None:
    app.send_task("x.y", queue="found")
    probe = probe_for_url(redis_url)
    calls: list[str] = []
    discover, snapshot = probe.discover, probe.snapshot

    def counted_discover() -> set[str]:
        calls.append("discover")
        return discover()

    def counted_snapshot(queues: set[str]) -> BrokerSnapshot:
        calls.append("snapshot")
        return snapshot(queues)

    probe.discover = counted_discover  # type: ignore[method-assign]
    probe.snapshot = counted_snapshot  # type: ignore[method-assign]
    loop = ProbeLoop(probe, redis_url, discover_every=3)
    for _ in range(6):
        assert loop.probe_once()
    assert calls.count("snapshot") == 6 and calls.count("discover") == 2
    assert (
        value(list(loop.collect()), "celery_queue_length", queue_name="found", vhost=redis_url.rsplit("/", 1)[1]) == 1
    )


# -- alarm watch ---------------------------------------------------------------------

MEM_RAISED = "celery_broker_memory_alarm_raised_checks_total"
DISK_RAISED = "celery_broker_disk_alarm_raised_checks_total"
CHECKS = "celery_broker_alarm_checks_total"


class ScriptedAlarms:
    """A probe whose alarm checks answer from a script (then clear), with one RabbitMQ-like node in its
    snapshots: the loop's counting, state and error handling, without raising a real broker's alarm."""

    def __init__(self, script: list[Alarms | Exception], alarm_interval: float = 0.05) -> None:
        self.script = list(script)
        self.alarm_interval = alarm_interval
        self.calls = 0

    def discover(self) -> set[str]:
        return set()

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        return BrokerSnapshot(nodes=[NodeStats("rabbit@a", 1.0, 2.0, memory_alarm=False, disk_alarm=False)])

    def alarms(self) -> Alarms:
        self.calls += 1
        answer = self.script.pop(0) if self.script else Alarms(nodes=frozenset({"rabbit@a"}))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        pass


def alarm_values(loop: ProbeLoop, node: str = "rabbit@a") -> tuple[float | None, ...]:
    families = list(loop.collect())
    b = loop.broker
    return (value(families, CHECKS, broker=b), value(families, MEM_RAISED, broker=b, node=node),
            value(families, DISK_RAISED, broker=b, node=node),
            value(families, "celery_broker_memory_alarm", broker=b, node=node),
            value(families, "celery_broker_disk_alarm", broker=b, node=node))


def test_alarm_checks_are_counted_per_node_and_resource(caplog: pytest.LogCaptureFixture) -> None:
    a, b = "rabbit@a", "rabbit@b"
    nodes = frozenset({a, b})
    script: list[Alarms | Exception] = [
        Alarms(nodes=nodes),
        Alarms(raised=frozenset({(a, "memory")}), nodes=nodes),
        Alarms(raised=frozenset({(a, "memory"), (b, "disk")}), nodes=nodes),
        ProbeError("auth", "HTTPError", "401 for amqp://guest:S3cret-x@h"),
        RuntimeError("a probe bug"),
        Alarms(raised=frozenset({(a, "disk"), (a, "cpu")}), nodes=nodes),  # an unknown resource is ignored
    ]
    probe = ScriptedAlarms(script)
    url = "amqp://guest:S3cret-x@rabbit.example:5672//"
    loop = ProbeLoop(probe, url, ServeConfig(probe_interval=30, probe_timeout=1))
    assert loop.probe_once()
    # Before any check: the snapshot's node has its counters at 0, and the snapshot's alarm state.
    assert alarm_values(loop) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert loop.check_alarms_once()
    assert alarm_values(loop, b) == (1.0, 0.0, 0.0, 0.0, 0.0)  # b, unknown to the snapshot, named by the check
    assert loop.check_alarms_once()
    assert alarm_values(loop) == (2.0, 1.0, 0.0, 1.0, 0.0)  # the live state wins over the snapshot's
    assert loop.check_alarms_once()
    assert alarm_values(loop) == (3.0, 2.0, 0.0, 1.0, 0.0)
    assert alarm_values(loop, b) == (3.0, 0.0, 1.0, 0.0, 1.0)
    with caplog.at_level(logging.DEBUG, logger="celery_signal_exporter"):
        assert not loop.check_alarms_once()
        assert not loop.check_alarms_once()
    families = list(loop.collect())
    assert value(families, "celery_exporter_probe_errors_total", broker=loop.broker, reason="auth") == 1.0
    assert value(families, "celery_exporter_probe_errors_total", broker=loop.broker, reason="other") == 1.0
    assert value(families, "celery_broker_up", broker=loop.broker) == 1.0  # the snapshots say so, not the watch
    assert alarm_values(loop) == (3.0, 2.0, 0.0, 0.0, 0.0)  # no live answer: the snapshot's state again
    assert "S3cret-x" not in caplog.text and "alarm check failed (auth)" in caplog.text
    assert loop.check_alarms_once()
    assert alarm_values(loop) == (4.0, 2.0, 1.0, 0.0, 1.0)
    assert "cpu" not in repr(samples(list(loop.collect())))


def test_alarm_watch_runs_on_its_own_cadence() -> None:
    """Snapshots every 30 s, alarm checks every 0.05 s: the checks go on between two snapshots."""
    probe = ScriptedAlarms([Alarms(raised=frozenset({("rabbit@a", "memory")}), nodes=frozenset({"rabbit@a"}))] * 3)
    loop = ProbeLoop(probe, "amqp://rabbit.example:5672//", ServeConfig(probe_interval=30, probe_timeout=1))
    loop.start()
    try:
        wait_for(lambda: (alarm_values(loop)[0] or 0) >= 10, 20, "ten alarm checks within one probe interval")
    finally:
        loop.stop()
    assert alarm_values(loop)[1] == 3.0
    assert not any(t.name.startswith("alarm watch") and t.is_alive() for t in threading.enumerate())


def test_a_probe_without_a_watch_counts_its_snapshots_as_checks() -> None:
    """A probe that reports alarms in its snapshots only: each snapshot is one check."""
    raised = [True, False, True]

    class SnapshotAlarms:
        def discover(self) -> set[str]:
            return set()

        def snapshot(self, queues: set[str]) -> BrokerSnapshot:
            return BrokerSnapshot(nodes=[NodeStats("n", 1.0, 2.0, memory_alarm=raised.pop(0), disk_alarm=False)])

        def close(self) -> None:
            pass

    loop = ProbeLoop(SnapshotAlarms(), "amqp://rabbit.example:5672//",
                     ServeConfig(probe_interval=30, probe_timeout=1))
    for _ in range(3):
        assert loop.probe_once()
    assert alarm_values(loop, "n") == (3.0, 2.0, 0.0, 1.0, 0.0)


def test_redis_has_no_alarm_series(redis_url: str) -> None:
    loop = redis_loop(redis_url)
    assert loop.probe_once()
    got = samples(list(loop.collect()))
    assert {CHECKS, MEM_RAISED, DISK_RAISED, "celery_broker_memory_alarm"}.isdisjoint(got)


def test_rabbitmq_alarm_check_on_the_shared_broker(amqp_url: str) -> None:
    """Only read: the shared node has no alarm, so its counters are there, at 0, after a check."""
    loop = ProbeLoop(probe_for_url(amqp_url), amqp_url)
    assert loop.probe_once()
    assert loop.check_alarms_once()
    families = list(loop.collect())
    (node,) = {dict(k)["node"] for k in samples(families)[MEM_RAISED]}
    assert alarm_values(loop, node) == (1.0, 0.0, 0.0, 0.0, 0.0)
