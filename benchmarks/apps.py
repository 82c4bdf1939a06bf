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
can count finished tasks without a result backend. CSX_BENCH_STOP_PARENT=1:
the `bench.stop` task stops the worker main (its parent) instead of its own
process (prefork); CSX_BENCH_INSTRUMENT: JSON keyword arguments for
`instrument()` on top of every opt-in switch (see `feature_switches`);
CSX_BENCH_SIGNAL_CACHE=0: Celery's receiver cache off again for the per-task signals, which
`instrument()` turns on (and so does the floor, to measure the same dispatch): an experiment, see
`benchmarks.bench_instructions`; CSX_BENCH_DUE_HEADER=1:
the floor's producer adds our due header too (another).

As a script it is a producer: `python -m benchmarks.apps publish N` prints
`{"seconds": …, "n": N}`, the time of N `apply_async` calls after a warm-up;
`publish-fixed W N` publishes W + N with the warm-up fixed (the instruction
count benchmark subtracts a run of N = 0); `fill W N` queues W + N noops and
one `bench.stop`, which shuts the worker down once it reaches it; `fill-names N`
queues N tasks over 30 task names.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
from typing import Any

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


def feature_switches() -> dict[str, Any]:
    """Every opt-in switch of `instrument()` turned on: each keyword whose default is False.

    Why by signature: per-task features (CPU, memory, publish latency, …) arrive
    as `instrument()` switches, and the benchmarks must measure them the day they
    are merged without anyone editing this file. CSX_BENCH_INSTRUMENT (JSON) adds
    to or overrides them.
    """
    import celery_signal_exporter

    params = inspect.signature(celery_signal_exporter.instrument).parameters.values()
    switches: dict[str, Any] = {p.name: True for p in params
                                if p.kind is p.KEYWORD_ONLY and p.default is False}
    switches.update(json.loads(os.environ.get("CSX_BENCH_INSTRUMENT") or "{}"))
    return switches


if VARIANT in ("ours", "both"):
    import celery_signal_exporter

    celery_signal_exporter.instrument(app, metrics_dir=os.environ["CSX_BENCH_METRICS_DIR"], **feature_switches())

if VARIANT == "floor":
    from celery import signals

    from celery_signal_exporter.recording.receivers import Instrumentation, Options

    def _nothing(**_: object) -> None:
        """A receiver that does nothing: Celery still dispatches to it on every task."""

    # The signals are the ones ours connects, read from its own list (built, never connected), so the floor
    # follows every signal a new feature adds.
    for _signal, _label, _fn in Instrumentation(app, Options(os.environ["CSX_BENCH_METRICS_DIR"])).receivers():
        _signal.connect(_nothing, weak=False)
    # Dispatched as instrument() has Celery dispatch ours: with the receiver cache on.
    from celery_signal_exporter.recording.receivers import cache_receivers

    cache_receivers()

    if os.environ.get("CSX_BENCH_DUE_HEADER") == "1":
        # An experiment (benchmarks.bench_instructions): the floor's messages carry our due header too, so
        # that instrumented over floor is our receivers' bodies without what Celery does with one more header.
        from celery_signal_exporter.recording.receivers import DUE_HEADER

        def _due(headers: dict[str, Any] | None = None, **_: object) -> None:
            if headers is not None:
                headers[DUE_HEADER] = time.time()

        signals.before_task_publish.connect(_due, weak=False)

if os.environ.get("CSX_BENCH_SIGNAL_CACHE") == "0":
    # An experiment of the instruction benchmark (docs/design.md): Celery's default dispatch, without the
    # per-sender receiver cache that instrument() turns on.
    from celery_signal_exporter.recording.receivers import PER_TASK_SIGNALS

    for _cached in PER_TASK_SIGNALS:
        _cached.use_caching, _cached.sender_receivers_cache = False, {}

_done_fd: int | None = None


@app.task(name="bench.noop")
def noop(i: int = 0) -> int:
    """A trivial task: the cost measured is Celery's and the instrumentation's, not the task's."""
    global _done_fd
    if _done_fd is None:
        _done_fd = os.open(os.environ["CSX_BENCH_DONE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_done_fd, b".")
    return i


#: 30 task names, as a worker that recycles its children would meet them (the recycling benchmark).
NAMES = [f"bench.t{i:02d}" for i in range(30)]


def _named(i: int = 0) -> int:
    return int(noop.run(i))


for _name in NAMES:
    app.task(name=_name)(_named)


@app.task(name="bench.stop")
def stop() -> None:
    """The last message of a pre-filled queue: a warm shutdown of the worker, as SIGTERM asks for it."""
    os.kill(os.getppid() if os.environ.get("CSX_BENCH_STOP_PARENT") == "1" else os.getpid(), signal.SIGTERM)


def publish_fixed(warm: int, n: int) -> dict[str, float]:
    """W + N publishes; a run with N = 0 has the same start-up and warm-up, so the difference is N publishes."""
    for i in range(warm + n):
        noop.apply_async((i,))
    return {"n": n, "warm": warm}


def fill(warm: int, n: int) -> dict[str, float]:
    """Queue W + N noops and one stop for a worker to drain."""
    for i in range(warm + n):
        noop.apply_async((i,))
    stop.apply_async()
    return {"n": n, "warm": warm}


def fill_names(n: int) -> dict[str, float]:
    """Queue n tasks, the 30 names in turn."""
    for i in range(n):
        app.send_task(NAMES[i % len(NAMES)], (i,))
    return {"n": n, "warm": 0}


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
    elif sys.argv[1:2] == ["publish-fixed"]:
        print(json.dumps(publish_fixed(int(sys.argv[2]), int(sys.argv[3]))))
    elif sys.argv[1:2] == ["fill-names"]:
        print(json.dumps(fill_names(int(sys.argv[2]))))
    elif sys.argv[1:2] == ["fill"]:
        print(json.dumps(fill(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        raise SystemExit("usage: python -m benchmarks.apps publish N | publish-fixed W N | fill W N")
