# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""RabbitMQ probe against a real RabbitMQ and its management API.

Management figures lag the broker by up to the stats interval (5 s by
default), so assertions poll until the exact expected value shows up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from celery import Celery
from kombu.connection import Connection
from kombu.messaging import Consumer, Queue

from celery_signal_exporter.probes import ProbeOptions, probe_for_url
from celery_signal_exporter.probes.base import BrokerSnapshot, OptionError, ProbeError
from celery_signal_exporter.probes.rabbitmq import RabbitMQProbe, RabbitMQSettings
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.probe_loop import ProbeLoop
from tests.harness import PYTHONPATH, Samples, exporter, has, rabbit_vhost, value, wait_until
from tests.rabbit_node import RabbitNode, rabbit_node

T = TypeVar("T")
STATS_LAG = 30.0  # seconds to wait for the management API to catch up
AGE = "celery_queue_oldest_message_age_seconds"


def eventually(read: Callable[[], T], check: Callable[[T], bool], what: str, limit: float = STATS_LAG) -> T:
    """Poll `read()` until `check` holds; fail with the last value seen."""
    deadline = time.monotonic() + limit
    value = read()
    while not check(value):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still {value!r} after {limit}s")
        time.sleep(0.5)
        value = read()
    return value


def rabbit_probe(url: str, timeout: float = 10, **settings: Any) -> RabbitMQProbe:
    p = probe_for_url(url, ProbeOptions(timeout=timeout, settings=(RabbitMQSettings(**settings),)))
    assert isinstance(p, RabbitMQProbe)
    return p


def by_queue(snap: BrokerSnapshot) -> dict[tuple[str, str], tuple[int, int | None, int | None]]:
    return {(q.vhost, q.name): (q.length, q.unacked, q.consumers) for q in snap.queues}


@pytest.fixture
def app(amqp_url: str) -> Iterator[Celery]:
    app = Celery("probe-rabbit-test", broker=amqp_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False
    yield app
    app.close()


def publish(app: Celery, queue: str, count: int) -> None:
    for _ in range(count):
        app.send_task("probe_test.noop", queue=queue)


def test_ready_unacked_and_consumers_per_queue(amqp_url: str, amqp_vhost: str, app: Celery) -> None:
    publish(app, "backlog", 7)
    publish(app, "held", 10)
    held = Queue("held", routing_key="held")
    twice = Queue("twice", routing_key="twice")
    received: list[Any] = []
    with Connection(amqp_url) as conn:
        # A consumer that holds 3 prefetched messages without acking them,
        # like a busy worker, and a queue with two consumers.
        channel = conn.channel()
        channel.basic_qos(0, 3, False)
        holder = Consumer(channel, [held], callbacks=[lambda body, msg: received.append(msg)])
        holder.consume()
        idle = [Consumer(conn.channel(), [twice]) for _ in range(2)]
        for consumer in idle:
            consumer.consume()
        deadline = time.monotonic() + 10
        while len(received) < 3 and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
        assert len(received) == 3

        p = rabbit_probe(amqp_url)
        expected = {
            (amqp_vhost, "backlog"): (7, 0, 0),
            (amqp_vhost, "held"): (7, 3, 1),
            (amqp_vhost, "twice"): (0, 0, 2),
        }
        eventually(lambda: by_queue(p.snapshot(set())), lambda got: got == expected, "queues")
        for consumer in [holder, *idle]:
            consumer.cancel()


def test_only_the_url_vhost_plus_extra_vhosts(amqp_base_url: str, amqp_url: str, amqp_vhost: str, app: Celery) -> None:
    publish(app, "mine", 2)
    with rabbit_vhost() as other:
        other_app = Celery("other", broker=f"{amqp_base_url}/{other}", set_as_current=False)
        publish(other_app, "theirs", 4)
        other_app.close()

        only_mine = rabbit_probe(amqp_url)
        eventually(
            lambda: by_queue(only_mine.snapshot(set())), lambda got: got == {(amqp_vhost, "mine"): (2, 0, 0)}, "vhost"
        )
        both = rabbit_probe(amqp_url, extra_vhosts=(other,))
        eventually(
            lambda: by_queue(both.snapshot(set())),
            lambda got: got == {(amqp_vhost, "mine"): (2, 0, 0), (other, "theirs"): (4, 0, 0)},
            "extra vhost",
        )


class CountingGets:
    """Counts the management API requests a probe makes."""

    def __init__(self, probe: RabbitMQProbe) -> None:
        self.paths: list[str] = []
        http = probe._client.http
        original = http.do_call

        def counting(path: str, method: str, *args: Any, **kwargs: Any) -> Any:
            self.paths.append(path)
            return original(path, method, *args, **kwargs)

        http.do_call = counting


def test_one_queue_request_per_page(amqp_url: str, amqp_vhost: str, app: Celery) -> None:
    names = [f"page-{i}" for i in range(5)]
    for name in names:
        publish(app, name, 1)
    expected = {(amqp_vhost, n): (1, 0, 0) for n in names}

    one_page = rabbit_probe(amqp_url)
    eventually(lambda: by_queue(one_page.snapshot(set())), lambda got: got == expected, "all pages")
    calls = CountingGets(one_page)
    one_page.snapshot(set())
    assert [p.split("/")[0] for p in calls.paths] == ["queues", "nodes"]

    paged = rabbit_probe(amqp_url, page_size=2)
    calls = CountingGets(paged)
    assert by_queue(paged.snapshot(set())) == expected
    assert [p.split("/")[0] for p in calls.paths] == ["queues", "queues", "queues", "nodes"]


def _rabbitmqctl(*args: str) -> str:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("rabbitmqctl is not installed; bash .ci/services.sh installs RabbitMQ", pytrace=False)
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}", pytrace=False)
    return done.stdout


