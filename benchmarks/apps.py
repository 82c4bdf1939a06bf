# mypy: disable-error-code="no-untyped-call,untyped-decorator"
"""The Celery app every publish and worker benchmark runs, configured from the environment.

CSX_BENCH_BROKER: broker URL. CSX_BENCH_VARIANT: `plain` (uninstrumented),
`ours` (celery_signal_exporter.instrument), `floor` (the signals ours uses on every task
connected to receivers that do nothing: what Celery's own dispatch costs,
which no signal-driven exporter can avoid), `events` (task_send_sent_event;
the worker gets -E) or `both` (instrumented and sending events, for the
exporter-cost benchmark, where both exporters watch one workload).
CSX_BENCH_METRICS_DIR: our metrics directory. CSX_BENCH_QUEUE: the queue.
CSX_BENCH_DONE_FILE: every task appends one byte to it, so the benchmark
can count finished tasks without a result backend.

As a script it is a producer: `python -m benchmarks.apps publish N` prints
`{"seconds": …, "n": N}`, the time of N `apply_async` calls after a warm-up.
"""

from __future__ import annotations

import json
import os
import sys
import time

from celery import Celery

VARIANT = os.environ.get("CSX_BENCH_VARIANT", "plain")
QUEUE = os.environ.get("CSX_BENCH_QUEUE", "bench")

app = Celery("bench", broker=os.environ.get("CSX_BENCH_BROKER", "memory://"), set_as_current=True)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_send_sent_event=VARIANT in ("events", "both"),
)
if VARIANT in ("ours", "both"):
    import celery_signal_exporter

    celery_signal_exporter.instrument(app, metrics_dir=os.environ["CSX_BENCH_METRICS_DIR"])

if VARIANT == "floor":
    from celery import signals

    def _nothing(**_: object) -> None:
        """A receiver that does nothing: Celery still dispatches to it on every task."""

    for _signal in (signals.before_task_publish, signals.after_task_publish, signals.task_received,
                    signals.task_prerun, signals.task_postrun):
        _signal.connect(_nothing, weak=False)

_done_fd: int | None = None


@app.task(name="bench.noop")
def noop(i: int = 0) -> int:
    """A trivial task: the cost measured is Celery's and the instrumentation's, not the task's."""
    global _done_fd
    if _done_fd is None:
        _done_fd = os.open(os.environ["CSX_BENCH_DONE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_done_fd, b".")
    return i


def publish(n: int) -> dict[str, float]:
    warm = max(10, min(200, n // 10))
    for i in range(warm):  # connection, routing and caches warm before the clock starts
        noop.apply_async((i,))
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        noop.apply_async((i,))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "n": n, "warm": warm}


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        print(json.dumps(publish(int(sys.argv[2]))))
    else:
        raise SystemExit("usage: python -m benchmarks.apps publish N")
