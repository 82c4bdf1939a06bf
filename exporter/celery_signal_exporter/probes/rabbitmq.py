"""RabbitMQ probe: queue and node figures from the management HTTP API.

The API already aggregates what we need, so a cycle costs one paginated
`GET /api/queues` (only the needed columns) and one `GET /api/nodes`,
however many queues there are. The oldest-message age comes from the same
listing: classic queues report `head_message_timestamp`, the AMQP
`timestamp` property (whole seconds) of the next message to be delivered,
when it has one and is in memory; quorum queues and streams do not report it
(RabbitMQ 3.10). Every figure lags the broker by up to the management stats
interval (5 s by default).

Resource alarms are watched apart, every `--rabbitmq-alarm-interval` (1 s):
`GET /api/health/checks/alarms` asks rabbit_alarm itself, so it answers 503
with the alarms listed the moment one is set and 200 the moment all clear,
where `mem_alarm` in /api/nodes can lag by the stats interval and more
(measured on 3.10.8: still false 8 s after the alarm was set).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from celery_signal_exporter.probes import register
from celery_signal_exporter.probes.base import (
    OLDEST_AGE,
    Alarms,
    BrokerSnapshot,
    NodeStats,
    OptionError,
    ProbeError,
    ProbeKind,
    ProbeOption,
    ProbeOptions,
    QueueStats,
)
from celery_signal_exporter.redact import redact_url, scrub, split_credentials

# pyrabbit2 (which loads requests) and kombu's URL parser are imported where
# they are used, so listing the probes (the CLI does, for --help) loads no
# broker client.

QUEUE_COLUMNS = "name,vhost,messages_ready,messages_unacknowledged,consumers"
#: The head message's AMQP `timestamp`; null or missing when there is none to read.
AGE_COLUMN = "head_message_timestamp"
#: A head timestamp further ahead of our clock than this is not UNIX seconds
#: (milliseconds, say): no age rather than a misleading 0.
MAX_FUTURE_SKEW = 3600.0
NODE_COLUMNS = "name,running,mem_used,mem_limit,mem_alarm,disk_free_alarm"
MAX_PAGE_SIZE = 500  # the management API refuses bigger pages
#: Live alarms: 200 when none, 503 listing {"node", "resource"} for each one raised.
ALARMS_PATH = "health/checks/alarms"
#: The health check's resource names (3.10: "memory", "disk space") to ours.
ALARM_NAMES = {"memory": "memory", "disk space": "disk", "disk": "disk"}
DEFAULT_ALARM_INTERVAL = 1.0

#: The options only this probe reads; `serve` offers them (see `register` below).
OPTIONS = (
    ProbeOption("--rabbitmq-management-url",
                help="RabbitMQ management API, e.g. https://rabbit:15671; derived from the broker URL when unset."),
    ProbeOption("--rabbitmq-management-user", help="Management API user, when not the broker's."),
    ProbeOption("--rabbitmq-management-password", help="Management API password, when not the broker's."),
    ProbeOption("--rabbitmq-vhost", name="rabbitmq_vhosts", multiple=True,
                help="Extra RabbitMQ vhost to report; repeatable."),
    ProbeOption("--rabbitmq-alarm-interval", type=float, default=DEFAULT_ALARM_INTERVAL,
                help="Seconds between two checks of the nodes' memory and disk alarms "
                     "(GET /api/health/checks/alarms), apart from the probe interval: "
                     "an alarm that flaps for seconds falls between two probes."),
    OLDEST_AGE,  # shared with the Redis probe
)


@dataclass(frozen=True)
class RabbitMQSettings:
    """What only the RabbitMQ probe reads (ProbeOptions.settings)."""

    #: Management API; None means "derive from the broker URL".
    mgmt_host: str | None = None
    mgmt_port: int | None = None
    mgmt_https: bool | None = None
    mgmt_username: str | None = None
    mgmt_password: str | None = None
    #: TLS verification for https (False, True, or a CA bundle path).
    mgmt_verify: bool | str = True
    #: Vhosts to report besides the broker URL's own.
    extra_vhosts: tuple[str, ...] = ()
    #: Queues per management API page (the API allows at most 500).
    page_size: int = MAX_PAGE_SIZE
    #: Ask for each queue's head_message_timestamp for the oldest-age metric.
    read_oldest_age: bool = True
    #: Seconds between two alarm checks.
    alarm_interval: float = DEFAULT_ALARM_INTERVAL

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> RabbitMQSettings:
        """From OPTIONS' values; credentials in the management URL are used, never echoed."""
        user, password = values["rabbitmq_management_user"], values["rabbitmq_management_password"]
        where: dict[str, Any] = {}
        url = values["rabbitmq_management_url"]
        if url:
            # Parsed by hand so a '#' or '?' in the password cannot move the host.
            bare, url_user, url_password = split_credentials(url)
            user = user or url_user
            password = password if password is not None else url_password
            parts = urlsplit(bare)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise OptionError("--rabbitmq-management-url", "must be http(s)://host[:port]")
            try:
                port = parts.port
            except ValueError:
                raise OptionError("--rabbitmq-management-url", "bad port") from None
            where = {"mgmt_host": parts.hostname, "mgmt_port": port, "mgmt_https": parts.scheme == "https"}
        alarm_interval = values.get("rabbitmq_alarm_interval")
        alarm_interval = DEFAULT_ALARM_INTERVAL if alarm_interval is None else float(alarm_interval)
        if not (math.isfinite(alarm_interval) and alarm_interval > 0):
            raise OptionError("--rabbitmq-alarm-interval", "must be a positive number of seconds")
        return cls(mgmt_username=user, mgmt_password=password,
                   extra_vhosts=tuple(values["rabbitmq_vhosts"] or ()),
                   read_oldest_age=bool(values["oldest_age"]), alarm_interval=alarm_interval, **where)


