# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""Redis probe against a real Redis: every count is exact, never mocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.connection import Connection

from celery_signal_exporter.probes import ProbeOptions, probe_for_url
from celery_signal_exporter.probes.base import ProbeError
from celery_signal_exporter.probes.redis import DUE_HEADER, RedisProbe, RedisSettings, due_time
from tests.harness import RedisServer, free_port, redis_server_binary

MakeApp = Callable[..., Celery]


@pytest.fixture
def make_app(redis_url: str) -> Iterator[MakeApp]:
    """A Celery app on the test db with given transport options and no worker."""
    apps: list[Celery] = []

    def make(**transport_options: Any) -> Celery:
        app = Celery("probe-test", broker=redis_url, set_as_current=False)
        app.conf.broker_transport_options = transport_options
        app.conf.broker_connection_retry_on_startup = False

        @app.task(name="probe_test.noop", shared=False)
        def noop() -> None:
            return None

        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def publish(app: Celery, queue: str, priority: int | None = None, **kwargs: Any) -> None:
    app.tasks["probe_test.noop"].apply_async(queue=queue, priority=priority, **kwargs)


def probe(redis_url: str, **transport_options: Any) -> RedisProbe:
    p = probe_for_url(redis_url, ProbeOptions(timeout=5, transport_options=transport_options))
    assert isinstance(p, RedisProbe)
    return p


def length(p: RedisProbe, queue: str) -> int:
    (stats,) = [q for q in p.snapshot({queue}).queues if q.name == queue]
    return stats.length


@pytest.mark.parametrize(
    "steps",
    [[0, 3, 6, 9], list(range(10)), [0, 5], [2, 7]],
    ids=["default-steps", "ten-steps", "two-steps", "no-zero-step"],
)
def test_depth_sums_every_priority_sub_queue(redis_url: str, make_app: MakeApp, steps: list[int]) -> None:
    app = make_app(priority_steps=steps)
    expected = 0
    for priority in range(10):
        for _ in range(priority + 1):  # a different count per priority catches a missed list
            publish(app, "work", priority)
            expected += 1
    client = redis.Redis.from_url(redis_url)
    lists = [k for k in client.keys("work*") if client.type(k) == b"list"]
    assert len(lists) > 1, "messages should be spread over several priority lists"

    p = probe(redis_url, priority_steps=steps)
    assert expected == 55
    assert length(p, "work") == 55
    # A probe that ignored the app's steps would miss lists: the options matter.
    if steps != [0, 3, 6, 9]:
        assert length(probe(redis_url), "work") != 55
    p.close()


def test_custom_separator(redis_url: str, make_app: MakeApp) -> None:
    app = make_app(priority_steps=[0, 3, 6, 9], sep=":")
    for priority in range(10):
        publish(app, "sep-q", priority)
    assert redis.Redis.from_url(redis_url).exists("sep-q:9")
    assert length(probe(redis_url, sep=":"), "sep-q") == 10
    assert length(probe(redis_url), "sep-q") < 10


def test_global_keyprefix(redis_url: str, make_app: MakeApp) -> None:
    options = {"global_keyprefix": "csx-test:", "priority_steps": [0, 3, 6, 9]}
    app = make_app(**options)
    for priority in range(10):
        publish(app, "prefixed", priority)
        publish(app, "prefixed", priority)
    client = redis.Redis.from_url(redis_url)
    assert client.exists("csx-test:prefixed") and not client.exists("prefixed")

    p = probe(redis_url, **options)
    assert length(p, "prefixed") == 20
    assert "prefixed" in p.discover()
    assert length(probe(redis_url), "prefixed") == 0  # without the prefix nothing is found


