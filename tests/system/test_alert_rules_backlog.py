"""The backlog rules at production windows, on series shaped like the incidents of issue 17.

Every series is sampled every 30s and the rules run every 30s, as in
deploy/examples/prometheus.yml (the overloads also every minute, Prometheus' default). Each incident
is simulated second by second (arrivals, a pool that starts at most its capacity a second, a
prefetch buffer) and sampled, so counters, queue lengths and worker gauges agree with each other as
they do in a real worker. `promtool test rules` then says whether CeleryBacklogGrowing fires 5
minutes after the overload's onset, and has resolved 5 minutes after arrivals fell under the start
rate (while the backlog is still draining); that a long queue whose workers keep up never pages;
that the true backlog counts every waiting task once, whatever the prefetch and the broker; and
that a task waiting behind a clogged queue shows per task while it waits.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_signal_exporter.mixin.config import PRODUCTION, seconds
from celery_signal_exporter.mixin.dashboards import render
from celery_signal_exporter.mixin.dashboards import tasks as tasks_dashboard
from tests.harness import promtool
from tests.mixin_support import substitute
from tests.rules_support import NS, PROBE, RULES, WORKER, expected, ql

STEP = 30  # seconds between samples, and between rule evaluations
ONSET = 600  # the overload starts 10 minutes in, after a quiet (or balanced) history
END = 1800  # arrivals fall back after 20 minutes of overload
UNTIL = 3000
PAGE_WITHIN = 300  # the targets: page within 5m of the onset, resolve within 5m of the backlog draining
RESOLVE_WITHIN = 300
QUEUE = "poller"


@dataclass
class Run:
    """One queue sampled every STEP seconds: what the exporter and the probe would report."""

    sent: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    backlog: list[float] = field(default_factory=list)


def simulate(
    arrivals: Callable[[int], float],
    capacity: float,
    prefetch: float,
    until: int = UNTIL,
    backlog: float = 0.0,
    concurrency: int = 2,
) -> Run:
    """Arrivals a second, a pool starting at most `capacity` a second, and a worker holding up to
    `prefetch` messages it has taken off the broker but not started (reserved)."""
    run = Run()
    sent = started = 0.0
    received = min(backlog, prefetch)
    busy = 0.0
    for t in range(until + 1):
        if t % STEP == 0:
            held = min(backlog, prefetch)
            run.sent.append(sent)
            run.started.append(started)
            run.received.append(received)
            run.ready.append(backlog - held)
            run.held.append(held)
            run.running.append(busy)
            run.backlog.append(backlog)
        arriving = arrivals(t)
        sent += arriving
        before = min(backlog, prefetch)
        backlog += arriving
        starting = min(capacity, backlog)
        started += starting
        backlog -= starting
        busy = concurrency if starting else 0.0
        # The worker takes off the broker what it starts, and what tops its prefetch buffer up.
        received += starting + max(0.0, min(backlog, prefetch) - before)
    return run


def counter(values: list[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def humanize(value: float) -> str:
    """Prometheus' `humanize` for the values these tests meet (0, and 1 up to a billion)."""
    for prefix, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.4g}{prefix}"
    return f"{value:.4g}"


def at(t: int) -> str:
    return f"{t}s"


def index(t: int) -> int:
    return t // STEP


@dataclass(frozen=True)
class Broker:
    """How a queue is read: Redis (ready only, held from the workers), RabbitMQ (also unacked)."""

    name: str
    rabbitmq: bool
    held_reported: bool = True  # the workers run our worker-state gauges
    acks_late: bool = False


REDIS = Broker("redis", rabbitmq=False)
RABBITMQ = Broker("rabbitmq", rabbitmq=True)
RABBITMQ_ACKS_LATE = Broker("rabbitmq-acks-late", rabbitmq=True, acks_late=True)
RABBITMQ_NO_HELD = Broker("rabbitmq-no-held-gauges", rabbitmq=True, held_reported=False)


