"""Tasks of tests/system/test_incidents_inside.py, registered with tests/incident_app.py's app.

Durations are already scaled by the caller (production seconds / K); each task does what its
incident needs and nothing else.
"""

from __future__ import annotations

import time

from tests.incident_app import app

#: Memory the RAM-hungry task keeps, as a leak would: held by the pool process across runs.
_HOARD: list[bytearray] = []


@app.task(name="inside.steady")
def steady(seconds: float) -> None:
    """A task whose runtime the caller sets: its baseline, then double."""
    time.sleep(seconds)


@app.task(name="inside.stuck", time_limit=3.0)
def stuck(seconds: float) -> None:
    """Runs far past its hard time limit (production 60 s, here 3 s) where the pool does not
    enforce it (the threads pool), as a run blocked in a call no signal interrupts would."""
    time.sleep(seconds)


@app.task(name="inside.hungry")
def hungry(mebibytes: int) -> None:
    """Keeps `mebibytes` more of resident memory each run, touched so that it counts."""
    block = bytearray(mebibytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _HOARD.append(block)


@app.task(name="inside.tick")
def tick() -> None:
    """A recurring task sent with `expires`: the TTL and first-expiry incidents."""
