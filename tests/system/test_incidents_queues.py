"""The incident suite, queues and workers (issue 17): overloads on Redis and on RabbitMQ with a
deep prefetch, a long queue that drains in time, a clogged shared queue, and workers that retire
or vanish, each replayed against the committed production rules under the faithful scaled profile
(tests/incident_stack.py), with the celery-exporter mixin's alerts (the anchor) measured beside.

Scaling. The profile divides every duration and every count threshold by K and keeps ratios, so a
rate (a count over a duration) means the same in both worlds: 15 tasks a second in production are
15 a second here, and a backlog of 2 000 in production is 100 here. So each incident keeps its
production rates (arrivals, and the workers' capacity: 2 slots of 0.2 s runs drain 10 a second),
and divides its durations (how long a step lasts) and its counts (a burst's size) by K. Driving
rates K times higher would make each backlog K times larger against thresholds K times smaller:
counts would cross them K² times early, not K times. Targets are asserted in production seconds.
Two parts cannot follow the factor: the worker's prefetch (50 x 2 = 100 held messages, which
stands for 2 000 in production: the prefetch is the incident, so it is kept as the issue reports
it), and the shared RabbitMQ's management statistics, refreshed every 5 s (100 production seconds
here: the probe's ready and unacked counts lag that much; the workers' own held gauges do not).

Ground truth comes from outside the system under test: the producer counts what it published
(tests/incident_poller_queues.py) and each task run leaves a byte in a log as it starts
(tests/incident_tasks_queues.py), so "tasks waiting" is published minus started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from celery_signal_exporter.mixin.config import PRODUCTION, seconds
from celery_signal_exporter.mixin.rules import rule_groups
from tests.conftest import AMQP_HOST, RABBIT_MGMT_PORT
from tests.harness import ROOT, RedisServer, WorkerProcess, env_for, wait_until, worker
from tests.incident_queues import (
    APP,
    LATE,
    RUNTIME,
    Rig,
    anchor_page,
    first_page,
    page_after,
    poller,
    prod,
    started,
    suite,
    work,
)
from tests.incident_stack import (
    PRODUCTION_EVALUATION,
    PRODUCTION_GROUP_INTERVAL,
    PRODUCTION_GROUP_WAIT,
    PRODUCTION_SCRAPE,
    PRODUCTION_WORKER_TIMEOUT,
    PROFILE,
    SCRAPE,
    K,
    Measure,
    Stack,
    incident_stack,
    probe,
    report,
    sidecar,
)

pytestmark = [pytest.mark.incident, pytest.mark.serial]  # pages timed at K x speed: run alone

#: Our alerts that page for an overload (growth, a coming breach, a drain too slow): the first to
#: reach the pager is the overload's page, and none of them may page for a queue that drains in time.
OVERLOAD_ALERTS = ("CeleryBacklogGrowing", "CeleryBacklogWillBreach", "CeleryQueueDrainTooSlow")
#: A queue that drains in time must not page these either: the objective pages (issue 23).
QUIET_ALERTS = (*OVERLOAD_ALERTS, "CeleryQueueWaitWillBreach", "CeleryQueueWaitBudgetBurn")
#: The recorded series that must not read 0 while tasks wait in a worker (issue 17, Build 3).
BACKLOG_RECORD = "queue:celery_queue_backlog:sum"
DRAIN_RECORD = "queue:celery_queue_drain_seconds:estimate"
#: The Tasks dashboard's per-task panel of tasks sent and not yet started (its first query).
WAITING_PANEL = "Waiting to start"

# Targets, production seconds (issue 17, Build 2).
OVERLOAD_PAGE_WITHIN = 300.0
RESOLVE_WITHIN = 300.0

ARRIVAL = 15.0
BASELINE_RATE = 8.0  # before the onset the poller stays under the workers' capacity
BASELINE_SECONDS = 100.0 / K  # 100 production seconds of normal traffic first, so every series exists
BURST = 2000 // K  # a production backlog of 2 000

Q_OVERLOAD = "iq-overload"
Q_BURST = "iq-burst"
Q_SHARED = "iq-shared"
Q_WORKERS = "iq-workers"
Q_RABBIT = "iq-rabbit-overload"
REDIS_QUEUES = (Q_OVERLOAD, Q_BURST, Q_SHARED, Q_WORKERS)


@contextmanager
def rig(tmp: str, broker_url: str, queues: tuple[str, ...], **env: str) -> Iterator[Rig]:
    """Workers' metrics directory, its sidecar, the broker probe and the monitoring stack."""
    metrics = os.path.join(tmp, "metrics")
    os.makedirs(metrics, exist_ok=True)
    with (
        sidecar(tmp, metrics) as side,
        probe(tmp, broker_url, queues=queues) as prb,
        incident_stack(tmp, {"celery-worker": f"127.0.0.1:{side.port}",
                             "celery-probe": f"127.0.0.1:{prb.port}"}) as stack,
    ):
        yield Rig(tmp, env_for(broker_url, metrics, **env), stack)


