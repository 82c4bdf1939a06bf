"""celery-signal-exporter: Prometheus metrics for Celery, from Celery's signals.

In your Celery app module::

    import celery_signal_exporter
    celery_signal_exporter.instrument(app)

The package's face imports neither Celery nor the receivers: `instrument`
and `Instrumentation` are loaded on first use, so that a reader of the
metrics directory (`celery_signal_exporter.server.collect`) or the
exporter's own command starts without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery_signal_exporter._version import __version__

if TYPE_CHECKING:
    from celery_signal_exporter.recording.receivers import Instrumentation, instrument

__all__ = ["Instrumentation", "__version__", "instrument"]


def __getattr__(name: str) -> Any:
    if name in ("instrument", "Instrumentation"):
        from celery_signal_exporter.recording import receivers

        return getattr(receivers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
