"""Shared fixtures: real brokers, found or failed loudly, never skipped; and the tiers.

The folder a test lives in is its tier and its marker (`unit`, `integration`, `system`): plain
`pytest` runs tests/unit, which must stay in one process with no broker, and a unit test that asks
for a broker or starts a subprocess fails saying so.

Redis is the session's own: a private `redis-server` on a free port, started
once per test session and killed at its end, so no test ever writes into a
Redis it did not start. Each test that asks for `redis_url` gets a database
index of its own on it, flushed before and after.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import AMQP_HOST, AMQP_PORT, RABBIT_MGMT_PORT, RedisServer, free_port, rabbit_vhost

#: Databases of the session's redis-server; `redis_url` hands them out in turn.
REDIS_DATABASES = 64


def _require_port(host: str, port: int, what: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        pytest.fail(
            f"{what} is not reachable at {host}:{port} ({exc}); "
            "start it first (bash .ci/services.sh does)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The test session's own redis-server, with databases enough for `redis_url` to hand out."""
    with RedisServer(tmp_path_factory.mktemp("session-redis"), databases=REDIS_DATABASES) as server:
        yield server


@pytest.fixture(scope="session")
def redis_base_url(session_redis: RedisServer) -> str:
    """`redis://127.0.0.1:<port>` of the session's private redis-server (no database index)."""
    return session_redis.url


_next_db = itertools.cycle(range(1, REDIS_DATABASES))


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A database index of its own on the session's redis-server, flushed before and after."""
    import redis

    url = f"{redis_base_url}/{next(_next_db)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        try:
            client.flushdb()
        finally:
            client.close()


@pytest.fixture(scope="session")
def amqp_base_url() -> str:
    _require_port(AMQP_HOST, AMQP_PORT, "RabbitMQ")
    _require_port(AMQP_HOST, RABBIT_MGMT_PORT, "RabbitMQ management API")
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}"


@pytest.fixture
def amqp_vhost(amqp_base_url: str) -> Iterator[str]:
    """A fresh RabbitMQ vhost (guest has full rights on it), deleted after."""
    with rabbit_vhost() as vhost:
        yield vhost


@pytest.fixture
def amqp_url(amqp_base_url: str, amqp_vhost: str) -> str:
    return f"{amqp_base_url}/{amqp_vhost}"


class MotoServer:
    """moto in server mode (`python -m moto.server`) on loopback and a free port: a real HTTP SQS
    endpoint for the SQS probe and for kombu's SQS transport in real workers. moto keeps everything in
    memory, so its state ends with the process; `env` adds settings (INITIAL_NO_AUTH_ACTION_COUNT)."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        import importlib.util
        import sys

        if importlib.util.find_spec("moto.server") is None or importlib.util.find_spec("flask") is None:
            pytest.fail("moto[server] is not installed (the SQS tests run moto in server mode); "
                        "pip install -e '.[test]' installs it", pytrace=False)
        self.python = sys.executable
        self.port = free_port()
        self.log_path = workdir / f"moto-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([self.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"moto server exited with {self.proc.returncode}:\n"
                            f"{self.log_path.read_text(errors='replace')[-2000:]}", pytrace=False)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"moto server did not listen on port {self.port} within 60 s", pytrace=False)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None



@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The session's own moto server (no auth checks: any key is accepted)."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sqs_prefix(moto_server: MotoServer) -> Iterator[str]:
    """A queue-name prefix of the test's own on the session's moto; its queues are deleted after."""
    import boto3

    prefix = f"csx{uuid.uuid4().hex[:8]}-"
    yield prefix
    client = boto3.client("sqs", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    for url in client.list_queues(QueueNamePrefix=prefix).get("QueueUrls", []):
        client.delete_queue(QueueUrl=url)
    client.close()


# --- The tiers ------------------------------------------------------------------------------------

TIERS = ("unit", "integration", "system")
BROKER_FIXTURES = frozenset({"session_redis", "redis_base_url", "redis_url", "amqp_base_url", "amqp_vhost",
                             "amqp_url", "moto_server", "sqs_prefix"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tier of its folder; a unit test asking for a broker is an error."""
    for item in items:
        tier = next((t for t in TIERS if f"{os.sep}tests{os.sep}{t}{os.sep}" in str(item.path)), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit, tests/integration or tests/system")
        item.add_marker(getattr(pytest.mark, tier))
        brokers = BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if tier == "unit" and brokers:
            raise pytest.UsageError(f"{item.nodeid}: a unit test uses {sorted(brokers)}; move it to tests/integration")
    # The order pytest-xdist hands out files in (.ci/run passes --no-loadscope-reorder): files holding a
    # `long` test first, as collected, then the files with the most tests (xdist's own guess at the longest).
    long_files = {item.path for item in items if item.get_closest_marker("long")}
    tests_in = Counter(item.path for item in items)
    items.sort(key=lambda item: (0, 0) if item.path in long_files else (1, -tests_in[item.path]))


@pytest.fixture(autouse=True)
def _no_subprocess_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick tier stays in one process (os.fork for a dead writer is fine: it runs no program)."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid}: a unit test started a subprocess {args[1:2]}; "
                             "move it to tests/integration")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