@pytest.fixture(scope="module")
def redis_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One private Redis and one stack for every Redis incident: each has its own queue and tasks."""
    tmp = str(tmp_path_factory.mktemp("incidents-queues-redis"))
    with RedisServer(tmp, maxmemory="1gb") as redis, rig(tmp, f"{redis.url}/0", REDIS_QUEUES) as r:
        yield r


def humanized(text: str) -> float:
    """A number as Prometheus's `humanize` writes it (1.234k)."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}
    return float(text[:-1]) * scale[text[-1]] if text[-1] in scale else float(text)


def check_description(alert: dict[str, Any], queue: str, backlog: int) -> None:
    """The page names the queue and quotes a backlog of the right size (the true one, not 0)."""
    text = alert["annotations"]["description"]
    assert queue in text, f"the page does not name queue {queue}: {text}"
    counts = [humanized(m) for m in re.findall(r"(\d+(?:\.\d+)?[kMG]?) (?:messages|tasks)\b(?!/)", text)]
    assert counts, f"the page quotes no number of messages: {text}"
    quoted = max(counts)
    assert 0.3 * backlog <= quoted <= 2 * backlog + 5, (
        f"the page quotes {quoted:g} messages, {backlog} tasks waited when it arrived: {text}")
    assert alert["annotations"].get("runbook_url") and alert["annotations"].get("dashboard_url"), alert


def value(stack: Stack, expr: str) -> float | None:
    result = stack.prom.query(expr)
    return float(result[0]["value"][1]) if result else None


def recorded(name: str) -> bool:
    return any(rule.get("record") == name for g in rule_groups(PROFILE)["groups"] for rule in g["rules"])


