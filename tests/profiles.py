"""The end-to-end tests' profile: the production rules with seconds-long windows.

Not `scaled(PRODUCTION, K)` (mixin/config.py), which divides every duration by the same K: a real
Prometheus must see a backlog grow within a minute (rate windows about 10 times shorter than
production) while beat's entries are due every few seconds (its windows 100 to 300 times
shorter), which no single K gives. tests/test_mixin.py checks that only durations, numbers and
the job selector differ from the production expressions.
"""

from __future__ import annotations

import dataclasses

from celery_signal_exporter.mixin.config import PRODUCTION, Config


def short_profile() -> Config:
    """Short windows for the end-to-end tests: same rules, minutes become seconds."""
    return dataclasses.replace(
        PRODUCTION,
        selector='job=~"celery.*"',
        rate_window="30s",
        predict_window="1m",
        failure_window="1m",
        backlog_floor=20,
        backlog_for="20s",
        backlog_breach_for="20s",
        drain_for="20s",
        oldest_message_for="20s",
        no_consumers_for="30s",
        broker_memory_for="20s",
        broker_memory_predict_for="20s",
        broker_alarm_for="0s",
        broker_down_for="20s",
        exporter_down_for="20s",
        worker_down_for="20s",
        failure_for="20s",
        expiring_for="0s",
        beat_down_for="3s",
        beat_seen_window="10m",
        periodic_missed_grace="3s",
        periodic_lookback="10m",
        periodic_window="10s",
        periodic_start_lag="3s",
        stuck_for="0s",
    )