def test_node_memory_matches_rabbitmqctl(amqp_url: str) -> None:
    status = json.loads(_rabbitmqctl("status", "--formatter", "json"))
    node_name = _rabbitmqctl("eval", "node().").strip().strip("'")
    snap = rabbit_probe(amqp_url).snapshot(set())
    nodes = {n.node: n for n in snap.nodes}
    assert node_name in nodes, f"{node_name} not in {sorted(nodes)}"
    node = nodes[node_name]
    assert node.memory_used_bytes > 0
    assert node.memory_limit_bytes == status["vm_memory_high_watermark_limit"]
    assert node.memory_alarm is ("memory" in json.dumps(status["alarms"]))
    assert node.disk_alarm is ("disk" in json.dumps(status["alarms"]))


def api_url(p: RabbitMQProbe) -> str:
    """The management API's base URL, as the HTTP client the probe calls it through has it."""
    return str(p._client.http.base_url)


def test_management_url_is_derived_and_overridable() -> None:
    p = rabbit_probe("amqp://u:p@rabbit.example:5672/prod")
    assert api_url(p) == "http://rabbit.example:15672/api/" and p.vhosts == ("prod",)
    p = rabbit_probe("amqps://u:p@rabbit.example:5671")
    assert api_url(p) == "https://rabbit.example:15671/api/" and p.vhosts == ("/",)
    p = rabbit_probe("amqp://rabbit.example:5672//", mgmt_host="mgmt.local", mgmt_port=8080, mgmt_https=True)
    assert api_url(p) == "https://mgmt.local:8080/api/" and p.vhosts == ("/",)
    p = rabbit_probe("pyamqp://[::1]:5672/%2F", extra_vhosts=("a", "/"))
    assert api_url(p) == "http://[::1]:15672/api/" and p.vhosts == ("/", "a")


def test_separate_management_credentials(amqp_url: str) -> None:
    host_and_vhost = amqp_url.split("@", 1)[1]
    no_creds = f"amqp://nobody:Wr0ng-P4ss@{host_and_vhost}"
    with pytest.raises(ProbeError) as err:
        rabbit_probe(no_creds).snapshot(set())
    assert err.value.reason == "auth"
    assert "Wr0ng-P4ss" not in str(err.value)
    ok = rabbit_probe(no_creds, mgmt_username="guest", mgmt_password="guest").snapshot(set())
    assert ok.nodes


def test_connection_refused_is_a_connection_error() -> None:
    p = rabbit_probe("amqp://guest:S3cret-x@127.0.0.1:5672//", mgmt_port=1, timeout=2)
    with pytest.raises(ProbeError) as err:
        p.snapshot(set())
    assert err.value.reason == "connection"
    assert "S3cret-x" not in str(err.value)