def test_empty_and_deleted_queues_report_zero(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    for priority in (0, 9):
        publish(app, "drained", priority)
    client = redis.Redis.from_url(redis_url)
    p = probe(redis_url)
    assert length(p, "drained") == 2
    with Connection(redis_url) as conn:
        queue = conn.SimpleQueue("drained")
        for _ in range(2):
            queue.get(timeout=5).ack()
        queue.close()
    assert not [k for k in client.keys("drained*") if client.type(k) == b"list"], "Redis deletes empty lists"
    snap = p.snapshot({"drained", "never-existed"})
    assert {q.name: q.length for q in snap.queues} == {"drained": 0, "never-existed": 0}
    assert all(q.oldest_message_age_seconds is None for q in snap.queues)


def test_key_of_another_type_is_not_a_queue(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("not-a-list", "x")
    client.hset("not-a-list\x06\x163", "a", "b")
    snap = probe(redis_url).snapshot({"not-a-list"})
    assert [q.length for q in snap.queues] == [0]


def test_unacked_total_from_kombu_hash(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    for _ in range(5):
        publish(app, "held")
    with Connection(redis_url) as conn:
        queue = conn.SimpleQueue("held")
        taken = [queue.get(timeout=5) for _ in range(2)]  # received, not acked
        snap = probe(redis_url).snapshot({"held"})
        assert snap.unacked_total == 2
        assert [q.length for q in snap.queues] == [3]
        for message in taken:
            message.ack()
        queue.close()
    assert probe(redis_url).snapshot(set()).unacked_total == 0


def test_unacked_honours_prefix_and_key(redis_url: str, make_app: MakeApp) -> None:
    options = {"global_keyprefix": "pfx:", "unacked_key": "my_unacked"}
    app = make_app(**options)
    publish(app, "held")
    with Connection(redis_url, transport_options=options) as conn:
        queue = conn.SimpleQueue("held")
        message = queue.get(timeout=5)
        assert redis.Redis.from_url(redis_url).hlen("pfx:my_unacked") == 1
        assert probe(redis_url, **options).snapshot(set()).unacked_total == 1
        message.ack()
        queue.close()


def test_memory_used_and_maxmemory(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    original = str(client.config_get("maxmemory")["maxmemory"])
    # Far above what the shared test Redis uses, so nobody else is affected.
    limit = 7 * 1024**3 + 12345
    client.config_set("maxmemory", limit)
    try:
        (node,) = probe(redis_url).snapshot(set()).nodes
        assert node.memory_limit_bytes == limit
        assert node.memory_used_bytes > 0
        assert node.node == redis_url.split("://", 1)[1].rsplit("/", 1)[0]  # host:port
    finally:
        client.config_set("maxmemory", original)
    client.config_set("maxmemory", 0)
    try:
        (node,) = probe(redis_url).snapshot(set()).nodes
        assert node.memory_limit_bytes == 0  # 0 = no limit
    finally:
        client.config_set("maxmemory", original)


def test_celery_puts_the_due_header_in_protocol2_headers(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    publish(app, "hdr", headers={DUE_HEADER: 1234.5})
    raw = redis.Redis.from_url(redis_url).lindex("hdr", -1)
    assert isinstance(raw, bytes)
    assert json.loads(raw)["headers"][DUE_HEADER] == 1234.5
    assert due_time(raw) == 1234.5


def test_oldest_age_is_read_from_the_consuming_end(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    t_old = time.time()
    publish(app, "aged", 9, headers={DUE_HEADER: t_old})  # step 9 list
    time.sleep(0.5)
    publish(app, "aged", 0, headers={DUE_HEADER: time.time()})  # step 0 list, newer
    publish(app, "aged", 0, headers={DUE_HEADER: time.time()})  # newer still, at the far end
    time.sleep(1.0)
    before = time.time()
    (stats,) = probe(redis_url).snapshot({"aged"}).queues
    after = time.time()
    assert stats.length == 3
    age = stats.oldest_message_age_seconds
    assert age is not None
    # The oldest over all priority lists, measured between the two clocks.
    assert before - t_old <= age <= after - t_old


def test_oldest_age_band_after_known_wait(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    due = time.time()
    publish(app, "wait", headers={DUE_HEADER: due})
    time.sleep(2.0)
    (stats,) = probe(redis_url).snapshot({"wait"}).queues
    after = time.time()
    assert stats.oldest_message_age_seconds is not None
    # At least the known wait, at most the time until the probe returned: no fixed slack to outrun.
    assert 2.0 <= stats.oldest_message_age_seconds <= after - due


def test_no_age_without_header_future_due_is_zero(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    publish(app, "plain")
    publish(app, "future", headers={DUE_HEADER: time.time() + 3600})
    snap = {q.name: q for q in probe(redis_url).snapshot({"plain", "future"}).queues}
    assert snap["plain"].oldest_message_age_seconds is None
    assert snap["future"].oldest_message_age_seconds == 0.0


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe\x00binary",
        b"not json",
        b"[1, 2, 3]",
        b'{"headers": "nope"}',
        b'{"headers": {"csx_due": "yesterday"}}',
        b'{"headers": {"csx_due": true}}',
        b'{"headers": {"csx_due": NaN}}',
        b'{"headers": {"csx_due": Infinity}}',
        b'{"headers": {"csx_due": 0x10}}',
        b'{"headers": {"csx_due": [1]}}',
        b'{"headers": {"csx_due": 1.5',
        b"",
    ],
)
def test_foreign_messages_do_not_break_the_probe(redis_url: str, payload: bytes) -> None:
    client = redis.Redis.from_url(redis_url)
    client.lpush("foreign", payload)
    client.lpush("foreign\x06\x163", b'{"headers": {"csx_due": 1.0}}')
    client.lpush("foreign\x06\x166", b"\x80\x81")
    (stats,) = probe(redis_url).snapshot({"foreign"}).queues
    assert stats.length == 3
    assert stats.oldest_message_age_seconds is not None and stats.oldest_message_age_seconds > 1e9
    client.delete("foreign\x06\x163")
    (stats,) = probe(redis_url).snapshot({"foreign"}).queues
    assert stats.length == 2 and stats.oldest_message_age_seconds is None


def test_age_reading_can_be_turned_off(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    publish(app, "q", headers={DUE_HEADER: time.time()})
    p = probe_for_url(redis_url, ProbeOptions(settings=(RedisSettings(read_oldest_age=False),)))
    (stats,) = p.snapshot({"q"}).queues
    assert stats.length == 1 and stats.oldest_message_age_seconds is None


def test_discovery_reads_kombu_bindings(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    publish(app, "alpha")
    publish(app, "beta")
    p = probe(redis_url)
    assert {"alpha", "beta"} <= p.discover()
    # A queue someone declared but never published to is discovered too.
    with Connection(redis_url) as conn:
        conn.SimpleQueue("declared-only").close()
    assert "declared-only" in p.discover()


def test_vhost_label_is_the_db_index(redis_url: str) -> None:
    p = probe(redis_url)
    db = redis_url.rsplit("/", 1)[1]
    assert p.vhost == db
    assert [q.vhost for q in p.snapshot({"x"}).queues] == [db]
    assert probe_for_url("redis://127.0.0.1:6379").vhost == "0"  # type: ignore[attr-defined]
    assert probe_for_url("redis://127.0.0.1:6379/").vhost == "0"  # type: ignore[attr-defined]


class RoundTrips:
    """Counts packets of commands sent (one per pipeline) on every connection."""

    def __init__(self) -> None:
        self.sends = 0
        self._orig = redis.connection.AbstractConnection.send_packed_command

    def __enter__(self) -> RoundTrips:
        counter = self

        def counting(conn: Any, command: Any, check_health: bool = True) -> None:
            counter.sends += 1
            counter._orig(conn, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        redis.connection.AbstractConnection.send_packed_command = self._orig  # type: ignore[method-assign]


def test_snapshot_is_one_round_trip(redis_url: str, make_app: MakeApp) -> None:
    app = make_app()
    names = {f"rt-{i}" for i in range(50)}
    for name in sorted(names)[:5]:
        publish(app, name, 5, headers={DUE_HEADER: time.time()})
    p = probe(redis_url)
    p.snapshot(names)  # connect (handshake commands) outside the count
    with RoundTrips() as trips:
        snap = p.snapshot(names)
    assert trips.sends == 1
    assert sum(q.length for q in snap.queues) == 5
    assert len(snap.queues) == 50


def test_errors_are_classified_and_redacted() -> None:
    # Nothing listens on port 1: connection refused.
    url = "redis://:pa%40ss:w0rd#?@127.0.0.1:1/0"
    p = probe_for_url(url, ProbeOptions(timeout=2))
    with pytest.raises(ProbeError) as err:
        p.snapshot({"q"})
    assert err.value.reason == "connection"
    assert err.value.cause == "ConnectionError"
    assert "w0rd" not in str(err.value) and "pa@ss" not in str(err.value)


def test_sentinel_without_master_name_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="master_name"):
        probe_for_url("sentinel://127.0.0.1:26379")


# -- a private Redis + Sentinel, to probe through kombu-style sentinel URLs --


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{what} did not listen on {port}", pytrace=False)


def test_wrong_password_is_an_auth_error(tmp_path: Path) -> None:
    password = "Right-Pa:ss@/#?%"
    with RedisServer(tmp_path, password=password) as server:
        port = server.port
        p = probe_for_url(f"redis://:Wr0ng-Secret@127.0.0.1:{port}/0", ProbeOptions(timeout=2))
        with pytest.raises(ProbeError) as err:
            p.snapshot({"q"})
        assert err.value.reason == "auth"
        assert "Wr0ng-Secret" not in str(err.value)
        # The right password, unencoded awkward characters and all, works.
        ok = probe_for_url(f"redis://:{password}@127.0.0.1:{port}/0", ProbeOptions(timeout=2))
        assert [q.length for q in ok.snapshot({"q"}).queues] == [0]


@pytest.fixture
def sentinel_url(tmp_path: Path) -> Iterator[str]:
    """A private Redis and a Sentinel watching it (the Sentinel is redis-server in sentinel mode, with a
    config file it rewrites: not a Redis the harness starts)."""
    sentinel_port = free_port()
    with RedisServer(tmp_path) as server:
        conf = os.path.join(tmp_path, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n")
            f.write(f"sentinel monitor csxmaster 127.0.0.1 {server.port} 1\n")
        sentinel = subprocess.Popen([redis_server_binary(), conf, "--sentinel"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        try:
            _wait_port(sentinel_port, sentinel, "redis sentinel")
            # A dead first sentinel in the list: the probe must move on to the live one.
            yield f"sentinel://127.0.0.1:{free_port()}/3;sentinel://127.0.0.1:{sentinel_port}/3"
        finally:
            sentinel.terminate()
            sentinel.wait(10)


def test_sentinel_url(sentinel_url: str) -> None:
    options = {"master_name": "csxmaster", "priority_steps": [0, 3, 6, 9]}
    app = Celery("probe-sentinel", broker=sentinel_url, set_as_current=False)
    app.conf.broker_transport_options = options
    for priority in range(10):
        app.send_task("x.y", queue="sq", priority=priority)
    app.close()
    p = probe_for_url(sentinel_url, ProbeOptions(timeout=5, transport_options=options))
    snap = p.snapshot({"sq"})
    assert [(q.name, q.vhost, q.length) for q in snap.queues] == [("sq", "3", 10)]
    assert snap.nodes[0].node == "csxmaster"
    assert "sq" in p.discover()
    p.close()


def _mixed_queues(client: redis.Redis, now: float) -> set[str]:
    """Queues that exercise every branch of the snapshot: priorities, foreign data, wrong types."""
    def msg(due: object) -> bytes:
        return json.dumps({"body": "", "headers": {"task": "t", DUE_HEADER: due}}).encode()

    client.lpush("mx-a", msg(now - 5), msg(now - 1))
    client.lpush("mx-a\x06\x163", msg(now - 30))
    client.lpush("mx-a\x06\x169", b"not json")
    client.lpush("mx-b\x06\x166", msg(now + 3600))
    client.lpush("mx-c", b'{"headers": {"x": 1}}', json.dumps({"headers": {}, "csx_due": 5}).encode())
    client.set("mx-d", "a string, not a list")
    client.lpush("mx-d\x06\x163", msg(now - 7.25))
    return {"mx-a", "mx-b", "mx-c", "mx-d", "mx-empty"}


def _view(p: RedisProbe, names: set[str]) -> dict[str, tuple[int, float | None]]:
    snap = p.snapshot(names)
    return {q.name: (q.length, None if q.oldest_message_age_seconds is None else round(q.oldest_message_age_seconds))
            for q in snap.queues}


def test_script_and_plain_pipeline_give_the_same_snapshot(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    names = _mixed_queues(client, time.time())
    scripted, plain = probe(redis_url), probe(redis_url)
    plain._scripted = False  # the fallback path, as after a refusal
    for read_age in (True, False):
        scripted.read_oldest_age = plain.read_oldest_age = read_age
        assert _view(scripted, names) == _view(plain, names)
    scripted.read_oldest_age = True
    assert _view(scripted, names) == {
        "mx-a": (4, 30), "mx-b": (1, 0), "mx-c": (2, None), "mx-d": (1, 7), "mx-empty": (0, None),
    }
    assert scripted._scripted, "a healthy server must keep the scripted path"


def test_script_is_loaded_again_after_script_flush(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        port = server.port
        url = f"redis://127.0.0.1:{port}/0"
        redis.Redis.from_url(url).lpush("q", json.dumps({"headers": {DUE_HEADER: time.time() - 3}}))
        p = probe(url)
        assert _view(p, {"q"}) == {"q": (1, 3)}
        redis.Redis.from_url(url).script_flush()
        with RoundTrips() as trips:
            assert _view(p, {"q"}) == {"q": (1, 3)}
        assert trips.sends == 2  # NOSCRIPT, then SCRIPT LOAD + EVALSHA together
        assert p._scripted
        with RoundTrips() as trips:
            p.snapshot({"q"})
        assert trips.sends == 1


def test_without_scripting_rights_the_probe_falls_back_to_plain_commands(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        port = server.port
        admin = redis.Redis(port=port)
        admin.execute_command("ACL", "SETUSER", "noscript", "on", ">pw", "~*", "+@all", "-@scripting")
        admin.lpush("q\x06\x163", json.dumps({"headers": {DUE_HEADER: time.time() - 4}}))
        admin.lpush("q", b"x", b"y")
        p = probe(f"redis://noscript:pw@127.0.0.1:{port}/0")
        assert _view(p, {"q"}) == {"q": (3, 4)}
        assert not p._scripted
        with RoundTrips() as trips:
            assert _view(p, {"q"}) == {"q": (3, 4)}
        assert trips.sends == 1
        # Without LLEN rights it is still an auth error, not a silent zero.
        admin.execute_command("ACL", "SETUSER", "nolist", "on", ">pw", "~*", "+@all", "-llen")
        with pytest.raises(ProbeError) as err:
            probe(f"redis://nolist:pw@127.0.0.1:{port}/0").snapshot({"q"})
        assert err.value.reason == "auth"


@pytest.mark.parametrize(
    "heads",
    [
        [],
        [None, None],
        [b'{"headers": {"csx_due": 5.5}}', b'{"headers": {"csx_due": 3}}', None],
        # The key outside the headers, with a smaller value than the real one: not a due.
        [b'{"properties": {"csx_due": 1}, "headers": {}}', b'{"headers": {"csx_due": 7}}'],
        [b'{"csx_due": 1, "headers": {"csx_due": 9}}', b'{"headers": {"csx_due": 7}}'],
        [b'{"headers": {"csx_due": 2}, "x": {"csx_due": 1}}'],
        [b'{"headers": {"csx_due" : 4e2 }}', b'{"headers": {"csx_due":-1.5E+1}}'],
        [b'{"headers": {"csx_due": NaN}}', b'{"headers": {"csx_due": 8}}'],
        [b'{"headers": {"csx_due": 1e999}}', b'{"headers": {"csx_due": 8}}'],
        [b'{"headers": {"csx_due": "1"}}', b'{"headers": {"csx_due": true}}'],
        [b'{"headers": {"csx_due": 1}', b'\xff"csx_due": 2}'],
        ['{"headers": {"csx_due": 6}}', b'{"headers": {"csx_due": 8}}'],
    ],
)
def test_oldest_due_reads_one_message_but_agrees_with_decoding_all(heads: list[object]) -> None:
    from celery_signal_exporter.probes.redis import _oldest_due, _oldest_due_slow

    assert _oldest_due(heads) == _oldest_due_slow(heads)
