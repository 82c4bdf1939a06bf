"""The one small interface every broker probe implements.

A probe answers "what does the broker hold right now" in one call. It never
touches Prometheus types: the probe loop turns its snapshot into metrics, so a
new broker is one new file that fills in a `BrokerSnapshot`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

#: Every reason a probe error is counted under; the loop pre-creates them at 0
#: so that `rate()` works before the first failure.
ERROR_REASONS = ("connection", "timeout", "auth", "protocol", "other")


@dataclass(frozen=True)
class QueueStats:
    """One queue as the broker sees it; None means the broker cannot tell."""

    name: str
    vhost: str
    length: int
    unacked: int | None = None
    consumers: int | None = None
    oldest_message_age_seconds: float | None = None


@dataclass(frozen=True)
class NodeStats:
    """One broker node (a Redis server, a RabbitMQ cluster member)."""

    node: str
    memory_used_bytes: float
    memory_limit_bytes: float  # 0 means no limit
    memory_alarm: bool | None = None
    disk_alarm: bool | None = None


@dataclass(frozen=True)
class BrokerSnapshot:
    queues: list[QueueStats] = field(default_factory=list)
    nodes: list[NodeStats] = field(default_factory=list)
    # Transport-wide unacked count where the broker cannot split it per queue
    # (Redis keeps one unacked hash for all queues).
    unacked_total: int | None = None


@dataclass(frozen=True)
class ProbeOptions:
    """Everything a probe may need besides the URL, flat so a CLI maps onto it.

    Each probe reads only its own fields; the rest are ignored.
    """

    #: Seconds a single network call may take (socket / HTTP timeout).
    timeout: float = 10.0
    #: The Celery app's `broker_transport_options` (Redis: priority_steps,
    #: sep, global_keyprefix, unacked_key, master_name, sentinel_kwargs).
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    #: Redis: read the head message of every list for the oldest-age metric.
    read_oldest_age: bool = True
    #: RabbitMQ management API; None means "derive from the broker URL".
    mgmt_host: str | None = None
    mgmt_port: int | None = None
    mgmt_https: bool | None = None
    mgmt_username: str | None = None
    mgmt_password: str | None = None
    #: RabbitMQ: TLS verification for https (False, True, or a CA bundle path).
    mgmt_verify: bool | str = True
    #: RabbitMQ: vhosts to report besides the broker URL's own.
    extra_vhosts: tuple[str, ...] = ()
    #: RabbitMQ: queues per management API page (the API allows at most 500).
    page_size: int = 500


class ProbeError(Exception):
    """A failed probe, already classified, with credentials removed.

    Probes wrap their client library's exceptions in this so the loop can
    count errors by reason and log them without ever seeing a password.
    """

    def __init__(self, reason: str, cause: str, message: str = "") -> None:
        self.reason = reason if reason in ERROR_REASONS else "other"
        self.cause = cause
        self.message = message
        super().__init__(f"{cause}: {message}" if message else cause)


class Probe(Protocol):
    """A broker probe. Implementations live one per file in this package."""

    #: URL schemes this probe handles, e.g. ("redis", "rediss").
    schemes: tuple[str, ...]

    def discover(self) -> set[str]:
        """Queue names the broker itself can name (e.g. kombu's bindings).

        Costlier than a snapshot, so the loop calls it only every few cycles.
        Probes whose snapshot already lists every queue return an empty set.
        """
        ...

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        """Read the broker once. `queues` are names learnt elsewhere
        (configuration, instrumentation, discovery); a probe that lists queues
        anyway may return more. Raises `ProbeError` on failure; the loop
        counts the error and marks the broker down.
        """
        ...

    def close(self) -> None: ...
