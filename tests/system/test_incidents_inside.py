"""The incident suite, inside the broker and the workers (issue 17): a flapping RabbitMQ memory
alarm, tasks dropped by a message TTL, the first expiry, a runtime above yesterday's, a stuck task.

Each incident runs its production durations divided by K (its rates kept, as the profile keeps
ratios: see tests/system/test_incidents_queues.py) against the committed production rules scaled by K
(tests/incident_stack.py), so a page after t suite seconds is a page after K*t production seconds;
the targets are asserted in production seconds. The anchor (celery-exporter's three alerts) is
measured where one of them could apply, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from celery_signal_exporter.server.collect import DirectoryCollector
from tests.harness import ROOT, RedisServer, beat, env_for, exporter, wait_until, worker
from tests.incident_plan_inside import PERIODIC_QUEUE, PRODUCTION_INTERVAL
from tests.incident_proxy_inside import delay_proxy
from tests.incident_stack import (
    ALARM_INTERVAL,
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    SCRAPE,
    K,
    Measure,
    Stack,
    incident_stack,
    report,
    sidecar,
)
from tests.rabbit_node import RabbitNode, rabbit_node

pytestmark = [pytest.mark.incident, pytest.mark.serial]  # pages timed at K x speed: run alone

# The production flapping of issue 17: set and cleared 6 times in 60 s, each alarm 2-6 s long.
FLAP_BURSTS_S = (3, 2, 5, 4, 6, 2)
FLAP_GAPS_S = (7, 8, 5, 6, 4, 8)  # each burst and its gap make 10 s: 6 in a minute
#: RabbitMQ's default collect_statistics_interval: the private node's is this / K, so its management
#: statistics (mem_alarm in /api/nodes) lag the alarm as much, relatively, as in production.
PRODUCTION_STATS_INTERVAL_MS = 5000


def _node_probe_args(node: RabbitNode) -> list[str]:
    return ["--broker-url", node.amqp_url, "--rabbitmq-management-url", node.management_url,
            "--probe-interval", f"{PROBE_INTERVAL:g}", "--rabbitmq-alarm-interval", f"{ALARM_INTERVAL:g}",
            # The stack's floor of 2 s is refused: a timeout may not exceed the interval.
            "--probe-timeout", f"{min(PROBE_TIMEOUT, PROBE_INTERVAL):g}"]


def test_flapping_memory_alarm_pages_within_two_minutes(tmp_path: Path) -> None:
    """Issue 17: a memory alarm set and cleared 6 times a minute, 2-6 s each, never held `for: 1m`.

    Scaled: 6 alarms in 3 s, 0.1-0.3 s each, on a private node (an alarm blocks every publisher of
    its node). The flapping goes on through the wait (a minute of it repeats), as it did while the
    publishers blocked. The probe checks the node's alarms live (GET /api/health/checks/alarms)
    every `--rabbitmq-alarm-interval`, 1 s in production and 1/K s here, and counts the checks that
    found the alarm raised (celery_broker_memory_alarm_raised_checks_total); the alert pages on 3 such
    checks within 5m, so a flap pages with its first bursts whatever the scrapes happen to sample.

    History: on the earlier rule (the sampled gauge seen at 2 scrapes within 5m) this met its target
    in 3 of 9 runs; on the counted checks, 9 of 9 (pages at 59-83 production s).
    """
    tmp = str(tmp_path)
    with rabbit_node(tmp, stats_interval_ms=PRODUCTION_STATS_INTERVAL_MS // K) as node, \
            exporter(tmp, *_node_probe_args(node)) as probe, \
            incident_stack(tmp, {"celery-probe": f"127.0.0.1:{probe.port}"}) as stack:
        wait_until(lambda: stack.prom.query("celery_broker_memory_alarm == 0"), 60,
                   "Prometheus to scrape the private node's memory alarm at 0")
        target, slack = 120.0, 300.0  # wait_page waits the target plus one group_interval
        cycles = int((target + slack) / sum(FLAP_BURSTS_S + FLAP_GAPS_S)) + 1
        bursts = [round(b * 1000 / K) for b in FLAP_BURSTS_S] * cycles
        gaps = [round(g * 1000 / K) for g in FLAP_GAPS_S] * cycles
        onset = time.time()
        node.flap_memory_alarm(bursts, gaps)
        ours = stack.wait_page("CeleryBrokerMemoryAlarm", onset, within=target)
        window = f"{time.time() - onset + 1:.0f}s"
        seen = _one(stack, f"sum(increase(celery_broker_memory_alarm_raised_checks_total[{window}]))")
        scrapes = _one(stack, f"sum(increase(celery_broker_alarm_checks_total[{window}]))")
        report(Measure("flapping RabbitMQ memory alarm (6 x 2-6 s a minute)", onset,
                       {"ours:CeleryBrokerMemoryAlarm": ours}))
        assert ours is not None and ours <= target, (
            f"a flapping memory alarm did not page within {target:g} production s (page after {ours}); "
            f"the probe found the alarm raised at {seen} of its {scrapes} checks since the onset")


# --- Inside the workers (a private Redis): slower than yesterday, stuck, RAM-hungry, slow publisher,
# periodic overlap, beat stopped. One stack and one clock for all; each incident has its own onset.

NAMESPACE = "e2e"  # the namespace label tests/stack.py's Prometheus gives every target
DAY = 86400 / K  # "yesterday" in the scaled profile (slower_baseline 1d / K = 72 min)
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The task whose runtime doubles: production 2 s a run, a run every 6 s; scaled 0.1 s, 20 runs every 6 s.
BASELINE_RUNTIME = 2.0 / K
RUNS_EVERY = 6.0 / K
STUCK_LIMIT = 3.0  # inside.stuck's time_limit (tests/incident_tasks_inside.py)
STUCK_RUN = 20.0  # 400 production s: past its limit until well after the page
HUNGRY_MIB = 32
PUBLISH_DELAY = 0.1 / K  # a 100 ms broker round trip each way, scaled (tests/incident_proxy_inside.py)
PRODUCTION_SLOWER_WINDOW = 1800.0  # rulesb's slower_window, 30 m
# No target in the issue: it must page. The 30 m mean crosses 1.5 x about 15 m after the runtime doubles,
# and the alert holds 15 m more (rulesb); 40 minutes leaves a margin for scrapes and delivery.
SLOWER_TARGET = 2400.0


def _runtime_history(instance: str, spans: list[tuple[float, float]], runtime: float) -> str:
    """OpenMetrics for promtool: the runtime histogram a sidecar would have served over `spans`
    (UNIX seconds), one scrape every SCRAPE, a run every RUNS_EVERY of `runtime` seconds each; the
    counters restart at each span (a new pod), as rate() expects of a counter."""
    labels = (f'job="celery-worker",instance="{instance}",namespace="{NAMESPACE}",'
              'name="inside.steady",queue_name="inside"')
    times = []
    for start, end in spans:
        t = start
        while t < end:
            times.append((t, (t - start) / RUNS_EVERY))
            t += SCRAPE
    lines = ["# TYPE celery_task_runtime_seconds histogram"]
    for le in (*RUNTIME_BUCKETS, float("inf")):
        bound = "+Inf" if le == float("inf") else f"{le:g}"
        lines += [f'celery_task_runtime_seconds_bucket{{{labels},le="{bound}"}} {n if runtime <= le else 0:.3f} {t:.3f}'
                  for t, n in times]
    lines += [f"celery_task_runtime_seconds_count{{{labels}}} {n:.3f} {t:.3f}" for t, n in times]
    lines += [f"celery_task_runtime_seconds_sum{{{labels}}} {n * runtime:.4f} {t:.3f}" for t, n in times]
    return "\n".join(lines) + "\n# EOF\n"


def _producer(env: dict[str, str], tmp: str, plan: list[dict[str, object]], name: str) -> subprocess.Popen[bytes]:
    with open(os.path.join(tmp, f"producer-{name}.log"), "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "tests.incident_producer_inside", json.dumps(plan)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _one(stack: Stack, expr: str) -> float | None:
    found = stack.prom.query(expr)
    return max(float(s["value"][1]) for s in found) if found else None


def test_inside_the_workers(tmp_path: Path) -> None:
    tmp = str(tmp_path)
    worker_dir, beat_dir = tmp_path / "worker-metrics", tmp_path / "beat-metrics"
    worker_dir.mkdir()
    beat_dir.mkdir()
    with ExitStack() as stack_:
        redis = stack_.enter_context(RedisServer(tmp, maxmemory="1gb"))
        redis_url = redis.url
        env = env_for(redis_url, str(worker_dir))
        beat_env = env_for(redis_url, str(beat_dir))
        stack_.enter_context(worker(env, tmp, app="tests.incident_app", queues="inside"))
        # Threads: hard time limits are not enforced there, so a run can outlive its limit (stuck),
        # and the overlapping periodic runs get a slot each.
        stack_.enter_context(worker(env, tmp, app="tests.incident_app", pool="threads", concurrency=4,
                                    queues=f"stuck-inside,{PERIODIC_QUEUE}"))
        side = stack_.enter_context(sidecar(tmp, str(worker_dir)))
        beat_side = stack_.enter_context(sidecar(tmp, str(beat_dir)))
        instance = f"127.0.0.1:{side.port}"
        now = time.time()
        lead = 2 * PRODUCTION_SLOWER_WINDOW / K + 30  # twice the mean's window of history before now
        history = _runtime_history(instance, [(now - DAY - lead, now - DAY + 300), (now - lead, now - 1)],
                                   BASELINE_RUNTIME)
        stack = stack_.enter_context(incident_stack(
            tmp, {"celery-worker": instance, "celery-beat": f"127.0.0.1:{beat_side.port}"}, backfill=history))
        wait_until(lambda: stack.prom.query('celery_worker_up{job="celery-worker"} == 1'), 60,
                   "Prometheus to scrape the workers' sidecar")
        assert stack.prom.query(f'celery_task_runtime_seconds_count{{name="inside.steady"}} offset {DAY:g}s'), \
            "the backfilled baseline of the day before is not in Prometheus"
        delay_port = stack_.enter_context(delay_proxy(redis.port, PUBLISH_DELAY))

        # Slower than yesterday: from now on every run takes double its baseline.
        runs = int(SLOWER_TARGET / K / RUNS_EVERY)
        slower_onset = time.time()
        producers = [_producer(env, tmp, [{"task": "inside.steady", "args": [2 * BASELINE_RUNTIME],
                                           "queue": "inside", "count": runs, "every": RUNS_EVERY}], "steady")]
        # Stuck: one run far past its hard time limit (3 s; production 60 s).
        producers.append(_producer(env, tmp, [{"task": "inside.stuck", "args": [STUCK_RUN], "queue": "stuck-inside",
                                               "count": 1, "every": 0}], "stuck"))
        stuck_onset = time.time() + STUCK_LIMIT
        # RAM-hungry: each run keeps 32 MiB more, a run every 0.5 s (production 10 s).
        producers.append(_producer(env, tmp, [{"task": "inside.hungry", "args": [HUNGRY_MIB], "queue": "inside",
                                               "count": 4, "every": 10 / K}], "hungry"))
        # Slow publisher: publishing through the delay proxy, beside the direct producers above.
        slow_env = dict(env, CSX_TEST_BROKER=f"redis://127.0.0.1:{delay_port}")
        producers.append(_producer(slow_env, tmp, [{"task": "i.ok", "queue": "inside", "count": runs,
                                                    "every": 2 / K}], "slow"))
        # Periodic overlap: beat sends a 50 s job every 20 s; the second run is due while the first runs.
        beat_proc = stack_.enter_context(beat(beat_env, tmp, "--max-interval", f"{PRODUCTION_INTERVAL / K:g}",
                                                   app="tests.incident_beat_inside"))
        overlap_onset = time.time() + PRODUCTION_INTERVAL / K
        try:
            overlap = stack.wait_page("CeleryPeriodicTaskOverlapping", overlap_onset, within=300)
            stuck = stack.wait_page("CeleryTaskStuck", stuck_onset, within=600, name="inside.stuck")
            beat_onset = time.time()
            beat_proc.proc.kill()  # beat stopped: its pod gone, no graceful shutdown
            beat_down = stack.wait_page("CeleryBeatDown", beat_onset, within=600)
            # The worker is fresh, so its cumulative buckets hold exactly the four runs. Not increase(): the
            # runs can all end before Prometheus first sees the series, and increase() over a series whose
            # first sample already holds them is 0 (p95 NaN, seen once in CI).
            hungry = _one(stack, 'histogram_quantile(0.95, sum by (le) (celery_task_memory_growth_bytes_bucket'
                                 '{name="inside.hungry"}))')
            publish_slow = _one(stack, 'histogram_quantile(0.95, sum by (le) (rate(celery_task_publish_seconds_bucket'
                                       '{name="i.ok"}[30s])))')
            publish_direct = _one(stack, 'histogram_quantile(0.95, sum by (le) (rate('
                                         'celery_task_publish_seconds_bucket{name="inside.steady"}[30s])))')
            slower = stack.wait_page("CeleryTaskSlowerThanYesterday", slower_onset, within=SLOWER_TARGET,
                                     name="inside.steady")
            ratio = _one(stack, 'task:celery_task_runtime_seconds:mean{name="inside.steady"} / '
                                'task:celery_task_runtime_seconds:mean_baseline{name="inside.steady"}')
        finally:
            for p in producers:
                if p.poll() is None:
                    p.terminate()
                p.wait()
        report(Measure("runtime doubled against the day before", slower_onset,
                       {"ours:CeleryTaskSlowerThanYesterday": slower}))
        report(Measure("stuck task (a run past its time limit)", stuck_onset, {"ours:CeleryTaskStuck": stuck}))
        report(Measure("periodic overlap (50 s job due every 20 s)", overlap_onset,
                       {"ours:CeleryPeriodicTaskOverlapping": overlap}))
        report(Measure("beat stopped (killed)", beat_onset, {"ours:CeleryBeatDown": beat_down}))
        print(f"incident: RAM-hungry task: memory growth p95 {hungry} bytes a run (no alert; panel Memory growth p95)")
        print(f"incident: slow publisher: publish p95 {publish_slow} s through the proxy, {publish_direct} s direct "
              f"(scaled; x{K} for production; no alert; panel Publish latency p95 by instance)")
        assert overlap is not None and overlap <= 300, f"periodic overlap paged after {overlap} production s"
        assert stuck is not None and stuck <= 600, f"a stuck run paged after {stuck} production s"
        assert beat_down is not None and beat_down <= 600, f"beat stopped paged after {beat_down} production s"
        assert hungry is not None and hungry >= HUNGRY_MIB * 2**20 / 2, f"memory growth p95 {hungry}"
        assert publish_slow is not None and publish_direct is not None and publish_slow > publish_direct, (
            f"publishing through a {PUBLISH_DELAY * 1000:g} ms proxy: p95 {publish_slow} s, direct {publish_direct} s")
        assert slower is not None and slower <= SLOWER_TARGET, (
            f"a runtime at double yesterday's paged after {slower} production s (mean / baseline now {ratio})")


# --- Tasks dropped by a message TTL (RabbitMQ, a fresh vhost): recurring ticks sent with `expires`
# shorter than their wait behind a long job. Production: a tick every 20 s expiring after 30 s, behind a
# 400 s job on a worker with one slot and prefetch 1; scaled by K below.

TTL_QUEUE = "ttl-inside"
TICK_EVERY, TICK_EXPIRES, BLOCKER_RUN = 20.0 / K, 30.0 / K, 400.0 / K
DROPPED_TARGET = 600.0  # issue 17: dropped by a TTL pages within 10 minutes
EXPIRING_WITHIN = 600.0  # CeleryTasksExpiring holds for 5 m: it must page within 10 minutes of the first expiry


def _first_expiry(metrics_dir: str, found: list[float], timeout: float = 120) -> None:
    """Append the time the first tick is counted expired in the worker's metrics directory."""
    collector = DirectoryCollector(metrics_dir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for family in collector.collect():
            for s in family.samples:
                if (s.name == "celery_task_revoked_total" and s.labels.get("name") == "inside.tick"
                        and s.labels.get("reason") == "expired" and s.value > 0):
                    found.append(time.time())
                    return
        time.sleep(0.05)


def test_tasks_dropped_by_a_message_ttl_and_the_first_expiry(tmp_path: Path, amqp_url: str) -> None:
    tmp = str(tmp_path)
    metrics = tmp_path / "worker-metrics"
    metrics.mkdir()
    env = env_for(amqp_url, str(metrics), CSX_PREFETCH="1")
    probe_args = ["--broker-url", amqp_url, "--queue", TTL_QUEUE, "--probe-interval", f"{PROBE_INTERVAL:g}",
                  "--probe-timeout", f"{min(PROBE_TIMEOUT, PROBE_INTERVAL):g}"]
    with worker(env, tmp, app="tests.incident_app", queues=TTL_QUEUE, concurrency=1), \
            sidecar(tmp, str(metrics)) as side, exporter(tmp, *probe_args) as probe, \
            incident_stack(tmp, {"celery-worker": f"127.0.0.1:{side.port}",
                                 "celery-probe": f"127.0.0.1:{probe.port}"}) as stack:
        wait_until(lambda: stack.prom.query(f'celery_queue_length{{queue_name="{TTL_QUEUE}"}}'), 60,
                   "Prometheus to scrape the probe's length of the TTL queue")
        blocker = _producer(env, tmp, [{"task": "inside.steady", "args": [BLOCKER_RUN], "queue": TTL_QUEUE,
                                        "count": 1, "every": 0}], "blocker")
        blocker.wait(timeout=60)
        ticks = int((DROPPED_TARGET + 300) / K / TICK_EVERY)
        # The first expiry reaches the worker when its slot frees (it checks `expires` before it runs a
        # prefetched tick), not when the tick's TTL passes: its onset is read off the metrics directory.
        first_expiry: list[float] = []
        watch = threading.Thread(target=_first_expiry, args=(str(metrics), first_expiry), daemon=True)
        watch.start()
        onset = time.time()
        producer = _producer(env, tmp, [{"task": "inside.tick", "queue": TTL_QUEUE, "count": ticks,
                                         "every": TICK_EVERY, "expires": TICK_EXPIRES}], "ticks")
        try:
            dropped = stack.wait_page("CeleryTasksDroppedByBroker", onset, within=DROPPED_TARGET,
                                      name="inside.tick")
            watch.join(timeout=BLOCKER_RUN + 30)
            assert first_expiry, "no expiry reached the worker (celery_task_revoked_total{reason=\"expired\"})"
            expiring = stack.wait_page("CeleryTasksExpiring", first_expiry[0], within=EXPIRING_WITHIN,
                                       name="inside.tick")
            anchor = stack.pages("CeleryHighQueueLength", onset, ruleset="anchor")
            anchor_s = (min(a["_received"] for a in anchor) - onset) * K if anchor else None
            seen = {m: _one(stack, f'sum(celery_task_{m}_total{{name="inside.tick"}})')
                    for m in ("sent", "received", "revoked")}
        finally:
            if producer.poll() is None:
                producer.terminate()
            producer.wait()
        report(Measure("tasks dropped by a RabbitMQ message TTL", onset,
                       {"ours:CeleryTasksDroppedByBroker": dropped, "anchor:CeleryHighQueueLength": anchor_s}))
        report(Measure("the first expiry of a task", first_expiry[0], {"ours:CeleryTasksExpiring": expiring}))
        assert dropped is not None and dropped <= DROPPED_TARGET, (
            f"ticks dropped by RabbitMQ paged after {dropped} production s (sent/received/revoked: {seen})")
        assert expiring is not None and expiring <= EXPIRING_WITHIN, (
            f"the first expiries paged after {expiring} production s (sent/received/revoked: {seen})")
