"""celery-signal-exporter: Prometheus metrics for Celery, from Celery's signals.

In your Celery app module::

    import celery_signal_exporter
    celery_signal_exporter.instrument(app)

The package's face imports neither Celery nor the receivers: `instrument`
and `Instrumentation` are loaded on first use, so that a reader of the
metrics directory (`celery_signal_exporter.store`, `.collect`) or the
exporter's own command starts without them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("celery-signal-exporter")  # one source: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from celery_signal_exporter.receivers import Instrumentation, instrument

__all__ = ["Instrumentation", "__version__", "instrument"]


def __getattr__(name: str) -> Any:
    if name in ("instrument", "Instrumentation"):
        from celery_signal_exporter import receivers

        return getattr(receivers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