def overload(r: Rig, queue: str, incident: str, sample: Callable[[], None] = lambda: None) -> list[str]:
    """A poller outruns its workers (15/s in, 10/s out); ours must page within 5 minutes of the onset
    with the true backlog in its description; then capacity is added, the backlog drains and the
    page must resolve within 5 minutes of the drain. The anchor's queue-length alert is measured.
    Returns the targets missed."""
    stack = r.stack
    log = os.path.join(r.tmp, f"started-{queue}")
    measure = Measure(incident, onset=0.0)
    failures: list[str] = []
    details: dict[str, Any] = {}

    def run() -> None:
        with ExitStack() as scope:
            scope.enter_context(worker(r.env, r.tmp, app=APP, queues=queue, concurrency=2))
            p = scope.enter_context(poller(r, queue, [work(log, BASELINE_RATE, BASELINE_SECONDS), work(log, ARRIVAL)]))
            measure.onset = onset = p.step_began(1)
            sent0, started0 = p.sent(), started(log)
            page = first_page(stack, OVERLOAD_ALERTS, onset, OVERLOAD_PAGE_WITHIN, each=sample, queue_name=queue)
            # The overload is real: arrivals at least 1.5 times what the workers drained meanwhile.
            elapsed = time.time() - onset
            arrival, drain = (p.sent() - sent0) / elapsed, (started(log) - started0) / elapsed
            details.update(arrival_per_s=round(arrival, 2), drain_per_s=round(drain, 2))
            assert arrival >= 1.5 * drain and arrival >= 0.8 * ARRIVAL, (
                f"not the overload meant: {arrival:.1f}/s arrived, {drain:.1f}/s drained")
            if page is None:
                measure.pages["ours:" + "|".join(OVERLOAD_ALERTS)] = None
                failures.append(f"no overload page within {OVERLOAD_PAGE_WITHIN + LATE:g} production s of the onset")
                return
            name, alert = page
            waited = p.sent() - started(log)
            details.update(waiting_at_page=waited, description=alert["annotations"].get("description"),
                           dashboard_url=alert["annotations"].get("dashboard_url"))
            after = prod(alert["_received"] - onset)
            measure.pages[f"ours:{name}"] = round(after)
            if after > OVERLOAD_PAGE_WITHIN:
                failures.append(f"{name} paged {after:.0f} production s after the onset, target "
                                f"{OVERLOAD_PAGE_WITHIN:g}")
            try:
                check_description(alert, queue, waited)
            except AssertionError as exc:
                failures.append(str(exc))

            # The operator adds capacity: 4 more slots, 30/s against 15/s arriving. The page may
            # resolve before the backlog is gone (it pages growth, and the backlog shrinks from now
            # on); what counts is that it does not outlast the drain by more than the target.
            cleared_at: float | None = None

            def watch() -> None:
                nonlocal cleared_at
                if stack.firing(name, queue_name=queue):
                    cleared_at = None
                elif cleared_at is None:
                    cleared_at = time.time()

            scope.enter_context(worker(r.env, r.tmp, app=APP, queues=queue, concurrency=4))

            def emptied() -> float | None:
                watch()
                return time.time() if p.sent() - started(log) <= 0 else None

            drained = wait_until(emptied, 120, "the added capacity to drain the backlog", interval=0.1)
            assert drained is not None
            details["drained_after"] = round(prod(drained - onset))
            deadline = drained + suite(RESOLVE_WITHIN + LATE)
            while time.time() < deadline:
                watch()
                if cleared_at is not None:
                    break
                time.sleep(0.2)
            if cleared_at is None:
                failures.append(f"{name} still fires {RESOLVE_WITHIN + LATE:g} production s after the drain")
                return
            resolved = max(0.0, prod(cleared_at - drained))
            measure.pages[f"ours:{name}:resolved"] = round(resolved)
            if resolved > RESOLVE_WITHIN:
                failures.append(f"{name} resolved {resolved:.0f} production s after the drain, "
                                f"target {RESOLVE_WITHIN:g}")
            # Alertmanager tells the pager at its next group_interval, as it would in production.
            deadline = cleared_at + suite(PRODUCTION_GROUP_INTERVAL + LATE)
            while not (notices := stack.pages(name, alert["_received"], status="resolved", queue_name=queue)):
                if time.time() > deadline:
                    failures.append(f"the pager got no resolved notice for {name} within a group_interval "
                                    "of the alert resolving")
                    return
                time.sleep(0.2)
            notified = max(0.0, prod(notices[0]["_received"] - drained))
            measure.pages[f"ours:{name}:resolved-notified"] = round(notified)

    try:
        run()
    finally:
        if measure.onset:
            measure.pages["anchor:CeleryHighQueueLength"] = anchor_page(
                stack, "CeleryHighQueueLength", measure.onset, queue_name=queue)
        report(measure)
        print(f"incident-detail: {json.dumps({'incident': incident, **details})}")
    return failures


def worker_down_within() -> float:
    """How soon a vanished worker must page, production seconds: the heartbeat's timeout, two scrapes
    for Prometheus to see it, the rule's `for` plus two evaluations, and Alertmanager's group_wait."""
    return float(PRODUCTION_WORKER_TIMEOUT + 2 * PRODUCTION_SCRAPE + seconds(PRODUCTION.worker_down_for)
                 + 2 * PRODUCTION_EVALUATION + PRODUCTION_GROUP_WAIT)


