"""The incident suite's producer (tests/system/test_incidents_queues.py): a real, instrumented process
publishing a plan of steps through tests/incident_app.py's app.

    python -m tests.incident_poller_queues QUEUE PLAN_JSON STATE_DIR

PLAN_JSON is a list of steps, each {"task": name, "args": [...], "rate": per second, "seconds": s}
(a steady poller; no "seconds" means until SIGTERM) or {"task": name, "args": [...], "count": n}
(a burst, published as fast as the broker takes it). Publishing keeps to an absolute schedule, so
a slow moment is caught up and the rate holds on average. STATE_DIR receives `steps` (one JSON
line per step: its index and the UNIX time it began) and `sent` (messages published so far).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from tests.incident_app import app

_stop = False


def _on_term(signum: int, frame: Any) -> None:
    global _stop
    _stop = True


def _write(path: str, text: str) -> None:
    """Replaced whole, so a reader never sees a half-written count."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def run(queue: str, plan: list[dict[str, Any]], state: str) -> int:
    sent = 0
    for index, step in enumerate(plan):
        if _stop:
            break
        began = time.time()
        with open(os.path.join(state, "steps"), "a") as f:
            f.write(json.dumps({"step": index, "at": began}) + "\n")
        count = step.get("count")
        rate = float(step.get("rate", 0))
        seconds = step.get("seconds")
        n = 0
        while not _stop:
            if count is not None:
                if n >= count:
                    break
            else:
                due = began + n / rate
                if seconds is not None and due >= began + float(seconds):
                    break
                pause = due - time.time()
                if pause > 0:
                    time.sleep(pause)
                    if _stop:
                        break
            app.send_task(step["task"], args=step.get("args", []), queue=queue)
            n += 1
            sent += 1
            _write(os.path.join(state, "sent"), str(sent))
    return sent


def main() -> None:
    signal.signal(signal.SIGTERM, _on_term)
    queue, plan, state = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    sent = run(queue, plan, state)
    print(json.dumps({"sent": sent}), flush=True)


if __name__ == "__main__":
    main()