def put(amqp_url: str, queue: str, timestamp: int | None = None, queue_type: str = "classic") -> None:
    """One message straight through kombu (no Celery, so no publish signal can add or change a timestamp)."""
    arguments = {} if queue_type == "classic" else {"x-queue-type": queue_type}
    with Connection(amqp_url) as conn:
        Queue(queue, routing_key=queue, durable=True, queue_arguments=arguments)(conn.channel()).declare()
        properties = {} if timestamp is None else {"timestamp": timestamp}
        conn.Producer().publish(b"{}", routing_key=queue, **properties)


def declare_empty(amqp_url: str, queue: str) -> None:
    with Connection(amqp_url) as conn:
        Queue(queue, routing_key=queue, durable=True)(conn.channel()).declare()


def ages(snap: BrokerSnapshot) -> dict[str, float | None]:
    return {q.name: q.oldest_message_age_seconds for q in snap.queues}


HELD = 5.0  # seconds the timestamped message waits, unconsumed, before we look


def aged_queues(amqp_url: str) -> int:
    """The queues of the oldest-age tests; returns the timestamp (whole UNIX seconds) of the held head."""
    stamp = int(time.time())
    put(amqp_url, "aged", stamp)
    put(amqp_url, "aged", stamp + 3)  # a newer one behind it: the head is what counts
    put(amqp_url, "plain")  # no timestamp property
    declare_empty(amqp_url, "empty")
    # RabbitMQ 3.10 reports no head_message_timestamp for these two queue types.
    put(amqp_url, "quorum", stamp, queue_type="quorum")
    put(amqp_url, "stream", stamp, queue_type="stream")
    time.sleep(max(0.0, stamp + HELD - time.time()))
    return stamp


def test_oldest_age_from_the_head_timestamp(amqp_url: str) -> None:
    stamp = aged_queues(amqp_url)
    p = rabbit_probe(amqp_url)
    snap = eventually(lambda: p.snapshot(set()), lambda s: ages(s).get("aged") is not None, "aged head timestamp")
    after = time.time()
    age = ages(snap)["aged"]
    assert age is not None
    # Held 5 s; the stats interval (5 s) and the 1 s resolution widen the band.
    assert 4.0 <= age <= 12.0 and age <= after - stamp, (age, after - stamp)
    assert {q.name: q.length for q in snap.queues}["aged"] == 2
    # No timestamp on the head, nothing in the queue, quorum and stream: no age, never a 0.
    assert {n: a for n, a in ages(snap).items() if n != "aged"} == {
        "plain": None, "empty": None, "quorum": None, "stream": None}

    calls = CountingGets(p)
    p.snapshot(set())
    assert [c.split("/")[0] for c in calls.paths] == ["queues", "nodes"]  # no extra request for the ages

    off = rabbit_probe(amqp_url, read_oldest_age=False)
    assert set(ages(off.snapshot(set())).values()) == {None}


def test_head_age_reading() -> None:
    from celery_signal_exporter.probes.rabbitmq import MAX_FUTURE_SKEW, _head_age

    now = 1_800_000_000.0
    assert _head_age({"head_message_timestamp": 1_799_999_990}, now) == 10.0
    assert _head_age({"head_message_timestamp": now + 2}, now) == 0.0  # publisher clock slightly ahead
    for item in ({}, {"head_message_timestamp": None}, {"head_message_timestamp": ""},
                 {"head_message_timestamp": True}, {"head_message_timestamp": float("nan")},
                 {"head_message_timestamp": now * 1000},  # milliseconds, not the AMQP seconds
                 {"head_message_timestamp": now + MAX_FUTURE_SKEW + 1}):
        assert _head_age(item, now) is None, item


