"""The `celery beat` of tests/system/test_incidents_inside.py: one entry whose runs outlast its interval.

Production: a job due every 20 s that runs 50 s; scaled by K: due every 1 s, runs 2.5 s. Its
runs are `inside.steady`, which the suite's workers (tests/incident_app.py) run; beat only sends
by name. The heartbeat and the schedule refresh are scaled like every other cadence.
Configured from the environment: CSX_TEST_BROKER, CELERY_EXPORTER_METRICS_DIR.
"""

from __future__ import annotations

import os

from celery import Celery

import celery_signal_exporter
from tests.incident_plan_inside import ENTRY, PERIODIC_QUEUE, PRODUCTION_INTERVAL, PRODUCTION_RUN
from tests.incident_stack import HEARTBEAT, K

PRODUCTION_SCHEDULE_REFRESH = 30.0  # instrument()'s default

app = Celery("incident-beat", broker=os.environ.get("CSX_TEST_BROKER", "memory://"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={ENTRY: {"task": "inside.steady", "schedule": PRODUCTION_INTERVAL / K,
                           "args": (PRODUCTION_RUN / K,), "options": {"queue": PERIODIC_QUEUE}}},
)
celery_signal_exporter.instrument(app, heartbeat_interval=HEARTBEAT,
                                  schedule_refresh=PRODUCTION_SCHEDULE_REFRESH / K)
