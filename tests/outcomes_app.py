"""The Celery app of tests/integration/test_outcomes.py: one task name per control-flow path, so every path's
balance (started = the sum of its outcomes) is read on a name of its own.

Configured from the environment: CSX_TEST_BROKER (URL), CELERY_EXPORTER_METRICS_DIR, CSX_OUTCOMES_DIR
(a directory of the test's own: the filesystem result backend, whose chords need `celery.chord_unlock`,
and the markers of runs that already rejected once). Run as a script it is a producer:
`python -m tests.outcomes_app SCENARIO [ARG…]`, printing one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, chain, chord, group, signals
from celery.canvas import Signature, StampingVisitor
from celery.exceptions import Ignore, Reject
from kombu import Queue

import celery_signal_exporter

STATE_DIR = os.environ.get("CSX_OUTCOMES_DIR", "/tmp")
QUEUE = "outcomes"

app = Celery("outcomes", broker=os.environ.get("CSX_TEST_BROKER", "memory://"),
             backend=f"file://{os.path.join(STATE_DIR, 'results')}")
app.conf.update(
    task_queues=[Queue(QUEUE)],
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_chord_retry_interval=0.5,
)
celery_signal_exporter.instrument(app, heartbeat_interval=0.5)


def _plain(name: str) -> Callable[..., Any]:
    """A task that returns what it was given, under a name of its own."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return list(args)

    run.__name__ = run.__qualname__ = name.replace(".", "_")
    return app.task(name=name)(run)


sig_target, chain_a, chain_b, group_member_r = (_plain(n) for n in ("o.sig_target", "o.chain_a", "o.chain_b",
                                                                    "o.group_member_r"))
chord_member, chord_body, group_member = (_plain(n) for n in ("o.chord_member", "o.chord_body", "o.group_member"))
link_parent, link_callback = _plain("o.link_parent"), _plain("o.link_callback")
eager_ok = _plain("o.eager_ok")
queued, stamped_queued = _plain("o.queued"), _plain("o.stamped_queued")


@app.task(name="o.replace_sig", bind=True)
def replace_sig(self: Task) -> Any:
    return self.replace(sig_target.s(1))


@app.task(name="o.replace_chain", bind=True)
def replace_chain(self: Task) -> Any:
    return self.replace(chain(chain_a.s(1), chain_b.s()))


@app.task(name="o.replace_group", bind=True)
def replace_group(self: Task) -> Any:
    return self.replace(group(group_member_r.s(1), group_member_r.s(2)))


@app.task(name="o.ignore")
def ignore() -> None:
    raise Ignore()


