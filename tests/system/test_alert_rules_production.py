"""The committed production rules at production windows (30 s scrape and evaluation, every threshold
as `PRODUCTION` has it), on series shaped like real incidents: the backlog rules first, then the
memory alarm, message TTL and slower-than-yesterday pages.

The backlog rules:

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
from tests.rules_support import DROPPED_AND_SLOWER_CASES, NS, PROBE, RULES, WORKER, expected, ql

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


def samples(values: list[float]) -> str:
    """Gauge or counter samples, one per step, as promtool reads them."""
    return " ".join(f"{v:g}" for v in values)


def humanize(value: float) -> str:
    """Prometheus' `humanize` for the values these tests meet (0, and 1 up to a billion)."""
    for prefix, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.4g}{prefix}"
    return f"{value:.4g}"


def at(t: float) -> str:
    """A promtool eval_time in whole seconds."""
    return f"{int(t)}s"


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
        (ql("celery_queue_length", f'{PROBE}, {q}, vhost="{vhost}"'), samples(run.ready)),
        (ql("celery_task_sent_total", f'job="celery-web", {NS}, name="{name}", {q}'), samples(run.sent)),
        (ql("celery_task_received_total", f'{WORKER}, name="{name}", {q}'), samples(run.received)),
        (ql("celery_task_started_total", f'{WORKER}, name="{name}", {q}'), samples(run.started)),
        (ql("celery_task_in_progress", f'{WORKER}, name="{name}", {q}'), samples(run.running)),
    ]
    if broker.held_reported:
        out += [
            (ql("celery_worker_tasks_reserved", f'{WORKER}, hostname="celery@w1", {q}'), samples(run.held)),
            (ql("celery_worker_tasks_scheduled", f'{WORKER}, hostname="celery@w1", {q}'), samples([0] * len(run.held))),
        ]
    if broker.rabbitmq:
        # Prefetched messages are unacked; with acks_late, so are the runs in progress.
        unacked = [h + (r if broker.acks_late else 0) for h, r in zip(run.held, run.running, strict=True)]
        out.append((ql("celery_queue_unacked", f'{PROBE}, {q}, vhost="{vhost}"'), samples(unacked)))
        out.append((ql("celery_queue_consumers", f'{PROBE}, {q}, vhost="{vhost}"'), samples([1] * len(unacked))))
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
    times = range(0, UNTIL + 1, STEP)
    bulk = simulate(lambda s: 20 if ONSET <= s < clog_until else 0, capacity=10, prefetch=4)
    # The urgent task: one publish a minute throughout; before the clog each run starts within seconds.
    urgent_sent = [float(s // 60) for s in times]
    urgent_started = [float(min(s, ONSET) // 60) for s in times]
    # The broker's head: due since the clog began (FIFO: the oldest bulk message waits longest).
    head_age = [float(max(0, s - ONSET) // 2) for s in times]
    shared = 'queue_name="shared"'
    inputs = [
        *series(bulk, REDIS, queue="shared", name="proj.bulk"),
        (ql("celery_task_sent_total", f'job="celery-web", {NS}, name="proj.urgent", {shared}'), samples(urgent_sent)),
        (ql("celery_task_started_total", f'{WORKER}, name="proj.urgent", {shared}'), samples(urgent_started)),
        (ql("celery_queue_oldest_message_age_seconds", f'{PROBE}, {shared}, vhost="0"'), samples(head_age)),
        # A task in a queue that flows: sent and started alike, nothing waits.
        (ql("celery_task_sent_total", f'job="celery-web", {NS}, name="proj.fine", queue_name="fast"'),
         f"0+30x{len(times) - 1}"),
        (ql("celery_task_started_total", f'{WORKER}, name="proj.fine", queue_name="fast"'),
         f"0+30x{len(times) - 1}"),
        (ql("celery_queue_oldest_message_age_seconds", f'{PROBE}, queue_name="fast", vhost="0"'),
         f"0x{len(times) - 1}"),
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

# --- The other incidents of the same kind (a flapping memory alarm, a message TTL, a task slower than
# yesterday): annotations are stripped from a copy of the rule file (test_alert_rules.py checks them);
# here only which alert fires for which series, and when, matters. Each case asserts the page is firing
# by its target after the onset, and that healthy series beside it stay quiet the whole time.

def stepped(*parts: tuple[float, int], start: float = 0.0) -> str:
    """A counter's samples, one per step, as promtool reads them: `parts` are (increase per step,
    steps), one after the other; each part continues from where the last one ended."""
    out, value = [], start
    out.append(f"{value:g}")
    for per_step, steps in parts:
        out.append(f"{value + per_step:g}+{per_step:g}x{steps - 1}")
        value += per_step * steps
    return " ".join(out)




def check_stripped(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    stripped = tmp_path / "celery-rules.yml"
    stripped.write_text(yaml.safe_dump(rules))
    spec = tmp_path / "incidents.test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(stripped)], "evaluation_interval": f"{STEP}s",
                                    "tests": tests}))
    run = subprocess.run([promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def firing(alert: str, severity: str, *labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"exp_labels": {"namespace": "prod", **each, "severity": severity}} for each in labels]


def test_a_flapping_memory_alarm_pages_within_two_minutes(tmp_path: Path) -> None:
    """Set and cleared 6 times a minute, 2-6 s each (3, 2, 5, 4, 6, 2 s, one burst every 10 s): the
    probe checks the alarm every second (`--rabbitmq-alarm-interval`) and counts the checks that found
    it raised, so every burst adds to the counter whatever the scrapes see. Counted pessimistically
    here: a burst of b seconds caught by b - 1 checks, and the onset just after a scrape, so the first
    step holds only the first two bursts (2 + 1 checks, exactly `broker_alarm_samples`). A steady
    alarm pages too; an alarm of a second caught by one check, one of two seconds caught by two, and
    a healthy node never page; the page ends once the alarm has stayed clear for the whole window."""
    onset = 10 * 60
    flap_for = 20 * 60
    steps = 40 * 60 // STEP
    before = onset // STEP
    per_minute = [b - 1 for b in (3, 2, 5, 4, 6, 2)]  # checks that found each burst raised
    first, second = sum(per_minute[:2]), sum(per_minute[2:])
    flap_steps = flap_for // STEP
    increments = [0] * before + [first if i % 2 == 0 else second for i in range(flap_steps)]
    increments += [0] * (steps - len(increments))
    assert first == PRODUCTION.broker_alarm_samples  # the first step alone reaches the threshold
    flapping = [float(sum(increments[:i])) for i in range(steps + 1)]
    one_check = [0.0] * (before + 1) + [1.0] * (steps - before)
    two_checks = [0.0] * (before + 1) + [2.0] * (steps - before)
    checks = "celery_broker_memory_alarm_raised_checks_total"
    amqp = 'broker="amqp://a:5672//"'
    series = [
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@flap"}}', "values": samples(flapping)},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@steady"}}',
         "values": stepped((0, before), (30, steps - before))},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@one"}}', "values": samples(one_check)},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@two"}}', "values": samples(two_checks)},
        {"series": f'{checks}{{{PROBE}, {amqp}, node="rabbit@ok"}}', "values": f"0x{steps}"},
    ]
    both = firing("CeleryBrokerMemoryAlarm", "critical", {"broker": "amqp://a:5672//", "node": "rabbit@flap"},
                  {"broker": "amqp://a:5672//", "node": "rabbit@steady"})
    steady = firing("CeleryBrokerMemoryAlarm", "critical", {"broker": "amqp://a:5672//", "node": "rabbit@steady"})
    quiet_before = [at(t) for t in range(STEP, onset, 5 * STEP)]
    window = seconds(PRODUCTION.broker_alarm_window)
    check_stripped(tmp_path, [{
        "interval": f"{STEP}s",
        "input_series": series,
        "alert_rule_test": [
            *({"eval_time": t, "alertname": "CeleryBrokerMemoryAlarm", "exp_alerts": []} for t in quiet_before),
            # The target: firing at the first evaluation after the first scrape that follows the onset
            # (Alertmanager's group_wait of 30 s then delivers it within 2 minutes), and still firing
            # while it flaps.
            *({"eval_time": at(onset + t), "alertname": "CeleryBrokerMemoryAlarm", "exp_alerts": both}
              for t in (STEP, 2 * STEP, 120, 300, 900, flap_for - STEP)),
            # Clear for a whole window: the flapping node's page resolves; the steady one stays.
            {"eval_time": at(onset + flap_for + window + STEP), "alertname": "CeleryBrokerMemoryAlarm",
             "exp_alerts": steady},
        ],
    }])


def test_tasks_a_message_ttl_drops_page_within_ten_minutes(tmp_path: Path) -> None:
    """A recurring task sent every 30 s whose `expires` makes RabbitMQ drop every other message from the
    onset on (27 of 55 in the incident); one expired message still reaches a worker (revoked). Beside it
    a healthy task, and a task whose shared queue really grows (its unreceived messages wait, counted by
    the queue length), neither of which may page."""
    onset = 10 * 60
    steps = 60 * 60 // STEP
    before = onset // STEP
    after = steps - before
    sent = stepped((1, steps))
    # Received: every message before the onset; from it, every other one (the rest expired on the broker).
    received_values = [float(i) for i in range(before + 1)]
    for i in range(after):
        received_values.append(received_values[-1] + (1 if i % 2 else 0))
    revoked = [0.0] * (before + 8) + [1.0] * (after - 7)
    s = "celery_task_sent_total"
    r = "celery_task_received_total"
    series = [
        {"series": f'{s}{{{WORKER}, name="t.tick", queue_name="periodic"}}', "values": sent},
        {"series": f'{r}{{{WORKER}, name="t.tick", queue_name="periodic"}}', "values": samples(received_values)},
        {"series": f'celery_task_revoked_total{{{WORKER}, name="t.tick", queue_name="periodic", reason="expired"}}',
         "values": samples(revoked)},
        {"series": f'celery_queue_length{{{PROBE}, queue_name="periodic", vhost="/"}}',
         "values": samples([float(i % 2) for i in range(steps + 1)])},
        # Healthy: every message received.
        {"series": f'{s}{{{WORKER}, name="t.ok", queue_name="periodic"}}', "values": stepped((2, steps))},
        {"series": f'{r}{{{WORKER}, name="t.ok", queue_name="periodic"}}', "values": stepped((2, steps))},
        # A real backlog: 4 sent, 2 received a step, and the queue grows by the other 2.
        {"series": f'{s}{{{WORKER}, name="t.bulk", queue_name="bulk"}}', "values": stepped((4, steps))},
        {"series": f'{r}{{{WORKER}, name="t.bulk", queue_name="bulk"}}', "values": stepped((2, steps))},
        {"series": f'celery_queue_length{{{PROBE}, queue_name="bulk", vhost="/"}}', "values": f"0+2x{steps}"},
    ]
    page = firing("CeleryTasksDroppedByBroker", "warning", {"name": "t.tick", "queue_name": "periodic"})
    check_stripped(tmp_path, [{
        "interval": f"{STEP}s",
        "input_series": series,
        "alert_rule_test": [
            *({"eval_time": at(t), "alertname": "CeleryTasksDroppedByBroker", "exp_alerts": []}
              for t in range(STEP, onset + STEP, 4 * STEP)),
            *({"eval_time": at(onset + t), "alertname": "CeleryTasksDroppedByBroker", "exp_alerts": page}
              for t in (600, 900, 1800, steps * STEP - onset)),
        ],
    }])


def test_a_task_slower_than_yesterday_pages(tmp_path: Path) -> None:
    """Mean runtime (sum over count) 60% above the same window a day before pages; 40% above does not,
    nor does a steady task, nor a rare task (1 run in 5 minutes, under the floor of runs) that doubled.
    The runtime histogram's _sum and _count alone carry the mean; buckets are not needed."""
    baseline = seconds(PRODUCTION.slower_baseline)
    assert baseline == 86400 and PRODUCTION.slower_ratio == 1.5
    onset = int(baseline) + 3600
    steps = (onset + 3 * 3600) // STEP
    before = onset // STEP
    after = steps - before
    h = "celery_task_runtime_seconds"

    def task(name: str, runs_per_step: float, mean: float, mean_after: float) -> list[dict[str, str]]:
        labels = f'{WORKER}, name="{name}", queue_name="q"'
        return [
            {"series": f"{h}_count{{{labels}}}", "values": stepped((runs_per_step, steps))},
            {"series": f"{h}_sum{{{labels}}}",
             "values": stepped((runs_per_step * mean, before), (runs_per_step * mean_after, after))},
        ]

    series = [
        *task("t.slower", 10, 0.2, 0.32),  # +60%
        *task("t.bit_slower", 10, 0.2, 0.28),  # +40%: under the ratio
        *task("t.steady", 10, 0.2, 0.2),
        *task("t.rare", 0.1, 0.2, 0.4),  # doubled, but 6 runs in 30 minutes
    ]
    page = firing("CeleryTaskSlowerThanYesterday", "warning", {"name": "t.slower"})
    # The 30-minute mean passes 1.5 times after 25 minutes of the new runtime; then `for: 15m`.
    target = onset + 25 * 60 + seconds(PRODUCTION.slower_for) + 5 * 60
    check_stripped(tmp_path, [{
        "interval": f"{STEP}s",
        "input_series": series,
        "alert_rule_test": [
            *({"eval_time": at(t), "alertname": "CeleryTaskSlowerThanYesterday", "exp_alerts": []}
              for t in (3600, baseline, baseline + 1800, onset, onset + 20 * 60)),
            *({"eval_time": at(t), "alertname": "CeleryTaskSlowerThanYesterday", "exp_alerts": page}
              for t in (target, steps * STEP)),
        ],
    }])


def test_the_dropped_and_slower_cases_pass_as_test_alert_rules_runs_them(tmp_path: Path) -> None:
    tests = tmp_path / "dropped-and-slower.test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                     "tests": DROPPED_AND_SLOWER_CASES}))
    run = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