def test_worker_retired_gracefully_does_not_page_one_that_vanishes_does(redis_rig: Rig) -> None:
    """A worker retired under a new hostname (SIGTERM once its replacement runs) must not page
    CeleryWorkerDown; one whose whole process group is SIGKILLed at the same moment must. First of
    the Redis incidents: Alertmanager groups CeleryWorkerDown by alert name alone, so a group another
    incident's workers opened would hold this page back to its next group_interval."""
    r, queue = redis_rig, Q_WORKERS
    stack = r.stack
    tag = uuid.uuid4().hex[:6]
    within = worker_down_within()
    retired_m = Measure("worker retired gracefully (SIGTERM, replaced under a new hostname)", onset=0.0)
    vanished_m = Measure("worker vanished (SIGKILL of its process group)", onset=0.0)
    retired_paged: list[str] = []
    try:
        with ExitStack() as scope:
            old: WorkerProcess = scope.enter_context(
                worker(r.env, r.tmp, app=APP, queues=queue, concurrency=1, hostname=f"old-{tag}@incident"))
            gone: WorkerProcess = scope.enter_context(
                worker(r.env, r.tmp, app=APP, queues=queue, concurrency=1, hostname=f"gone-{tag}@incident"))
            wait_until(lambda: len(stack.prom.query(
                f'celery_worker_up{{hostname=~"(old|gone)-{tag}@incident"}} == 1')) == 2, 30,
                "Prometheus to see both workers up")
            scope.enter_context(
                worker(r.env, r.tmp, app=APP, queues=queue, concurrency=1, hostname=f"new-{tag}@incident"))
            retired_m.onset = vanished_m.onset = onset = time.time()
            old.proc.send_signal(signal.SIGTERM)
            os.killpg(gone.proc.pid, signal.SIGKILL)
            old.proc.wait(30)

            def watch() -> None:
                if (stack.firing("CeleryWorkerDown", hostname=old.hostname)
                        or stack.pages("CeleryWorkerDown", onset, hostname=old.hostname)):
                    retired_paged.append(old.hostname)

            vanished = first_page(stack, ("CeleryWorkerDown",), onset, within, each=watch, hostname=gone.hostname)
            vanished_m.pages["ours:CeleryWorkerDown"] = (
                round(prod(vanished[1]["_received"] - onset)) if vanished else None)
            if vanished:
                print(f"incident-detail: {json.dumps({'vanished': vanished[1]['annotations']})}")
            # The retired worker is watched as long as the vanished one could take to page, and a little more.
            while time.time() < onset + suite(within + LATE):
                watch()
                time.sleep(0.25)
            assert old.proc.returncode == 0, f"the retired worker did not shut down cleanly:\n{old.log()[-3000:]}"
    finally:
        if retired_m.onset:
            retired_m.pages["ours:CeleryWorkerDown"] = page_after(stack, "CeleryWorkerDown", retired_m.onset,
                                                                  hostname=f"old-{tag}@incident")
        for m, host in ((retired_m, f"old-{tag}@incident"), (vanished_m, f"gone-{tag}@incident")):
            if m.onset:
                m.pages["anchor:CeleryWorkerDown"] = anchor_page(stack, "CeleryWorkerDown", m.onset, hostname=host)
            report(m)
    failures = []
    if retired_paged:
        failures.append("CeleryWorkerDown paged for a worker shut down gracefully")
    got = vanished_m.pages["ours:CeleryWorkerDown"]
    if got is None or got > within:
        failures.append(f"CeleryWorkerDown for the vanished worker: {got} production s, target {within:g}")
    assert not failures, "; ".join(failures)


def test_overload_on_redis_pages_in_time_and_resolves_after_drain(redis_rig: Rig) -> None:
    failures = overload(redis_rig, Q_OVERLOAD, "overload, Redis (15/s in, 10/s out)")
    assert not failures, "; ".join(failures)


def rabbit_queue(vhost: str, queue: str) -> dict[str, Any]:
    """RabbitMQ's own counts for a queue (management API; refreshed every 5 s), {} before it exists."""
    url = f"http://{AMQP_HOST}:{RABBIT_MGMT_PORT}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    r = httpx.get(url, auth=("guest", "guest"), timeout=10)
    if r.status_code == 404:
        return {}
    r.raise_for_status()
    found: dict[str, Any] = r.json()
    return found


