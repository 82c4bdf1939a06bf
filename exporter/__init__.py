"""celery-signal-exporter: Prometheus metrics for Celery, from Celery's signals.

In your Celery app module::

    import exporter
    exporter.instrument(app)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .instrument import Instrumentation, instrument

__all__ = ["Instrumentation", "__version__", "instrument"]