def series(run: Run, broker: Broker, queue: str = QUEUE, name: str = "proj.poll") -> list[tuple[str, str]]:
    """The input series a probe and a worker sidecar export for `run`."""
    vhost = "/" if broker.rabbitmq else "0"
    q = f'queue_name="{queue}"'
    out = [
        (ql("celery_queue_length", f'{PROBE}, {q}, vhost="{vhost}"'), counter(run.ready)),
        (ql("celery_task_sent_total", f'job="celery-web", {NS}, name="{name}", {q}'), counter(run.sent)),
        (ql("celery_task_received_total", f'{WORKER}, name="{name}", {q}'), counter(run.received)),
        (ql("celery_task_started_total", f'{WORKER}, name="{name}", {q}'), counter(run.started)),
        (ql("celery_task_in_progress", f'{WORKER}, name="{name}", {q}'), counter(run.running)),
    ]
    if broker.held_reported:
        out += [
            (ql("celery_worker_tasks_reserved", f'{WORKER}, hostname="celery@w1", {q}'), counter(run.held)),
            (ql("celery_worker_tasks_scheduled", f'{WORKER}, hostname="celery@w1", {q}'), counter([0] * len(run.held))),
        ]
    if broker.rabbitmq:
        # Prefetched messages are unacked; with acks_late, so are the runs in progress.
        unacked = [h + (r if broker.acks_late else 0) for h, r in zip(run.held, run.running, strict=True)]
        out.append((ql("celery_queue_unacked", f'{PROBE}, {q}, vhost="{vhost}"'), counter(unacked)))
        out.append((ql("celery_queue_consumers", f'{PROBE}, {q}, vhost="{vhost}"'), counter([1] * len(unacked))))
    return out


def true_backlog(run: Run, broker: Broker, i: int) -> float:
    """What the recorded backlog should read at sample `i`. Where workers report nothing they hold,
    RabbitMQ's unacked less the runs in progress stands in: exact with acks_late, short by the runs
    in progress with early acks (their messages are acked already)."""
    short = run.running[i] if not broker.held_reported and not broker.acks_late else 0.0
    return run.backlog[i] - short


def growing(value: float, queue: str = QUEUE) -> dict[str, Any]:
    return expected("CeleryBacklogGrowing", {"namespace": "prod", "queue_name": queue}, humanize(value))


