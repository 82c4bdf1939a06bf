"""A producer process of tests/system/test_incidents_inside.py: publishes on a schedule, instrumented
like a user's web pod (its sends and publish times land in the metrics directory).

    python -m tests.incident_producer_inside '<plan JSON>'

The plan is a list of steps, each {"task", "args", "queue", "count", "every", "expires"?}: `count`
sends of `task`, `every` seconds apart (already scaled by the caller). Steps run one after another;
prints {"sent": n} when done.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tests.incident_app import app


def run(plan: list[dict[str, Any]]) -> int:
    sent = 0
    for step in plan:
        for _ in range(int(step["count"])):
            due = time.monotonic() + float(step["every"])
            options: dict[str, Any] = {"queue": step["queue"]}
            if step.get("expires") is not None:
                options["expires"] = float(step["expires"])
            app.send_task(step["task"], args=step.get("args", []), **options)
            sent += 1
            time.sleep(max(0.0, due - time.monotonic()))
    return sent


if __name__ == "__main__":
    print(json.dumps({"sent": run(json.loads(sys.argv[1]))}))
