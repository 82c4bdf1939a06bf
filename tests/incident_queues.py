"""The queue incidents' rig: a private Redis, workers, pollers publishing at planned rates, and how
pages are timed against production seconds (tests/system/test_incidents_queues.py and _objectives.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.harness import ROOT, wait_until
from tests.incident_stack import (
    K,
    Stack,
)

# The overload, in production rates (module docstring): 15 tasks/s arrive, 2 slots x 0.2 s drain 10/s.
RUNTIME = 0.2
APP = "tests.incident_app"


#: How long past a target we keep waiting, so a late page is measured for the table, not just missed.
LATE = 60.0


def prod(suite_seconds: float) -> float:
    return suite_seconds * K


def suite(production_seconds: float) -> float:
    return production_seconds / K


@dataclass
class Rig:
    """One broker's worth of stack: where workers write, what they are told, and what watches them."""

    tmp: str
    env: dict[str, str]
    stack: Stack


class Poller:
    """A real producer process (tests/incident_poller_queues.py) and what it reports."""

    def __init__(self, r: Rig, queue: str, plan: list[dict[str, Any]]) -> None:
        self.state = os.path.join(r.tmp, f"poller-{queue}-{uuid.uuid4().hex[:6]}")
        os.makedirs(self.state)
        self.log = open(os.path.join(self.state, "log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.incident_poller_queues", queue, json.dumps(plan),
                                      self.state], cwd=ROOT, env=r.env, stdout=self.log, stderr=subprocess.STDOUT)

    def sent(self) -> int:
        try:
            with open(os.path.join(self.state, "sent")) as f:
                return int(f.read())
        except FileNotFoundError:
            return 0

    def step_began(self, index: int, timeout: float = 60) -> float:
        """The UNIX time step `index` of the plan began (waiting for it)."""
        def began() -> float | None:
            if self.proc.poll() not in (None, 0):
                raise AssertionError(f"the poller exited {self.proc.returncode}: {self.output()}")
            try:
                with open(os.path.join(self.state, "steps")) as f:
                    for line in f:
                        step = json.loads(line)
                        if step["step"] == index:
                            return float(step["at"])
            except FileNotFoundError:
                pass
            return None

        at = wait_until(began, timeout, f"the poller to begin step {index}", interval=0.05)
        assert at is not None
        return at

    def wait(self, timeout: float = 120) -> None:
        self.proc.wait(timeout)
        assert self.proc.returncode == 0, self.output()

    def output(self) -> str:
        with open(os.path.join(self.state, "log"), encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextmanager
def poller(r: Rig, queue: str, plan: list[dict[str, Any]]) -> Iterator[Poller]:
    p = Poller(r, queue, plan)
    try:
        yield p
    finally:
        p.stop()


def started(log: str) -> int:
    """Runs of iq.work that have begun: one byte each."""
    try:
        return os.path.getsize(log)
    except FileNotFoundError:
        return 0


def work(log: str, rate: float, duration: float | None = None) -> dict[str, Any]:
    """A poller step publishing iq.work at `rate` per second, for `duration` seconds or until stopped."""
    step: dict[str, Any] = {"task": "iq.work", "args": [RUNTIME, log], "rate": rate}
    if duration is not None:
        step["seconds"] = duration
    return step


def first_page(stack: Stack, names: tuple[str, ...], since: float, within: float,
               each: Callable[[], None] = lambda: None, **labels: str) -> tuple[str, dict[str, Any]] | None:
    """The first of our `names` to reach the pager after `since`, waiting `within` production
    seconds and LATE more; `each` runs on every poll (sampling the incident while it lasts)."""
    deadline = since + suite(within + LATE)
    while True:
        each()
        found = [(a["_received"], name, a) for name in names for a in stack.pages(name, since, **labels)]
        if found:
            _, name, alert = min(found, key=lambda f: f[0])
            return name, alert
        if time.time() > deadline:
            return None
        time.sleep(0.25)


def page_after(stack: Stack, alertname: str, onset: float, ruleset: str = "ours", **labels: str) -> float | None:
    """Production seconds from onset to the page, or None if none came within the incident."""
    found = stack.pages(alertname, onset, ruleset=ruleset, **labels)
    return round(prod(min(a["_received"] for a in found) - onset)) if found else None


def anchor_page(stack: Stack, alertname: str, onset: float, **labels: str) -> float | None:
    return page_after(stack, alertname, onset, ruleset="anchor", **labels)


