"""Dashboards, recording rules and alerts, generated from one `Config`.

`python -m exporter.mixin` writes them; see docs/monitoring.md.
"""
