"""Everything `serve` was told, as one frozen object.

Built once, from the command line and the environment (`cli.serve`) or by the
demo, and passed whole to `serving.run`: each part (the merge, the probe loops,
the HTTP server) reads the fields it needs, so an option is added in one place
and no layer repacks another's. uvicorn's `Config` is the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_signal_exporter.server._http import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_SEND_TIMEOUT
from celery_signal_exporter.server.collect import DEFAULT_MAX_QUEUE_NAMES, DEFAULT_MAX_TASK_NAMES
from celery_signal_exporter.server.webconfig import WebConfig

#: Celery's own plumbing that kombu registers as queues: remote-control
#: mailboxes and their replies (`<host>.celery.pidbox`, `<id>.reply.celery.pidbox`),
#: event receivers (`celeryev.<uuid>`) and server-named RabbitMQ queues. They
#: are per process, so they would churn label values, and hold no tasks.
DEFAULT_EXCLUDE: tuple[str, ...] = (r".*\.pidbox", r"celeryev\..*", r"amq\.gen-.*")


@dataclass(frozen=True)
class ServeConfig:
    """`serve`'s options, parsed and resolved: one field per option, named after its flag.

    The defaults are the command line's, so a test or the demo states only what it changes.
    """

    # -- the metrics directory ------------------------------------------------
    #: Already resolved (see `options.metrics_dir_or_env`); None for a probe-only exporter.
    metrics_dir: str | None = None
    #: Seconds without a heartbeat after which `celery_worker_up` reads 0.
    worker_timeout: float = 10.0
    #: Distinct task and queue names shown across the directory; the rest become `__overflow__`.
    max_task_names: int = DEFAULT_MAX_TASK_NAMES
    max_queue_names: int = DEFAULT_MAX_QUEUE_NAMES
    #: Seconds between the exporter's own compactions; 0 leaves it to the workers.
    compact_interval: float = 30.0
    #: Metric families served to nobody, whoever wrote them (`--exclude-metrics`, parsed).
    exclude_metrics: re.Pattern[str] | None = None

    # -- the brokers -------------------------------------------------------------
    broker_urls: tuple[str, ...] = ()
    #: Seconds between the starts of two probe cycles, and that one cycle may take.
    probe_interval: float = 15.0
    probe_timeout: float = 10.0
    #: Queues always probed (and kept first when the cap bites).
    queues: tuple[str, ...] = ()
    #: Regexes (full match); a queue is kept if it matches any. Empty keeps all.
    queue_include: tuple[str, ...] = ()
    #: Regexes (full match); a queue matching any is dropped. Wins over include.
    queue_exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    #: Most distinct queue names reported per broker; the rest are counted as dropped.
    max_queues: int = 1000
    #: kombu `broker_transport_options`, shared by every probe.
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    #: The probes' own options as the command line read them (`ProbeOption.key` -> value).
    probe_values: Mapping[str, Any] = field(default_factory=dict)

    # -- HTTP ----------------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = 9808
    #: The parsed `--web-config-file`: TLS and basic-auth users (empty: neither).
    web_config: WebConfig = field(default_factory=WebConfig)
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    log_level: str = "info"

    def __post_init__(self) -> None:
        """The invariants the probe loops rely on; the CLI reports them first, as its own errors."""
        if self.probe_interval <= 0 or self.probe_timeout <= 0:
            raise ValueError("probe interval and timeout must be positive")
        if self.probe_timeout > self.probe_interval:
            raise ValueError(f"probe timeout ({self.probe_timeout}s) must not exceed its interval "
                             f"({self.probe_interval}s)")
        if self.max_queues < 0:
            raise ValueError("max_queues must be >= 0")
