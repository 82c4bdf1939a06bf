"""Dashboards, recording rules and alerts, generated from one `Config`.

`python -m celery_signal_exporter.mixin` writes them; see docs/monitoring.md.
"""
