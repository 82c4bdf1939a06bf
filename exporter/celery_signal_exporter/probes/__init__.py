"""Broker probes, one per file, chosen by the broker URL's scheme.

A third broker is one new module with a class that has `schemes`,
`discover`, `snapshot` and `close`, plus one line in `PROBES`.
"""

from __future__ import annotations

import re

from celery_signal_exporter.probes.base import (
    BrokerSnapshot,
    NodeStats,
    Probe,
    ProbeError,
    ProbeOptions,
    QueueStats,
)
from celery_signal_exporter.probes.rabbitmq import RabbitMQProbe
from celery_signal_exporter.probes.redis import RedisProbe
from celery_signal_exporter.redact import redact_url

__all__ = [
    "PROBES",
    "BrokerSnapshot",
    "NodeStats",
    "Probe",
    "ProbeError",
    "ProbeOptions",
    "QueueStats",
    "probe_for_url",
    "redact_url",
]

#: Probe classes in the order they are tried.
PROBES: tuple[type[RedisProbe] | type[RabbitMQProbe], ...] = (RedisProbe, RabbitMQProbe)


def probe_for_url(url: str, options: ProbeOptions | None = None) -> Probe:
    """The probe for this broker URL, picked by its scheme."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    scheme = match.group(1).lower() if match else ""
    for probe_class in PROBES:
        if scheme in probe_class.schemes:
            return probe_class(url, options)
    known = ", ".join(f"{s}://" for p in PROBES for s in p.schemes)
    raise ValueError(f"no broker probe for {redact_url(url)!r}: scheme {scheme or '(none)'!r} is not one of {known}")
