"""One wiring for `serve` and `demo`: broker probes, the exporter and its HTTP server.

The two commands used to assemble these each in their own way, so a change
(compaction, TLS, connection limits, probe options) had to be made twice and
could drift. Both now describe what they want in one `ServeConfig` and let
this module build and run it.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from typing import Any

import uvicorn

from celery_signal_exporter.probes import OptionError, ProbeOptions, probe_for_url, probe_settings
from celery_signal_exporter.redact import redact_url, scrub
from celery_signal_exporter.server._http import release_freed_memory, server_options
from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.probe_loop import ProbeGroup, ProbeLoop
from celery_signal_exporter.server.service import Exporter, create_app


def build_probes(config: ServeConfig) -> list[ProbeGroup]:
    """One group holding a loop per broker URL (none without URLs).

    Each network call gets half the cycle timeout, so that a call and its one
    reconnect attempt still end inside the cycle and nothing stays stuck.
    Raises `OptionError` naming the option at fault, with every secret of the
    URLs removed, so the caller can print it as one line.
    """
    if not config.broker_urls:
        return []
    options = ProbeOptions(timeout=config.probe_timeout / 2, transport_options=config.transport_options,
                           settings=probe_settings(config.probe_values))
    loops = []
    for url in config.broker_urls:
        try:
            loops.append(ProbeLoop(probe_for_url(url, options), url, config))
        except ValueError as exc:
            message = scrub(str(exc), *config.broker_urls)
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
    exporter = Exporter(config, probes)
    if config.metrics_dir is not None and config.compact_interval > 0:
        exporter.start_compaction(config.compact_interval)
    web = config.web_config
    tls: dict[str, Any] = {}
    if web.tls is not None:
        tls = {"ssl_certfile": web.tls.cert_file, "ssl_keyfile": web.tls.key_file,
               "ssl_ca_certs": web.tls.client_ca_file, "ssl_cert_reqs": web.tls.cert_reqs}
    limits = server_options(config.header_timeout, config.send_timeout, config.max_connections)
    level = config.log_level.lower()
    server = uvicorn.Server(uvicorn.Config(create_app(exporter, users=web.users), host=config.host,
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
