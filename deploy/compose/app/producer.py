"""Publishes a steady, bursty mix of the demo tasks forever, so queues fill
and drain and the alert rules have something to judge. Runs in the compose
stack's `producer` service.
"""

from __future__ import annotations

import random
import time

from demo_tasks import add, flaky, retrying, slow


def send_round(rng: random.Random, burst: bool) -> int:
    """One round of work; a burst sends ten times the slow tasks."""
    for _ in range(10):
        add.delay(rng.randint(0, 9), rng.randint(0, 9))
    for _ in range(10 if burst else 1):
        slow.delay(round(rng.uniform(0.1, 2.0), 2))
    flaky.delay(0.2)
    retrying.delay()
    return 12 + (10 if burst else 1)


def main() -> None:
    rng = random.Random()
    sent = 0
    while True:
        sent += send_round(rng, burst=rng.random() < 0.05)
        if sent % 1000 < 25:
            print(f"producer: {sent} tasks sent", flush=True)
        time.sleep(1.0)


if __name__ == "__main__":
    main()
