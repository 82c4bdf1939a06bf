"""The one small interface every broker probe implements.

A probe answers "what does the broker hold right now" in one call. It never
touches Prometheus types: the probe loop turns its snapshot into metrics, so a
new broker is one new file that fills in a `BrokerSnapshot`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from celery_signal_exporter.catalogue import Spec

#: Every reason a probe error is counted under; the loop pre-creates them at 0
#: so that `rate()` works before the first failure.
ERROR_REASONS = ("connection", "timeout", "auth", "protocol", "other")
#: The resource alarms a broker can raise that block its publishers (RabbitMQ's memory and free-disk
#: alarms); an alarm watch answers with (node, resource) pairs of these.
ALARM_RESOURCES = ("memory", "disk")


@dataclass(frozen=True)
class QueueStats:
    """One queue as the broker sees it; None means the broker cannot tell."""

    name: str
    vhost: str
    length: int
    unacked: int | None = None
    consumers: int | None = None
    oldest_message_age_seconds: float | None = None
    #: What only this broker reports of the queue, by catalogue entry (labels queue_name and vhost, as
    #: above): SQS's delayed messages and its dead-letter queue's depth. The loop serves whatever it is
    #: given, so a broker with figures of its own adds a catalogue entry and nothing to the loop.
    measures: tuple[tuple[Spec, float], ...] = ()


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
    #: The broker's own counters, by catalogue entry (label broker), e.g. the API requests the SQS probe
    #: sent (SQS bills per request). The loop keeps each one's last value through an outage.
    counters: tuple[tuple[Spec, float], ...] = ()


S = TypeVar("S")


@dataclass(frozen=True)
class ProbeOptions:
    """Everything a probe may need besides the URL, as one object.

    The shared part (timeout, transport options) is read by every probe; what
    only one broker understands sits in that probe's own settings object, so
    adding a broker never adds fields here.
    """

    #: Seconds a single network call may take (socket / HTTP timeout).
    timeout: float = 10.0
    #: The Celery app's `broker_transport_options` (Redis: priority_steps,
    #: sep, global_keyprefix, unacked_key, master_name, sentinel_kwargs).
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    #: Probes' own settings objects (e.g. `RedisSettings`, `RabbitMQSettings`).
    #: Each probe takes the one of its type and its defaults when there is
    #: none, so one `ProbeOptions` serves every broker of a command line.
    settings: tuple[object, ...] = ()

    def settings_for(self, kind: type[S]) -> S:
        """This probe's settings: the object of type `kind`, else `kind()`."""
        for item in self.settings:
            if isinstance(item, kind):
                return item
        return kind()


@dataclass(frozen=True)
class ProbeOption:
    """A command-line option a probe declares for itself.

    The CLI adds it to `serve` as `flag`, with the environment variable
    `CELERY_EXPORTER_<FLAG>`, and hands its value to the probe's settings
    builder under `key`. Kept free of click so probe modules stay plain.
    """

    #: "--rabbitmq-vhost", or an on/off pair "--oldest-age/--no-oldest-age".
    flag: str
    help: str
    default: Any = None
    multiple: bool = False
    #: A click type or a Python type (int, float); None means a string.
    type: Any = None
    #: The value's name when it is not the flag's ("rabbitmq_vhosts").
    name: str = ""

    @property
    def key(self) -> str:
        return self.name or self.flag.split("/")[0].lstrip("-").replace("-", "_")


#: The one option several probes read, declared once so they share it: the CLI
#: offers it once and hands its value to each (see `register`).
OLDEST_AGE = ProbeOption(
    "--oldest-age/--no-oldest-age",
    default=True,
    help="Report celery_queue_oldest_message_age_seconds. Redis: reads the head message of each queue; "
         "RabbitMQ: one more column (head_message_timestamp) of the same queue listing.",
)


class OptionError(ValueError):
    """A bad value of one option, for the CLI to report as that option's error.

    The message must never hold a secret: it is printed as is.
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


@dataclass(frozen=True)
class ProbeKind:
    """One broker's probe as registered: what the CLI and the loop need to know
    before (and without) importing the broker's client library."""

    #: Short name, e.g. "redis"; the module's name by convention.
    name: str
    #: URL schemes it handles, lower case, e.g. ("redis", "rediss").
    schemes: tuple[str, ...]
    #: Makes the probe for one URL; raises ValueError for a bad URL. Imports
    #: the broker library, so it runs only for a URL of this kind.
    create: Callable[[str, ProbeOptions], Probe]
    #: Options only this probe reads.
    options: tuple[ProbeOption, ...] = ()
    #: Builds the probe's settings object from its options' values (by
    #: `ProbeOption.key`); raises `OptionError`. None: no settings.
    settings: Callable[[Mapping[str, Any]], object] | None = None


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
    """A broker probe. Implementations live one per file in this package and
    register themselves (see `celery_signal_exporter.probes.register`)."""

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


@dataclass(frozen=True)
class Alarms:
    """One alarm check's answer."""

    #: (node, resource) pairs raised now; `resource` is one of ALARM_RESOURCES.
    raised: frozenset[tuple[str, str]] = frozenset()
    #: Every node the broker named lately, raised or not, so each gets its counters at 0.
    nodes: frozenset[str] = frozenset()


@runtime_checkable
class AlarmWatch(Protocol):
    """What a probe whose broker has resource alarms adds, so the loop can watch them on their
    own fast cadence: an alarm that flaps for seconds falls between two snapshots (15 s apart)."""

    #: Seconds between the starts of two alarm checks.
    alarm_interval: float

    def alarms(self) -> Alarms:
        """The alarms raised right now, read from a live source (never a statistics cache that
        lags). Raises `ProbeError`."""
        ...