def classify(exc: BaseException) -> str:
    """Map a pyrabbit2 / requests exception to an error reason."""
    from pyrabbit2.http import HTTPError, NetworkError

    if isinstance(exc, HTTPError):
        return "auth" if exc.status in (401, 403) else "protocol"
    if isinstance(exc, NetworkError):
        return "timeout" if "timeout" in str(exc).lower() else "connection"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return "connection"
    if isinstance(exc, (KeyError, TypeError, ValueError)):
        return "protocol"  # an answer of an unexpected shape
    return "other"


def _int(item: dict[str, Any], key: str) -> int:
    """A count from the API; stats a fresh queue has not reported yet are 0."""
    value = item.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _head_age(item: dict[str, Any], now: float) -> float | None:
    """Seconds since the head message's `timestamp`; None when the API has none.

    The API gives null for an empty queue, a head without the property or a
    paged-out head, and leaves the key out for quorum queues and streams.
    A timestamp slightly ahead of our clock (publisher skew) reads 0.
    """
    stamp = item.get(AGE_COLUMN)
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool) or not math.isfinite(stamp):
        return None
    if stamp > now + MAX_FUTURE_SKEW:
        return None
    return max(0.0, now - stamp)


class RabbitMQProbe:
    """Probe for `amqp://`, `amqps://` and `pyamqp://` URLs."""

    def __init__(self, url: str, options: ProbeOptions | None = None) -> None:
        from kombu.utils.url import url_to_parts
        from pyrabbit2.api import Client

        shared = options or ProbeOptions()
        opts = shared.settings_for(RabbitMQSettings)
        self.url = url
        self.label = redact_url(url)
        bare, url_user, url_password = split_credentials(re.split(r";(?=\w+://)", url)[0])
        parts = url_to_parts(bare)
        # kombu: no path and "/" both mean the default vhost "/".
        self.vhosts: tuple[str, ...] = tuple(dict.fromkeys([parts.path or "/", *opts.extra_vhosts]))
        https = opts.mgmt_https if opts.mgmt_https is not None else parts.scheme == "amqps"
        host = opts.mgmt_host or parts.hostname or "localhost"
        port = opts.mgmt_port or (15671 if https else 15672)
        username = opts.mgmt_username or url_user or "guest"
        self._password = opts.mgmt_password if opts.mgmt_password is not None else url_password or "guest"
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.page_size = max(1, min(opts.page_size, MAX_PAGE_SIZE))
        self.alarm_interval = opts.alarm_interval
        #: Running nodes named by the last /api/nodes answer, even before their first statistics.
        self._nodes: frozenset[str] = frozenset()
        self.read_oldest_age = opts.read_oldest_age
        self._columns = f"{QUEUE_COLUMNS},{AGE_COLUMN}" if self.read_oldest_age else QUEUE_COLUMNS
        # As UTF-8 bytes: requests encodes str credentials as latin-1, so a
        # password with any other character (a snowman, an emoji) would fail
        # every request with a UnicodeEncodeError instead of logging in.
        self._client = Client(
            netloc,
            username.encode("utf-8"),
            self._password.encode("utf-8"),
            timeout=shared.timeout,
            scheme="https" if https else "http",
            verify=opts.mgmt_verify,
        )

    def _error(self, exc: BaseException) -> ProbeError:
        message = scrub(str(exc), self.url, secrets=(self._password,))
        return ProbeError(classify(exc), type(exc).__name__, message)

    def _get(self, path: str, params: dict[str, str | int]) -> Any:
        return self._client.http.do_call(path, "GET", params=params)

    def discover(self) -> set[str]:
        """Nothing to do: every snapshot lists all queues of the vhosts."""
        return set()

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        """Every queue of the configured vhosts, and every node.

        `queues` is not needed: the API lists all queues in the same request.
        """
        from pyrabbit2.http import HTTPError, NetworkError

        try:
            items = self._queues()
            now = time.time()
            nodes = self._get("nodes", {"columns": NODE_COLUMNS})
            self._nodes = frozenset(str(node["name"]) for node in nodes if node.get("running", True))
            stats = [
                QueueStats(
                    name=str(item["name"]),
                    vhost=str(item["vhost"]),
                    length=_int(item, "messages_ready"),
                    unacked=_int(item, "messages_unacknowledged"),
                    consumers=_int(item, "consumers"),
                    oldest_message_age_seconds=_head_age(item, now) if self.read_oldest_age else None,
                )
                for item in items
                if item.get("vhost") in self.vhosts
            ]
            node_stats = [
                NodeStats(
                    node=str(node["name"]),
                    memory_used_bytes=float(node["mem_used"]),
                    memory_limit_bytes=float(node.get("mem_limit") or 0),
                    memory_alarm=bool(node.get("mem_alarm")),
                    disk_alarm=bool(node.get("disk_free_alarm")),
                )
                for node in nodes
                if node.get("running", True) and "mem_used" in node
            ]
        except (HTTPError, NetworkError, OSError, KeyError, TypeError, ValueError) as exc:
            raise self._error(exc) from None
        return BrokerSnapshot(queues=stats, nodes=node_stats)

    def alarms(self) -> Alarms:
        """The (node, "memory" | "disk") alarms raised now, from rabbit_alarm via the health check."""
        from pyrabbit2.http import HTTPError, NetworkError

        try:
            try:
                self._get(ALARMS_PATH, {})
                return Alarms(nodes=self._nodes)  # 200: no alarm in the cluster
            except HTTPError as exc:
                if exc.status != 503:
                    raise
                answer = json.loads(str(exc.reason))
            raised = frozenset(
                (str(alarm["node"]), ALARM_NAMES[str(alarm["resource"])])
                for alarm in answer["alarms"]
                if str(alarm.get("resource")) in ALARM_NAMES
            )
            return Alarms(raised=raised, nodes=self._nodes | {node for node, _ in raised})
        except (HTTPError, NetworkError, OSError, KeyError, TypeError, ValueError) as exc:
            raise self._error(exc) from None

    def _queues(self) -> list[dict[str, Any]]:
        """All queue rows, page by page: a single request up to `page_size` queues."""
        if len(self.vhosts) == 1:
            path = f"queues/{quote(self.vhosts[0], safe='')}"
        else:
            path = "queues"  # one request for every vhost, filtered here
        items: dict[tuple[str, str], dict[str, Any]] = {}
        page = 1
        while True:
            result = self._get(path, {"columns": self._columns, "page": page, "page_size": self.page_size})
            # Keyed, so a queue that shifts between pages is never reported twice.
            items.update({(str(i["vhost"]), str(i["name"])): i for i in result["items"]})
            if page >= int(result.get("page_count") or 0):
                return list(items.values())
            page += 1

    def close(self) -> None:
        """Nothing held open: pyrabbit2 makes a fresh HTTP request per call."""


register(ProbeKind(
    name="rabbitmq",
    schemes=("amqp", "amqps", "pyamqp"),
    create=RabbitMQProbe,
    options=OPTIONS,
    settings=RabbitMQSettings.from_options,
))
