"""Figures shared by tests/system/test_incidents_inside.py and the processes it starts (which the test
process must not import: importing an instrumented app needs a metrics directory)."""

from __future__ import annotations

# The periodic overlap: a job due every 20 s that runs 50 s (production seconds).
PRODUCTION_INTERVAL = 20.0
PRODUCTION_RUN = 50.0
PERIODIC_QUEUE = "periodic-inside"
ENTRY = "overlapping-report"