#: Tasks held in the worker (RabbitMQ's unacked: early acks leave running tasks out) from which
#: "tasks wait" is beyond doubt.
HELD_MIN = 10


def test_overload_on_rabbitmq_with_deep_prefetch(tmp_path: Path, amqp_url: str, amqp_vhost: str) -> None:
    """Prefetch 50 x 2: the worker holds up to 100 messages, so RabbitMQ's ready count reads 0 while
    the backlog grows. Ours must page within 5 minutes all the same, and the true backlog and drain
    time recorded series must not read 0 while tasks wait in the worker."""
    assert recorded(BACKLOG_RECORD) and recorded(DRAIN_RECORD), "the rules no longer record the true backlog"
    samples: list[dict[str, Any]] = []
    with rig(str(tmp_path), amqp_url, (Q_RABBIT,), CSX_PREFETCH="50") as r:
        last = 0.0

        def sample() -> None:
            nonlocal last
            if time.time() - last < 0.5:
                return
            last = time.time()
            q = rabbit_queue(amqp_vhost, Q_RABBIT)
            if q.get("messages_unacknowledged", 0) < HELD_MIN:
                return
            where = f'{{queue_name="{Q_RABBIT}"}}'
            samples.append({"ready": q.get("messages_ready", 0), "held": q["messages_unacknowledged"],
                            "backlog": value(r.stack, BACKLOG_RECORD + where),
                            "drain_s": value(r.stack, DRAIN_RECORD + where)})

        failures = overload(r, Q_RABBIT, "overload, RabbitMQ, prefetch 50 x 2 (15/s in, 10/s out)", sample)
    print(f"incident-detail: {json.dumps({'rabbit_samples': samples[:3] + samples[-3:]})}")
    assert samples, "the worker never held tasks: not the incident meant"
    assert any(s["ready"] == 0 for s in samples), f"ready never read 0 while the worker held tasks: {samples}"
    zero = [s for s in samples if not (s["backlog"] and s["backlog"] > 0 and s["drain_s"] and s["drain_s"] > 0)]
    if zero:
        failures.append(f"{len(zero)} of {len(samples)} samples read no backlog or drain time while tasks "
                        f"waited in the worker, e.g. {zero[0]}")
    assert not failures, "; ".join(failures)


def test_long_queue_draining_in_time_does_not_page(redis_rig: Rig) -> None:
    """A production backlog of 2 000 arrives at once and drains at 10/s (200 production s, far under
    drain_max): nothing of ours may page for growth, a coming breach or a slow drain."""
    r, queue = redis_rig, Q_BURST
    stack = r.stack
    log = os.path.join(r.tmp, f"started-{queue}")
    measure = Measure(f"long queue drained in time, Redis ({BURST * K} production messages at once, 10/s out)",
                      onset=0.0)
    paged: set[str] = set()
    seen: list[float] = []  # the true backlog as the rules read it
    try:
        with (
            worker(r.env, r.tmp, app=APP, queues=queue, concurrency=2),
            poller(r, queue, [{"task": "iq.work", "args": [RUNTIME, log], "count": BURST}]) as p,
        ):
            measure.onset = onset = p.step_began(0)

            def watch() -> None:
                for name in QUIET_ALERTS:
                    if stack.firing(name, queue_name=queue) or stack.pages(name, onset, queue_name=queue):
                        paged.add(name)
                seen.append(value(stack, f'{BACKLOG_RECORD}{{queue_name="{queue}"}}') or 0.0)

            def done() -> float | None:
                watch()
                return time.time() if started(log) >= BURST else None

            drained = wait_until(done, suite(seconds(PRODUCTION.drain_max)), "the burst to drain", interval=0.25)
            assert drained is not None
            drain_after = prod(drained - onset)
            # Then long enough for any `for` that counted during the drain to have run out.
            while time.time() < drained + suite(RESOLVE_WITHIN):
                watch()
                time.sleep(0.25)
    finally:
        for name in QUIET_ALERTS:
            if measure.onset:
                measure.pages[f"ours:{name}"] = page_after(stack, name, measure.onset, queue_name=queue)
        if measure.onset:
            measure.pages["anchor:CeleryHighQueueLength"] = anchor_page(
                stack, "CeleryHighQueueLength", measure.onset, queue_name=queue)
        report(measure)
    print(f"incident-detail: {json.dumps({'burst_drained_after': round(drain_after), 'max_backlog': max(seen)})}")
    assert drain_after < seconds(PRODUCTION.drain_max) / 3, f"the burst took {drain_after:.0f} production s"
    # The rules saw the long queue (far over the floor), so their silence is a judgement, not blindness.
    assert max(seen) >= BURST / 3 > PROFILE.backlog_floor, f"the true backlog read at most {max(seen):g}"
    assert not paged, f"{sorted(paged)} paged for a queue that drained in {drain_after:.0f} production s"