def test_oldest_age_through_the_exporter(amqp_url: str, amqp_vhost: str, tmp_path: Any) -> None:
    stamp = aged_queues(amqp_url)
    args = ["--broker-url", amqp_url, "--probe-interval", "1", "--probe-timeout", "1"]
    with exporter(str(tmp_path), *args) as ex:
        def aged() -> float | None:
            s = ex.scrape()
            return value(s, AGE, queue_name="aged", vhost=amqp_vhost) if has(s, AGE, queue_name="aged") else None

        age = wait_until(aged, STATS_LAG, "the aged queue's oldest-message age on /metrics")
        assert 4.0 <= age <= time.time() - stamp, age
        s = ex.scrape()
        assert [dict(k[1])["queue_name"] for k in s if k[0] == AGE] == ["aged"]
        assert value(s, "celery_queue_length", queue_name="plain", vhost=amqp_vhost) == 1.0

    # --no-oldest-age, through its environment variable, turns it off for RabbitMQ too.
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, CELERY_EXPORTER_OLDEST_AGE="false")
    with exporter(str(tmp_path), *args, env=env) as ex:
        def probed() -> Samples | None:
            s = ex.scrape()
            return s if has(s, "celery_queue_length", queue_name="aged", vhost=amqp_vhost) else None

        s = wait_until(probed, STATS_LAG, "the aged queue's length on /metrics")
        assert not [k for k in s if k[0] == AGE]


def test_a_due_header_alone_gives_no_age(amqp_url: str, app: Celery) -> None:
    """RabbitMQ reads the AMQP timestamp property, not the Redis probe's csx_due header."""
    with Connection(amqp_url) as conn:
        Queue("due", routing_key="due")(conn.channel()).declare()
        conn.Producer().publish(b"{}", routing_key="due", headers={"csx_due": time.time() - 100})
    p = rabbit_probe(amqp_url)
    snap = eventually(lambda: p.snapshot(set()), lambda s: bool(s.queues) and s.queues[0].length == 1, "due")
    assert snap.queues[0].oldest_message_age_seconds is None
    assert snap.unacked_total is None
    assert p.discover() == set()


# --- Resource alarms, watched live. Raised ONLY on a private node (tests/rabbit_node.py): an alarm on
# the shared broker at :5672 would block every other test's publishers.

MEM_RAISED = "celery_broker_memory_alarm_raised_checks_total"
DISK_RAISED = "celery_broker_disk_alarm_raised_checks_total"
CHECKS = "celery_broker_alarm_checks_total"


@pytest.fixture(scope="module")
def private_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with rabbit_node(str(tmp_path_factory.mktemp("rabbit"))) as node:
        yield node


def node_probe(node: RabbitNode, **settings: Any) -> RabbitMQProbe:
    host, port = node.management_url.removeprefix("http://").split(":")
    return rabbit_probe(node.amqp_url, mgmt_host=host, mgmt_port=int(port), **settings)


def test_alarms_are_read_live(private_node: RabbitNode) -> None:
    """The health check asks rabbit_alarm itself: the first read after `set_alarm` returns shows the
    alarm, and the first after `clear_alarm` shows none, without waiting for a statistics interval
    (/api/nodes's `mem_alarm` was still false 8 s after a set on 3.10.8)."""
    probe = node_probe(private_node)
    node = private_node.node
    assert probe.alarm_interval == 1.0
    assert probe.alarms().raised == set()
    private_node.set_alarm("memory")
    try:
        assert probe.alarms().raised == {(node, "memory")}
        private_node.set_alarm("disk")
        assert probe.alarms().raised == {(node, "memory"), (node, "disk")}
        private_node.clear_alarm("memory")
        assert probe.alarms().raised == {(node, "disk")}
    finally:
        private_node.clear_alarm("memory")
        private_node.clear_alarm("disk")
    assert probe.alarms().raised == set()