def run_promtool(tmp_path: Path, tests: list[dict[str, Any]], evaluation_interval: str = f"{STEP}s") -> None:
    path = tmp_path / "backlog.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": evaluation_interval,
                                    "tests": tests}))
    run = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def group(inputs: list[tuple[str, str]], alert_tests: list[dict[str, Any]],
          expr_tests: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    test: dict[str, Any] = {
        "interval": f"{STEP}s",
        "input_series": [{"series": s, "values": v} for s, v in inputs],
        "alert_rule_test": alert_tests,
    }
    if expr_tests:
        test["promql_expr_test"] = expr_tests
    return test


def alert_at(t: int, firing: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": at(t), "alertname": "CeleryBacklogGrowing", "exp_alerts": firing}


def test_the_windows_under_test_are_production() -> None:
    """What this module proves holds for the committed production rules, not for a test profile."""
    assert RULES.read_text().count("deriv(queue:celery_queue_backlog:sum[60s])") == 1
    assert (PRODUCTION.backlog_growth_window, PRODUCTION.backlog_for) == ("60s", "120s")
    assert PRODUCTION.backlog_growth_ratio == 0.25 and PRODUCTION.backlog_floor == 100
    # The first evaluation that can see growth, plus `for`, plus one evaluation and one scrape of slack,
    # stays inside the 5 minutes.
    assert seconds(PRODUCTION.backlog_growth_window) + seconds(PRODUCTION.backlog_for) + 2 * STEP <= PAGE_WITHIN


def overload(rate_in: float = 15.0, before: float = 0.0) -> Callable[[int], float]:
    """`before` a second until the onset, `rate_in` a second during the overload, nothing after it."""
    return lambda t: before if t < ONSET else rate_in if t < END else 0.0


OVERLOADS = {
    # The poller of the issue: 15/s in, 10/s out, from an idle queue, Redis, prefetch 4 x 1.
    "redis-from-idle": (REDIS, simulate(overload(), capacity=10, prefetch=4)),
    # A queue already busy at its capacity (10/s in and out, 300 standing) when arrivals rise by half:
    # the start rate is high from the first second, so the bar is too.
    "redis-busy-then-1.5x": (REDIS, simulate(overload(before=10), capacity=10, prefetch=4, backlog=300)),
    # RabbitMQ, prefetch 50 x concurrency 2: ready reads 0 while the first 100 wait in the worker.
    "rabbitmq-prefetch-100": (RABBITMQ, simulate(overload(), capacity=10, prefetch=100)),
    # Unbounded prefetch (worker_prefetch_multiplier = 0): ready stays 0, everything waits in the worker.
    "rabbitmq-unbounded-prefetch": (RABBITMQ, simulate(overload(), capacity=10, prefetch=1e9)),
    # acks_late: RabbitMQ's unacked also counts the runs in progress.
    "rabbitmq-acks-late": (RABBITMQ_ACKS_LATE, simulate(overload(), capacity=10, prefetch=100)),
    # Workers without the worker-state gauges: RabbitMQ's unacked stands in for what they hold.
    "rabbitmq-no-held-gauges": (RABBITMQ_NO_HELD, simulate(overload(), capacity=10, prefetch=100)),
    # Twice the drain, a hundred times busier.
    "redis-busy-2x": (REDIS, simulate(overload(2000, before=1000), capacity=1000, prefetch=400, backlog=5000)),
}


@pytest.mark.parametrize("evaluation_interval", ["30s", "1m"])  # ours, and Prometheus' default
@pytest.mark.parametrize("shape", list(OVERLOADS))
def test_a_sustained_overload_pages_within_5m_and_resolves_within_5m_of_draining(
    tmp_path: Path, shape: str, evaluation_interval: str
) -> None:
    broker, run = OVERLOADS[shape]
    page, resolved = ONSET + PAGE_WITHIN, END + RESOLVE_WITHIN
    # Preconditions: the incident is what it claims to be.
    assert run.backlog[index(resolved)] > PRODUCTION.backlog_floor, "still draining when the page must be gone"
    if shape == "rabbitmq-unbounded-prefetch":
        assert max(run.ready) == 0 and run.held[index(page)] == run.backlog[index(page)] > 1000
    if shape == "rabbitmq-prefetch-100":
        assert run.held[index(page)] == 100 and run.ready[index(page)] == run.backlog[index(page)] - 100
    tests = [
        alert_at(ONSET, []),
        alert_at(page, [growing(true_backlog(run, broker, index(page)))]),
        alert_at(END, [growing(true_backlog(run, broker, index(END)))]),
        alert_at(resolved, []),
        alert_at(UNTIL, []),
    ]
    run_promtool(tmp_path, [group(series(run, broker), tests)], evaluation_interval)


def jittered(run: Run, amplitude: float, seed: int) -> Run:
    """The probe's reading of a bursty queue: each sample off by up to `amplitude`, never below 0."""
    rng = random.Random(seed)
    noisy = [max(0.0, r + rng.uniform(-amplitude, amplitude)) for r in run.ready]
    return Run(run.sent, run.started, run.received, noisy, run.held, run.running,
               [n + h for n, h in zip(noisy, run.held, strict=True)])


QUIET = {
    # 5 000 waiting, 50/s in and out, read with up to ±500 of noise on every sample.
    "long-steady-noisy": (REDIS, jittered(simulate(lambda t: 50, capacity=50, prefetch=8, backlog=5000), 500, 17)),
    # The same on RabbitMQ with prefetch 50 x 2 always full.
    "long-steady-prefetch": (RABBITMQ, jittered(simulate(lambda t: 50, capacity=50, prefetch=100, backlog=5000),
                                                300, 18)),
    # A bulk job left 8 000 waiting; the workers start 20/s while 10/s arrive: it drains in 13 minutes.
    "long-draining": (REDIS, simulate(lambda t: 10, capacity=20, prefetch=8, backlog=8000)),
    # A bulk enqueue: 6 000 in 60 s onto a queue that keeps up (10/s in, 20/s out), then it drains.
    "bulk-enqueue-60s": (REDIS, simulate(lambda t: 100 if ONSET <= t < ONSET + 60 else 10, capacity=20,
                                         prefetch=8)),
    # An arrival rate 1.2 x the start rate: it grows, but slower than the bar (25% of starts).
    "slightly-over": (REDIS, simulate(lambda t: 12 if t >= ONSET else 0, capacity=10, prefetch=4)),
}


@pytest.mark.parametrize("shape", list(QUIET))
def test_a_long_queue_that_keeps_up_never_pages_for_growth(tmp_path: Path, shape: str) -> None:
    broker, run = QUIET[shape]
    assert max(run.backlog) > 10 * PRODUCTION.backlog_floor  # long: way over the floor
    tests = [alert_at(t, []) for t in range(0, UNTIL + 1, STEP)]
    run_promtool(tmp_path, [group(series(run, broker), tests)])


def test_the_true_backlog_counts_each_waiting_task_once_and_drains_by_starts(tmp_path: Path) -> None:
    """Five minutes into the poller's overload, 1 500 tasks wait on every broker and prefetch: the
    recorded backlog says so, whatever share the broker counts as ready; the time to drain divides it
    by the start rate (10/s), where the broker's ready count alone reads 0 with unbounded prefetch and
    `received` (which counts a message when it is prefetched) has counted every one of them."""
    t = ONSET + PAGE_WITHIN
    inputs: list[tuple[str, str]] = []
    expect_backlog, expect_drain = [], []
    for (shape, (broker, run)) in OVERLOADS.items():
        if shape.startswith("redis-busy"):
            continue
        inputs += series(run, broker, queue=shape)
        assert run.backlog[index(t)] == 1500
        value = true_backlog(run, broker, index(t))
        assert value == (1498 if broker is RABBITMQ_NO_HELD else 1500)
        expect_backlog.append({"labels": f'queue:celery_queue_backlog:sum{{namespace="prod", queue_name="{shape}"}}',
                               "value": value})
        expect_drain.append({"labels": f'{{namespace="prod", queue_name="{shape}"}}', "value": round(value / 10)})
    unbounded = OVERLOADS["rabbitmq-unbounded-prefetch"][1]
    assert unbounded.ready[index(t)] == 0 and unbounded.received[index(t)] == 4500
    tests = [
        {"expr": "queue:celery_queue_backlog:sum", "eval_time": at(t), "exp_samples": expect_backlog},
        {"expr": "round(queue:celery_queue_drain_seconds:estimate)", "eval_time": at(t), "exp_samples": expect_drain},
        # Consumption is the start rate: 10/s on every queue, prefetch or not.
        {"expr": "round(queue:celery_task_started:rate) == 10", "eval_time": at(t),
         "exp_samples": [dict(s, value=10) for s in expect_drain]},
    ]
    run_promtool(tmp_path, [group(inputs, [], tests)])


def waiting_panel() -> dict[str, Any]:
    board = json.loads(render(tasks_dashboard(PRODUCTION)))
    (panel,) = [p for p in board["panels"] if p["title"] == "Waiting to start"]
    return panel


def test_a_task_waiting_behind_a_clogged_queue_shows_per_task_while_it_waits(tmp_path: Path) -> None:
    """A bulk job floods the shared queue (20/s onto 10/s of workers) from minute 10; an urgent task
    is sent every minute behind it and none of its runs starts for 20 minutes. Its queue-wait
    histogram has nothing to say until a run starts; the Tasks "Waiting to start" panel shows, for the
    urgent task itself, how many of its runs wait and how long the queue's head has waited."""
    clog_until = ONSET + 1200
    t = clog_until - STEP
    samples = range(0, UNTIL + 1, STEP)
    bulk = simulate(lambda s: 20 if ONSET <= s < clog_until else 0, capacity=10, prefetch=4)
    # The urgent task: one publish a minute throughout; before the clog each run starts within seconds.
    urgent_sent = [float(s // 60) for s in samples]
    urgent_started = [float(min(s, ONSET) // 60) for s in samples]
    # The broker's head: due since the clog began (FIFO: the oldest bulk message waits longest).
    head_age = [float(max(0, s - ONSET) // 2) for s in samples]
    shared = 'queue_name="shared"'
    inputs = [
        *series(bulk, REDIS, queue="shared", name="proj.bulk"),
        (ql("celery_task_sent_total", f'job="celery-web", {NS}, name="proj.urgent", {shared}'), counter(urgent_sent)),
        (ql("celery_task_started_total", f'{WORKER}, name="proj.urgent", {shared}'), counter(urgent_started)),
        (ql("celery_queue_oldest_message_age_seconds", f'{PROBE}, {shared}, vhost="0"'), counter(head_age)),
        # A task in a queue that flows: sent and started alike, nothing waits.
        (ql("celery_task_sent_total", f'job="celery-web", {NS}, name="proj.fine", queue_name="fast"'),
         f"0+30x{len(samples) - 1}"),
        (ql("celery_task_started_total", f'{WORKER}, name="proj.fine", queue_name="fast"'),
         f"0+30x{len(samples) - 1}"),
        (ql("celery_queue_oldest_message_age_seconds", f'{PROBE}, queue_name="fast", vhost="0"'),
         f"0x{len(samples) - 1}"),
    ]
    panel = waiting_panel()
    count_expr, age_expr = (substitute(target["expr"]) for target in panel["targets"])
    assert count_expr.startswith("task:celery_task_waiting:estimate{")
    urgent = {"namespace": "prod", "name": "proj.urgent", "queue_name": "shared"}

    def labels(**extra: str) -> str:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in {**urgent, **extra}.items()) + "}"

    waited = (t - ONSET) // 60  # urgent runs sent since the clog began, none started
    tests = [
        # While it waits: the urgent task's own count, from its publishes and starts.
        {"expr": f"round({count_expr})", "eval_time": at(t), "exp_samples": [
            {"labels": labels(), "value": waited},
            {"labels": '{namespace="prod", name="proj.bulk", queue_name="shared"}',
             "value": round(bulk.backlog[index(t)])},
            {"labels": '{namespace="prod", name="proj.fine", queue_name="fast"}', "value": 0},
        ]},
        # ... and, per task, how long the head of its queue has waited: 0 where nothing waits.
        {"expr": age_expr, "eval_time": at(t), "exp_samples": [
            {"labels": labels(), "value": head_age[index(t)]},
            {"labels": '{namespace="prod", name="proj.bulk", queue_name="shared"}', "value": head_age[index(t)]},
            {"labels": '{namespace="prod", name="proj.fine", queue_name="fast"}', "value": 0},
        ]},
        # The queue-wait quantiles have nothing for it: no run of it started.
        {"expr": 'queue:celery_task_queue_wait_seconds:quantile{queue_name="shared"}', "eval_time": at(t),
         "exp_samples": []},
        # Before the clog nothing waited.
        {"expr": f"round({count_expr}) > 0", "eval_time": at(ONSET), "exp_samples": []},
    ]
    run_promtool(tmp_path, [group(inputs, [], tests)])


def test_the_waiting_panel_reads_the_recorded_series_and_puts_ages_on_their_own_axis() -> None:
    panel = waiting_panel()
    assert [t["refId"] for t in panel["targets"]] == ["A", "B"]
    assert "task:celery_task_waiting:estimate" in panel["targets"][1]["expr"]
    assert "celery_queue_oldest_message_age_seconds" in panel["targets"][1]["expr"]
    (override,) = panel["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byFrameRefID", "options": "B"}
    assert {p["id"]: p["value"] for p in override["properties"]} == {"unit": "s", "custom.axisPlacement": "right"}
