# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""Instructions of one piece of the per-task path, in a tight loop under callgrind: for attribution.

The whole-run benchmark (bench_instructions) says how much a task costs; it cannot say which part
of ours, since callgrind sees Python frames only as the interpreter's C functions. Here each case
is one piece called as Celery calls it, in a fresh process, N times minus 0 times.

    python -m benchmarks.bench_bodies [N] [CASE…]     (prints instructions per call for each case)
    python -m benchmarks.bench_bodies --run CASE N    (the loop itself, run under callgrind)

Cases: `dispatch_*` send the signals to a receiver that does nothing (the floor's dispatch),
`dispatch_*_cached` the same with the receiver cache ours turns on (`receivers.cache_receivers`);
`ours_*` call our receivers directly (bodies only, every opt-in switch on); `*_push` is the loop's
own request push and pop, subtracted from the pool-side cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from benchmarks.bench_instructions import instructions, valgrind
from benchmarks.common import ROOT, SHM, child_env

CASES = ("dispatch_publish", "dispatch_publish_cached", "ours_publish", "dispatch_received",
         "dispatch_received_cached", "ours_received", "push", "dispatch_pool", "dispatch_pool_cached",
         "ours_pool", "ours_pool_no_resources")


def _headers() -> dict[str, Any]:
    return {"lang": "py", "task": "b.t", "id": "x", "eta": None, "expires": None, "retries": 0, "root_id": "x",
            "parent_id": None, "group": None}


def loop(case: str, n: int) -> None:
    """Set up `case` and run it n times (n = 0: set up only, and one warm-up call as in every case)."""
    from celery import Celery, signals

    import celery_signal_exporter
    from celery_signal_exporter.recording import receivers as r

    app = Celery("bodies", broker="memory://", set_as_current=False)
    tmp = tempfile.mkdtemp(prefix="csx-bodies-", dir=SHM)
    switches = case != "ours_pool_no_resources"
    inst = celery_signal_exporter.instrument(app, metrics_dir=tmp, task_resources=switches, publish_timing=switches)
    ours = {label: fn for _, label, fn in inst.receivers()}
    if case.startswith("dispatch"):
        # Ours disconnected, a receiver that does nothing on the same signals: the floor.
        for signal, label, _ in inst.receivers():
            signal.disconnect(dispatch_uid=f"celery_signal_exporter.{label}")

        def nothing(**_: object) -> None:
            pass

        for signal, _, _ in inst.receivers():
            signal.connect(nothing, weak=False)
            if not case.endswith("_cached"):  # instrument() turned the cache on: Celery's default again
                signal.use_caching, signal.sender_receivers_cache = False, {}

    @app.task(name="b.t", shared=False)
    def noop() -> None:
        return None

    task = app.tasks[noop.name]  # the task itself, as a worker has it, not the decorator's lazy proxy

    message = SimpleNamespace(delivery_info={"exchange": "", "routing_key": "q", "consumer_tag": None})

    class Consumer:
        pass

    consumer = Consumer()
    due = time.time()
    push = {r.QUEUE_HEADER: "q", r.DUE_HEADER: due}
    before, after = signals.before_task_publish.send, signals.after_task_publish.send
    received, prerun, postrun = signals.task_received.send, signals.task_prerun.send, signals.task_postrun.send

    def one() -> None:
        if case.startswith("dispatch_publish"):
            h = _headers()
            before(sender="b.t", body=(), exchange="", routing_key="q", declare=[], headers=h, properties={},
                   retry_policy={})
            after(sender="b.t", body=(), headers=h, exchange="", routing_key="q")
        elif case == "ours_publish":
            h = _headers()
            ours["before_task_publish"](sender="b.t", body=(), exchange="", routing_key="q", declare=[], headers=h,
                                        properties={}, retry_policy={})
            ours["after_task_publish"](sender="b.t", body=(), headers=h, exchange="", routing_key="q")
        elif case.startswith("dispatch_received"):
            received(sender=consumer, request=SimpleNamespace(name="b.t", message=message, request_dict={}))
        elif case == "ours_received":
            ours["task_received"](sender=consumer, request=SimpleNamespace(name="b.t", message=message,
                                                                           request_dict={}))
        elif case == "push":
            task.push_request(id="x", delivery_info=message.delivery_info, **push)
            task.pop_request()
        elif case.startswith("dispatch_pool"):
            task.push_request(id="x", delivery_info=message.delivery_info, **push)
            prerun(sender=task, task_id="x", task=task, args=(), kwargs={})
            postrun(sender=task, task_id="x", task=task, args=(), kwargs={}, retval=None, state="SUCCESS")
            task.pop_request()
        elif case.startswith("ours_pool"):
            task.push_request(id="x", delivery_info=message.delivery_info, **push)
            ours["task_prerun"](sender=task, task_id="x", task=task, args=(), kwargs={})
            ours["task_postrun"](sender=task, task_id="x", task=task, args=(), kwargs={}, retval=None,
                                 state="SUCCESS")
            task.pop_request()
        else:
            raise SystemExit(f"unknown case {case}")

    one()  # first use: series bound, files made
    for _ in range(n):
        one()
    shutil.rmtree(tmp, ignore_errors=True)


def measure(case: str, n: int) -> float:
    """Instructions per call: a run of n minus a run of 0, over n."""
    got = []
    for k in (n, 0):
        with tempfile.TemporaryDirectory(prefix="csx-bodies-cg-", dir=SHM) as out:
            path = os.path.join(out, "cg.out")
            subprocess.run([*valgrind(), f"--callgrind-out-file={path}", sys.executable, "-m",
                            "benchmarks.bench_bodies", "--run", case, str(k)], cwd=ROOT,
                           env=child_env(PYTHONHASHSEED="0"), capture_output=True, check=True, timeout=600)
            got.append(instructions(path))
    return (got[0] - got[1]) / n


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        loop(sys.argv[2], int(sys.argv[3]))
    else:
        count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
        for c in sys.argv[2:] or CASES:
            print(f"{c}: {measure(c, count):,.0f} instructions a call", flush=True)
