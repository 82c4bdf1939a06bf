"""One wiring for `serve` and `demo`: broker probes, the exporter and its HTTP server.

The two commands used to assemble these each in their own way, so a change
(compaction, TLS, connection limits, probe options) had to be made twice and
could drift. Both now describe what they want in a `ServeConfig` and a
`ProbeConfig` and let this module build and run it.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from celery_signal_exporter.probes import OptionError, ProbeOptions, probe_settings
from celery_signal_exporter.redact import redact_url, scrub
from celery_signal_exporter.server._http import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SEND_TIMEOUT,
    release_freed_memory,
    server_options,
)
from celery_signal_exporter.server.collect import DEFAULT_MAX_TASK_NAMES
from celery_signal_exporter.server.probe_loop import LoopOptions, ProbeGroup, build_probe_loops
from celery_signal_exporter.server.service import Exporter, ServiceConfig, create_app
from celery_signal_exporter.server.webconfig import WebConfig


@dataclass(frozen=True)
class ProbeConfig:
    """The brokers to probe, and how."""

    urls: tuple[str, ...] = ()
    interval: float = 15.0
    timeout: float = 10.0
    loop: LoopOptions = field(default_factory=LoopOptions)
    #: kombu `broker_transport_options`, shared by every probe.
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    #: The probes' own options as the command line read them (`ProbeOption.key` -> value).
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeConfig:
    """What the exporter serves and how its HTTP server behaves."""

    #: Already resolved (see `metrics_dir.metrics_dir_or_env`); None for a probe-only exporter.
    metrics_dir: str | None = None
    host: str = "0.0.0.0"
    port: int = 9808
    worker_timeout: float = 10.0
    max_task_names: int = DEFAULT_MAX_TASK_NAMES
    #: Seconds between the exporter's own compactions; 0 leaves it to the workers.
    compact_interval: float = 30.0
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    log_level: str = "info"
    web: WebConfig = field(default_factory=WebConfig)
    #: Metric families not served (`--exclude-metrics`).
    exclude: re.Pattern[str] | None = None


def build_probes(config: ProbeConfig) -> list[ProbeGroup]:
    """One group holding a loop per broker URL (none without URLs).

    Raises `OptionError` naming the option at fault, with every secret of
    the URLs removed, so the caller can print it as one line.
    """
    if not config.urls:
        return []
    options = ProbeOptions(transport_options=config.transport_options, settings=probe_settings(config.values))
    loops = []
    for url in config.urls:
        try:
            loops += build_probe_loops([url], interval=config.interval, timeout=config.timeout,
                                       probe_options=options, loop_options=config.loop)
        except ValueError as exc:
            message = scrub(str(exc), *config.urls)
            if redact_url(url) not in message:
                message = f"{redact_url(url)}: {message}"
            raise OptionError("--broker-url", message) from None
    return [ProbeGroup(loops)]


def run(config: ServeConfig, probes: Sequence[ProbeGroup], listener: socket.socket, duration: float = 0.0) -> bool:
    """Serve on `listener` until stopped (Ctrl-C, SIGTERM) or for `duration` seconds when above 0.

    The probes start once the exporter exists (they ask it which queues the
    workers have seen) and are stopped, and the listener closed, on the way
    out. Returns whether the server had started.
    """
    release_freed_memory()  # before the compaction thread, the probes and the server's threads start
    exporter = Exporter(ServiceConfig(metrics_dir=config.metrics_dir, worker_timeout=config.worker_timeout,
                                      sources=list(probes), max_task_names=config.max_task_names,
                                      exclude=config.exclude))
    if config.metrics_dir is not None and config.compact_interval > 0:
        exporter.start_compaction(config.compact_interval)
    tls: dict[str, Any] = {}
    if config.web.tls is not None:
        tls = {"ssl_certfile": config.web.tls.cert_file, "ssl_keyfile": config.web.tls.key_file,
               "ssl_ca_certs": config.web.tls.client_ca_file, "ssl_cert_reqs": config.web.tls.cert_reqs}
    limits = server_options(config.header_timeout, config.send_timeout, config.max_connections)
    level = config.log_level.lower()
    server = uvicorn.Server(uvicorn.Config(create_app(exporter, users=config.web.users), host=config.host,
                                           port=config.port, log_level=level, access_log=level == "debug",
                                           **tls, **limits))
    timer = threading.Timer(duration, lambda: setattr(server, "should_exit", True)) if duration > 0 else None
    for group in probes:
        group.known_queues = exporter.queues_seen
        group.start()
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        server.run(sockets=[listener])
    finally:
        if timer is not None:
            timer.cancel()
        for group in probes:
            group.stop()
        listener.close()
    return bool(server.started)
