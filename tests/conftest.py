"""Shared fixtures: real brokers, found or failed loudly, never skipped."""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("TEST_AMQP_PORT", "5672"))
RABBIT_MGMT_PORT = int(os.environ.get("TEST_RABBIT_MGMT_PORT", "15672"))


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
def redis_base_url() -> str:
    _require_port(REDIS_HOST, REDIS_PORT, "Redis")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}"


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A Redis URL on a database index no other test run on this machine holds, flushed."""
    import redis

    for db in range(1, 16):
        lock = open(f"/tmp/celery-signal-exporter-test-redis-db-{db}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        break
    else:
        pytest.fail("all Redis test databases 1-15 are held by other test runs", pytrace=False)
    url = f"{redis_base_url}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        lock.close()


@pytest.fixture(scope="session")
def amqp_base_url() -> str:
    _require_port(AMQP_HOST, AMQP_PORT, "RabbitMQ")
    _require_port(AMQP_HOST, RABBIT_MGMT_PORT, "RabbitMQ management API")
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}"


@pytest.fixture
def amqp_vhost(amqp_base_url: str) -> Iterator[str]:
    """A fresh RabbitMQ vhost (guest has full rights on it), deleted after."""
    from pyrabbit2.api import Client

    client = Client(f"{AMQP_HOST}:{RABBIT_MGMT_PORT}", "guest", "guest")
    vhost = f"csx-test-{uuid.uuid4().hex[:8]}"
    client.create_vhost(vhost)
    client.set_vhost_permissions(vhost, "guest", ".*", ".*", ".*")
    yield vhost
    client.delete_vhost(vhost)


@pytest.fixture
def amqp_url(amqp_base_url: str, amqp_vhost: str) -> str:
    return f"{amqp_base_url}/{amqp_vhost}"
