"""Tasks of tests/test_incidents_queues.py, registered with tests/incident_app.py's app."""

from __future__ import annotations

from tests.incident_app import app  # noqa: F401 - tasks below are registered on it