@app.task(name="o.reject_requeue", bind=True, acks_late=True)
def reject_requeue(self: Task) -> str:
    """Rejects its first delivery back to the queue, then succeeds."""
    marker = os.path.join(STATE_DIR, f"rejected-{self.request.id}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise Reject("first delivery", requeue=True)
    return "second delivery"


@app.task(name="o.reject_drop", acks_late=True)
def reject_drop() -> None:
    raise Reject("dropped", requeue=False)


@app.task(name="o.retry_out", bind=True, max_retries=2, default_retry_delay=0)
def retry_out(self: Task) -> None:
    raise self.retry(exc=ValueError("again"), countdown=0)


@app.task(name="o.retry_then_ok", bind=True, max_retries=2, default_retry_delay=0)
def retry_then_ok(self: Task) -> None:
    """Fails its first try, succeeds on its retry: flaky, recovered."""
    if self.request.retries == 0:
        raise self.retry(exc=ValueError("once"), countdown=0)


@app.task(name="o.autoretry", autoretry_for=(KeyError,), max_retries=2, default_retry_delay=0)
def autoretry() -> None:
    raise KeyError("again")


@app.task(name="o.fail")
def fail() -> None:
    raise ValueError("planned")


@app.task(name="o.link_error_parent")
def link_error_parent() -> None:
    raise ValueError("planned")


@app.task(name="o.errback")
def errback(task_id: str) -> str:
    """An errback of one argument: Celery publishes it as a task of its own (a run), with the failed id."""
    return task_id


@app.task(name="o.eager_fail")
def eager_fail() -> None:
    raise KeyError("eager")


@app.task(name="o.eager_retry", bind=True, max_retries=1, default_retry_delay=0)
def eager_retry(self: Task) -> None:
    raise self.retry(exc=ValueError("eager again"), countdown=0)


@app.task(name="o.eager_parent")
def eager_parent() -> None:
    """Eager runs nested inside a worker's run, propagating (apply(throw=True)) and not."""
    eager_ok.apply(throw=True)
    eager_ok.apply(throw=False)
    try:
        eager_fail.apply(throw=True)
    except KeyError:
        pass
    eager_fail.apply(throw=False)


@app.task(name="o.soft", soft_time_limit=1)
def soft() -> None:
    time.sleep(10)


@app.task(name="o.hard", time_limit=1)
def hard() -> None:
    time.sleep(10)


@app.task(name="o.hard_deaf", time_limit=1)
def hard_deaf() -> None:
    """Deaf to SIGTERM: billiard's SIGKILL, 0.1 s later, ends the run before its postrun, as it can on a
    busy machine. One outcome still: the reaper's lost run (the worker main's TimeLimitExceeded is not counted)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    time.sleep(10)


def _sleeper(name: str) -> Callable[..., Any]:
    def run(seconds: float) -> None:
        time.sleep(seconds)

    run.__name__ = run.__qualname__ = name.replace(".", "_")
    return app.task(name=name)(run)


terminated, stamped_running, victim = (_sleeper(n) for n in ("o.terminated", "o.stamped_running", "o.victim"))


class Stamp(StampingVisitor):
    """Stamps a signature with `csxo=<value>`, for revoke_by_stamped_header."""

    def __init__(self, value: str) -> None:
        self.value = value

    def on_signature(self, sig: Signature, **headers: Any) -> dict[str, Any]:
        return {"csxo": self.value}


def stamped(sig: Signature, value: str) -> Signature:
    sig.stamp(visitor=Stamp(value))
    return sig


late = _plain("o.late")


def _forget_late(**_: Any) -> None:
    """Pool processes forget o.late (as when a module fails to import there): the worker main takes the
    message, and its run fails before it starts (NotRegistered in the pool process, reported by the main)."""
    app.tasks.pop(late.name, None)


if os.environ.get("CSX_OUTCOMES_LATE"):
    signals.worker_process_init.connect(_forget_late, weak=False)


def _eager_here() -> None:
    """Eager runs in this (producer) process: task_eager_propagates on and off, and task_always_eager."""
    for propagates in (True, False):
        app.conf.task_eager_propagates = propagates
        eager_ok.apply()
        try:
            eager_fail.apply()
        except KeyError:
            pass
        try:
            eager_retry.apply()
        except Exception:  # noqa: BLE001 - propagated: the retry (Retry) or its exhaustion (ValueError)
            pass
    app.conf.task_always_eager, app.conf.task_eager_propagates = True, False
    eager_ok.delay()
    eager_fail.delay()
    app.conf.task_always_eager = False


def publish() -> dict[str, Any]:
    """Every path a worker ends by itself, and the revokes of queued runs."""
    for _ in range(5):
        replace_sig.delay()
    replace_chain.delay()
    replace_group.delay()
    ignore.delay()
    reject_requeue.delay()
    reject_drop.delay()
    retry_out.delay()
    retry_then_ok.delay()
    autoretry.delay()
    eager_parent.delay()
    chord([chord_member.s(i) for i in range(3)], chord_body.s())()
    group(group_member.s(i) for i in range(3))()
    link_parent.apply_async((1,), link=link_callback.s())
    link_error_parent.apply_async(link_error=errback.s())
    # Queued (held by the worker until due) and revoked before they start: by id, by stamped header.
    by_id = queued.apply_async(countdown=4)
    app.control.revoke(by_id.id)
    stamped(stamped_queued.s(), "queued").apply_async(countdown=4)
    app.control.revoke_by_stamped_headers({"csxo": "queued"})
    _eager_here()
    return {"queued": by_id.id}


def prefork_only() -> dict[str, Any]:
    """A run that fails before it starts (a pool process that does not know the task), and time limits."""
    late_id = late.delay().id
    soft.delay()
    hard.delay()
    hard_deaf.delay()
    return {"late": late_id}


def hard_only() -> dict[str, Any]:
    """A hard time limit alone: for the pools that enforce one without prefork's signals (gevent)."""
    hard.delay()
    return {}


def running() -> dict[str, Any]:
    """Long runs for the test to end while they run: by revoke (id, stamped header) and by SIGKILL."""
    ids = {"terminated": terminated.delay(60).id, "victim": victim.delay(60).id}
    stamped(stamped_running.s(60), "running").apply_async()
    return ids


def terminate(task_id: str) -> dict[str, Any]:
    app.control.revoke(task_id, terminate=True)
    app.control.revoke_by_stamped_headers({"csxo": "running"}, terminate=True)
    return {}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "publish": publish, "prefork_only": prefork_only, "hard_only": hard_only, "running": running,
    "terminate": terminate,
}

if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(result))
