"""Queues simulated second by second, sampled as a probe and a worker sidecar would export them,
and the time each alert first fired, read by `promtool test rules` from Prometheus' own ALERTS series.

Arrivals are Poisson (seeded), a pool starts at most its capacity a second in publish order, and a
worker holds up to `prefetch` messages it has taken off the broker but not started. Each start
observes its wait into the queue-wait histogram, so the histogram, the counters and the queue length
agree as they do in a real worker.
"""

from __future__ import annotations

import math
import random
import re
import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

from tests.harness import promtool
from tests.rules_support import PROBE, WORKER

STEP = 30  # seconds between samples and between rule evaluations, as deploy/examples/prometheus.yml


def poisson(rng: random.Random, mean: float) -> float:
    """A Poisson draw: exact below 30, the normal approximation above."""
    if mean <= 0:
        return 0.0
    if mean < 30:
        limit, k, p = math.exp(-mean), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return float(k)
            k += 1
    return float(max(0, round(rng.gauss(mean, math.sqrt(mean)))))


@dataclass
class Run:
    """One queue sampled every STEP seconds."""

    bounds: tuple[float, ...]
    started: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    buckets: dict[float, list[float]] = field(default_factory=dict)
    backlog: list[float] = field(default_factory=list)
    head_wait: list[float] = field(default_factory=list)  # the age of the oldest waiting task


def simulate(
    arrivals: Callable[[int], float],
    capacity: Callable[[int], float],
    until: int,
    bounds: tuple[float, ...],
    seed: int,
    prefetch: float = 4,
    poisson_arrivals: bool = True,
    step: int = STEP,
) -> Run:
    """`arrivals(t)` tasks a second on average, at most `capacity(t)` started a second, FIFO."""
    rng = random.Random(seed)
    run = Run(bounds=bounds, buckets={b: [] for b in (*bounds, math.inf)})
    queue: deque[list[float]] = deque()  # [publish second, tasks]
    backlog = started = 0.0
    within = dict.fromkeys((*bounds, math.inf), 0.0)
    for t in range(until + 1):
        if t % step == 0:
            held = min(backlog, prefetch)
            run.started.append(started)
            run.ready.append(backlog - held)
            run.held.append(held)
            run.backlog.append(backlog)
            run.head_wait.append(t - queue[0][0] if queue else 0.0)
            for b in within:
                run.buckets[b].append(within[b])
        mean = arrivals(t)
        n = poisson(rng, mean) if poisson_arrivals else mean
        if n:
            queue.append([float(t), n])
            backlog += n
        budget = capacity(t)
        while budget > 1e-9 and queue:
            head = queue[0]
            take = min(head[1], budget)
            wait = t - head[0]
            for b in within:
                if wait <= b:
                    within[b] += take
            started += take
            backlog -= take
            budget -= take
            head[1] -= take
            if head[1] <= 1e-9:
                queue.popleft()
    return run


def values(xs: list[float]) -> str:
    return " ".join(f"{x:.6g}" for x in xs)


def series(run: Run, queue: str, held_series: bool = True) -> list[tuple[str, str]]:
    """What the probe and a worker sidecar export for `run` on Redis."""
    q = f'queue_name="{queue}"'
    task = f'{WORKER}, name="proj.work", {q}'
    out = [
        (f'celery_queue_length{{{PROBE}, {q}, vhost="0"}}', values(run.ready)),
        (f"celery_task_started_total{{{task}}}", values(run.started)),
        (f"celery_task_queue_wait_seconds_count{{{task}}}", values(run.buckets[math.inf])),
        (f'celery_queue_oldest_message_age_seconds{{{PROBE}, {q}, vhost="0"}}', values(run.head_wait)),
    ]
    for b in run.bounds:
        out.append((f'celery_task_queue_wait_seconds_bucket{{{task}, le="{floatToGoString(b)}"}}',
                    values(run.buckets[b])))
    out.append((f'celery_task_queue_wait_seconds_bucket{{{task}, le="+Inf"}}', values(run.buckets[math.inf])))
    # One live worker consumes the queue: CeleryQueueNoConsumers has no business here.
    out += [
        (f'celery_worker_consuming{{{WORKER}, hostname="celery@w1", {q}}}', values([1.0] * len(run.held))),
        (f'celery_worker_pool_processes{{{WORKER}, hostname="celery@w1"}}', values([8.0] * len(run.held))),
    ]
    if held_series:
        out += [
            (f'celery_worker_tasks_reserved{{{WORKER}, hostname="celery@w1", {q}}}', values(run.held)),
            (f'celery_worker_tasks_scheduled{{{WORKER}, hostname="celery@w1", {q}}}', values([0.0] * len(run.held))),
        ]
    return out


FIRST = re.compile(r'\{alertname="(\w+)", queue_name="([^"]+)"\} ([-+0-9.eE]+)')


def first_pages(rules: Path, cases: dict[str, list[tuple[str, str]]], until: int, tmp_path: Path,
                which: str = 'severity="critical"', step: int = STEP) -> dict[str, dict[str, float]]:
    """For each case (queue name: its input series), the second each alert matching `which` (label
    matchers on ALERTS: by default the pages) first fired.

    Each case is one promtool test group whose expression test asks for nothing: promtool then
    prints what the expression returned, the first firing time per alert from the ALERTS series
    the rule evaluations wrote, and that is parsed. A case that prints nothing paged nothing.
    """
    tests: list[dict[str, Any]] = []
    for queue, inputs in cases.items():
        expr = (f'min by (alertname, queue_name) (min_over_time(timestamp(ALERTS{{alertstate="firing", '
                f'{which}, queue_name="{queue}"}})[{until}s:{step}s]))')
        tests.append({
            "interval": f"{step}s",
            "input_series": [{"series": s, "values": v} for s, v in inputs],
            "promql_expr_test": [{"expr": expr, "eval_time": f"{until}s", "exp_samples": []}],
        })
    path = tmp_path / "objectives.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": f"{step}s", "tests": tests}))
    run = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    found: dict[str, dict[str, float]] = {queue: {} for queue in cases}
    for alertname, queue, value in FIRST.findall(output):
        found[queue][alertname] = float(value)
    if run.returncode != 0:
        # Every failure must be one of ours (a case that paged); anything else is a broken test.
        assert output.count("expr:") == sum(1 for pages in found.values() if pages), output[:3000]
    return found