def panel_query(title: str) -> str:
    """The first query of the dashboard panel titled `title`, as committed in dashboards/*.json."""
    for path in sorted(Path(ROOT, "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            if panel.get("title") == title and panel.get("targets"):
                expr: str = panel["targets"][0]["expr"]
                return expr
    raise AssertionError(f"no dashboard panel titled {title!r} in dashboards/*.json")


def grafana(expr: str, **variables: str) -> str:
    """`expr` as Grafana sends it: the named variables filled in, every other one "All" (.*), and
    $__rate_interval four scaled scrape intervals (Grafana's floor for it)."""
    expr = expr.replace("$__rate_interval", f"{round(4 * SCRAPE * 1000)}ms")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), ".*"), expr)


def test_clogged_shared_queue_shows_the_waiting_urgent_task(redis_rig: Rig) -> None:
    """A bulk job fills a queue shared with an urgent task: while the urgent task waits, before it
    starts, the per-task panel's own query must show it (the queue-wait histogram cannot: a wait
    is observed when the run starts)."""
    r, queue = redis_rig, Q_SHARED
    stack = r.stack
    expr = grafana(panel_query(WAITING_PANEL), task="iq.urgent", queue=queue)
    bulk_items, bulk_seconds = 30, 0.3  # 9 s of work for one slot: 180 production s of clog
    warm, marker = os.path.join(r.tmp, "urgent-warm"), os.path.join(r.tmp, "urgent-started")
    measure = Measure("clogged shared queue, Redis (urgent task behind a bulk job)", onset=0.0)
    seen: list[float] = []
    try:
        with worker(r.env, r.tmp, app=APP, queues=queue, concurrency=1):
            # The urgent task ran before today: its series exist, as they would in production.
            with poller(r, queue, [{"task": "iq.urgent", "args": [warm], "count": 1}]) as p:
                p.wait()
            wait_until(lambda: os.path.exists(warm), 60, "the first urgent run")
            wait_until(lambda: stack.prom.query('celery_task_started_total{name="iq.urgent"} >= 1'), 30,
                       "Prometheus to see the first urgent run")
            plan = [{"task": "iq.bulk", "args": [bulk_seconds], "count": bulk_items},
                    {"task": "iq.urgent", "args": [marker], "count": 1}]
            with poller(r, queue, plan) as p:
                measure.onset = published = p.step_began(1)
                while not os.path.exists(marker) and time.time() < published + 60:
                    rows = stack.prom.query(expr)
                    if not os.path.exists(marker) and any(
                            row["metric"].get("name") == "iq.urgent" and float(row["value"][1]) > 0 for row in rows):
                        seen.append(time.time())
                    time.sleep(0.25)
                began = wait_until(lambda: os.path.exists(marker) and os.path.getmtime(marker), 60,
                                   "the urgent task to start")
    finally:
        measure.pages[f"ours:panel {WAITING_PANEL}"] = round(prod(seen[0] - measure.onset)) if seen else None
        if measure.onset:
            measure.pages["anchor:CeleryHighQueueLength"] = anchor_page(
                stack, "CeleryHighQueueLength", measure.onset, queue_name=queue)
        report(measure)
    waited = prod(began - published)
    assert waited > 4 * PRODUCTION_SCRAPE, f"the urgent task waited only {waited:.0f} production s: no clog"
    assert seen, (f"the {WAITING_PANEL!r} panel never showed iq.urgent during its {waited:.0f} production s "
                  f"of waiting: {expr}")
