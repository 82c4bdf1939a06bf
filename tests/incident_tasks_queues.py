"""Tasks of tests/system/test_incidents_queues.py, registered with tests/incident_app.py's app.

Each run that the test must count leaves a trace on disk when it starts (one byte appended to a
log, or a marker file): the test's ground truth for "started", read without Prometheus.
"""

from __future__ import annotations

import os
import struct
import time

from tests.incident_app import app


def _mark(path: str) -> None:
    """One byte appended: the log's size is the number of runs that have started."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)


@app.task(name="iq.work")
def work(seconds: float, started_log: str) -> None:
    """The overload's unit of work: a fixed time, so a worker's drain rate is its concurrency over it."""
    _mark(started_log)
    time.sleep(seconds)


@app.task(name="iq.bulk")
def bulk(seconds: float) -> None:
    """A bulk job's item, clogging a queue it shares with urgent work."""
    time.sleep(seconds)


@app.task(name="iq.urgent")
def urgent(marker: str) -> None:
    """The urgent task stuck behind the bulk job; the marker says when it finally started."""
    _mark(marker)


@app.task(name="iq.timed")
def timed(seconds: float, started_log: str) -> None:
    """As iq.work, but the log keeps when each run started (8-byte doubles, in start order): with the
    producer's schedule (FIFO), every run's wait."""
    fd = os.open(started_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, struct.pack("d", time.time()))
    finally:
        os.close(fd)
    time.sleep(seconds)