def test_a_flapping_alarm_is_counted_by_the_loop(private_node: RabbitNode) -> None:
    """Six bursts of 1 s, 1 s apart, checked every 0.1 s: every burst adds checks, so the counter
    reaches at least one per burst, while the disk counter and every check before the flap stay 0."""
    probe = node_probe(private_node, alarm_interval=0.1)
    loop = ProbeLoop(probe, private_node.amqp_url, ServeConfig(probe_interval=5, probe_timeout=4))
    node = private_node.node
    loop.start()
    try:
        quiet = eventually(lambda: samples_of(loop), lambda s: s.get((CHECKS, ()), 0) >= 5,
                           "five alarm checks of the private node")
        assert quiet[(MEM_RAISED, (("node", node),))] == 0
        assert quiet[(DISK_RAISED, (("node", node),))] == 0
        assert quiet[("celery_broker_memory_alarm", (("node", node),))] == 0
        bursts = 6
        private_node.flap_memory_alarm([1000] * bursts, [1000] * bursts)
        time.sleep(2 * bursts + 1)  # the flapper runs inside the node for 12 s from the eval's return
        after = samples_of(loop)
    finally:
        loop.stop()
        private_node.clear_alarm("memory")
    raised = after[(MEM_RAISED, (("node", node),))]
    checks = after[(CHECKS, ())] - quiet[(CHECKS, ())]
    print(f"flapping alarm: {raised:g} of {checks:g} checks found it raised ({bursts} bursts of 1 s)")
    assert bursts <= raised <= checks, (raised, checks)
    assert raised < after[(CHECKS, ())]  # the gaps were checked too, and found clear
    assert after[(DISK_RAISED, (("node", node),))] == 0


def samples_of(loop: ProbeLoop) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The loop's samples by name and labels, `broker` left out."""
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "broker"))): s.value
            for family in loop.collect() for s in family.samples}


def test_alarm_counters_through_the_exporter(private_node: RabbitNode, tmp_path: Any) -> None:
    """`--rabbitmq-alarm-interval` on the command line: a steady alarm adds about one check a second."""
    args = ["--broker-url", private_node.amqp_url, "--rabbitmq-management-url", private_node.management_url,
            "--probe-interval", "5", "--probe-timeout", "4", "--rabbitmq-alarm-interval", "0.2"]
    node = private_node.node
    with exporter(str(tmp_path), *args) as ex:
        s = eventually(ex.scrape, lambda s: value(s, CHECKS) >= 3, "three alarm checks")
        assert has(s, MEM_RAISED, node=node) and value(s, MEM_RAISED, node=node) == 0
        private_node.set_alarm("memory")
        try:
            s = eventually(ex.scrape, lambda s: value(s, MEM_RAISED, node=node) >= 5,
                           "five checks that found the memory alarm raised")
            assert value(s, "celery_broker_memory_alarm", node=node) == 1.0  # the live state, not /api/nodes's
            assert value(s, DISK_RAISED, node=node) == 0
        finally:
            private_node.clear_alarm("memory")


def test_alarm_check_failures_are_probe_errors(amqp_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """An unreachable or refusing alarm endpoint: a counted probe error by reason, no crash, no password.
    (Reading the shared broker's health check raises nothing on it.)"""
    host_and_vhost = amqp_url.split("@", 1)[1]
    refused = rabbit_probe("amqp://guest:S3cret-x@127.0.0.1:5672//", mgmt_port=1, timeout=2)
    wrong = rabbit_probe(f"amqp://nobody:Wr0ng-P4ss@{host_and_vhost}")
    for probe, reason, secret in ((refused, "connection", "S3cret-x"), (wrong, "auth", "Wr0ng-P4ss")):
        with pytest.raises(ProbeError) as err:
            probe.alarms()
        assert err.value.reason == reason and secret not in str(err.value)
        loop = ProbeLoop(probe, probe.url, ServeConfig(probe_interval=5, probe_timeout=4))
        with caplog.at_level("DEBUG", logger="celery_signal_exporter"):
            assert loop.check_alarms_once() is False
            assert loop.check_alarms_once() is False
        got = samples_of(loop)
        assert got[("celery_exporter_probe_errors_total", (("reason", reason),))] == 2
        assert got[(CHECKS, ())] == 0
        assert secret not in caplog.text
        caplog.clear()


def test_alarm_interval_option() -> None:
    assert RabbitMQSettings.from_options(_option_values(rabbitmq_alarm_interval=0.05)).alarm_interval == 0.05
    assert RabbitMQSettings.from_options(_option_values(rabbitmq_alarm_interval=None)).alarm_interval == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(OptionError, match="--rabbitmq-alarm-interval"):
            RabbitMQSettings.from_options(_option_values(rabbitmq_alarm_interval=bad))


def _option_values(**values: Any) -> dict[str, Any]:
    return {"rabbitmq_management_url": None, "rabbitmq_management_user": None,
            "rabbitmq_management_password": None, "rabbitmq_vhosts": (), "oldest_age": True, **values}
