"""Pages from each queue's objective, judged at production windows by the time they take to page.

Every case is a queue simulated second by second (tests/objectives_sim.py: Poisson arrivals, a pool
starting at most its capacity, FIFO waits observed into the histogram) and sampled every 30 s, and
promtool runs the rules on it every 30 s. The overload grid (drain rates x overload ratios x
objectives) must page within the issue's targets, or, off the table, before the first task has
waited longer than its objective; the healthy shapes must never page. The first page times are
printed (`pytest -s`) and are docs/monitoring.md's table.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_signal_exporter.mixin.config import PRODUCTION, QueueObjective, check_objectives, seconds
from celery_signal_exporter.mixin.generate import to_yaml
from celery_signal_exporter.mixin.rules import rule_groups
from tests.harness import promtool
from tests.objectives_sim import first_pages, series, simulate
from tests.rules_support import RULES

ONSET = 1800  # half an hour of history before an overload starts
UNTIL = ONSET + 3900  # the longest target (60 min) and a scrape or two
PRE = 0.9  # arrivals before the onset, as a share of the drain rate
BREACH = "CeleryQueueWaitWillBreach"

#: (drain rate a second, arrivals over drain) -> minutes from onset to the first page, the issue's targets.
TARGETS: dict[tuple[float, float], float] = {
    (10, 1.5): 5, (10, 3): 5, (10, 1.2): 15, (10, 1.1): 30, (10, 1.05): 60, (1, 1.2): 15, (100, 1.1): 30,
}
DRAINS = (1, 10, 100)
RATIOS = (1.05, 1.1, 1.2, 1.5, 3)

#: The mix of the issue: an urgent queue (60 s), the default (5 m) and a batch queue (2 h).
URGENT = QueueObjective(queue="urgent.*", wait="1m")
BATCH = QueueObjective(queue="batch.*", wait="2h")
MIX = dataclasses.replace(PRODUCTION, objectives=(URGENT, BATCH),
                          queue_wait_buckets=tuple(sorted({*PRODUCTION.queue_wait_buckets, 7200.0})))


def first_wait_past(objective: float, ratio: float) -> float:
    """Seconds from the onset until the head of the queue has waited `objective`: a task published p
    after the onset waits (ratio - 1) p, so the head at t was published t / ratio ago."""
    return ratio * objective / (ratio - 1)


def bounds(objective: float) -> tuple[float, ...]:
    return tuple(sorted({60.0, 300.0, 7200.0, objective}))


def overload(drain: float, ratio: float) -> Callable[[int], float]:
    return lambda t: drain * (PRE if t < ONSET else ratio)


def case_name(drain: float, ratio: float, objective: str) -> str:
    return f"d{drain:g}-r{ratio:g}-{objective}"


def mix_rules(tmp_path: Path) -> Path:
    path = tmp_path / "mix-rules.yml"
    path.write_text(to_yaml(rule_groups(MIX)))
    return path


def grid(objective: str, prefix: str = "") -> dict[str, tuple[float, float]]:
    return {prefix + case_name(d, r, objective): (d, r) for d in DRAINS for r in RATIOS}


def report(title: str, found: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}: minutes from the onset to the first page (none = no page)")
    for queue, pages in found.items():
        shown = ", ".join(f"{name} {(at - ONSET) / 60:.1f}" for name, at in sorted(pages.items())) or "none"
        print(f"  {queue}: {shown}")


def test_the_grid_runs_the_committed_production_rules() -> None:
    """The default objective's cases read deploy/prometheus/celery-rules.yml itself."""
    text = RULES.read_text()
    assert 'celery_task_queue_wait_seconds_bucket{job=~".*celery.*", queue_name=~".*", le=~"300(\\\\.0)?"}' in text
    assert "- record: queue:celery_queue_arrivals_per_start:ratio" in text and "window: 30m" in text
    assert "- alert: CeleryQueueWaitWillBreach" in text
    assert (PRODUCTION.breach_horizon, PRODUCTION.breach_for) == ("1h", "2m")


def test_every_overload_of_the_default_objective_pages_in_time(tmp_path: Path) -> None:
    """5 m objective: every drain rate x overload ratio pages within its target, the table's where it
    has one, else before the first task has waited 5 m."""
    cases = grid("5m")
    inputs = {q: series(simulate(overload(d, r), lambda t, d=d: d, UNTIL, bounds(300), seed=i), q)
              for i, (q, (d, r)) in enumerate(cases.items())}
    found = first_pages(RULES, inputs, UNTIL, tmp_path)
    report("default objective 5m", found)
    late = []
    for queue, (drain, ratio) in cases.items():
        target = TARGETS.get((drain, ratio), first_wait_past(300, ratio) / 60)
        paged = found[queue].get(BREACH, math.inf)
        if (paged - ONSET) / 60 > target:
            late.append(f"{queue}: {(paged - ONSET) / 60:.1f} min, target {target:.1f}")
    assert not late, late


def test_the_issue_targets_hold_at_prometheus_default_1m_scrape_and_evaluation(tmp_path: Path) -> None:
    """The same targets with samples and evaluations every minute, and the healthy shapes stay quiet."""
    cases = {f"m-{case_name(d, r, '5m')}": (d, r) for (d, r) in TARGETS}
    inputs = {q: series(simulate(overload(d, r), lambda t, d=d: d, UNTIL, bounds(300), seed=400 + i, step=60), q)
              for i, (q, (d, r)) in enumerate(cases.items())}
    found = first_pages(RULES, inputs, UNTIL, tmp_path, step=60)
    report("default objective 5m, 1m scrape and evaluation", found)
    late = [f"{q}: {(found[q].get(BREACH, math.inf) - ONSET) / 60:.1f} min, target {TARGETS[dr]}"
            for q, dr in cases.items() if (found[q].get(BREACH, math.inf) - ONSET) / 60 > TARGETS[dr]]
    assert not late, late
    quiet = first_pages(RULES, healthy_default(step=60), UNTIL, tmp_path, step=60)
    assert quiet == {q: {} for q in quiet}


def test_an_urgent_queue_pages_before_its_first_task_waits_its_objective(tmp_path: Path) -> None:
    """60 s objective on the mix's rules: arrivals at 1.3 x (the issue's case) and the grid. The floor of
    100 waiting tasks is above a 1/s queue's whole objective (60 tasks): that row pages only from the
    burn rate once tasks have waited, and is left out here (docs/monitoring.md says so)."""
    cases = {f"urgent-{case_name(d, r, '1m')}": (d, r) for d in (10, 100) for r in (*RATIOS, 1.3)}
    inputs = {q: series(simulate(overload(d, r), lambda t, d=d: d, UNTIL, bounds(60), seed=100 + i), q)
              for i, (q, (d, r)) in enumerate(cases.items())}
    found = first_pages(mix_rules(tmp_path), inputs, UNTIL, tmp_path)
    report("urgent objective 60s", found)
    # The issue's case, strictly: 1.3 x pages before the first task has waited 60 s (260 s).
    for d in (10, 100):
        assert found[f"urgent-{case_name(d, 1.3, '1m')}"][BREACH] - ONSET < first_wait_past(60, 1.3)
    # The grid: before the first task waits 60 s, or within the issue's fastest target (5 min) where the
    # overload is so fast (3 x: 90 s) that two scrapes and `breach_for` cannot come before it.
    late = [f"{q}: {(found[q].get(BREACH, math.inf) - ONSET):.0f} s, first wait past 60 s at "
            f"{first_wait_past(60, r):.0f} s" for q, (d, r) in cases.items()
            if found[q].get(BREACH, math.inf) - ONSET >= max(first_wait_past(60, r), 300)]
    assert not late, late


def healthy_default(step: int = 30) -> dict[str, list[tuple[str, str]]]:
    """The shapes that must never page at the default objective."""
    ten = lambda t: 10.0  # noqa: E731
    shapes: dict[str, tuple[Callable[[int], float], Callable[[int], float]]] = {
        # 1 500 at once every 10 minutes onto a 2/s trickle, drained at 10/s (each burst in ~3 min).
        "bursts": (lambda t: 2.0 + (1500.0 if t % 600 == 300 else 0.0), ten),
        # A daily swing, compressed: 5 to 9 a second over 2 hours, below the 10/s drain.
        "swing": (lambda t: 7.0 + 2.0 * math.sin(2 * math.pi * t / 7200), ten),
        # A queue 95 % busy, steadily.
        "busy-95": (lambda t: 9.5, ten),
        # No consumers and no tasks overnight.
        "idle-overnight": (lambda t: 0.0, lambda t: 0.0),
        # One of two workers retired gracefully: the drain falls from 10/s to 6/s, under 5/s arrivals.
        "worker-retired": (lambda t: 5.0, lambda t: 10.0 if t < ONSET else 6.0),
    }
    return {q: series(simulate(a, c, UNTIL, bounds(300), seed=200 + i, step=step), q)
            for i, (q, (a, c)) in enumerate(shapes.items())}


def test_healthy_traffic_never_pages(tmp_path: Path) -> None:
    found = first_pages(RULES, healthy_default(), UNTIL, tmp_path)
    report("healthy shapes, default objective", found)
    assert found == {q: {} for q in found}


def test_a_batch_queue_within_its_2h_objective_never_pages(tmp_path: Path) -> None:
    """30 000 tasks enqueued in 30 s onto a queue that drains them in an hour: every one starts within
    its 2 h objective, so nothing pages, although the queue holds an hour of work."""
    drain = 30000 / 3600
    run = simulate(lambda t: 1000.0 if ONSET <= t < ONSET + 30 else 0.5, lambda t: drain, UNTIL, bounds(7200),
                   seed=300, poisson_arrivals=False)
    assert max(run.backlog) > 29000 and max(run.head_wait) < 3700
    found = first_pages(mix_rules(tmp_path), {"batch-30k": series(run, "batch-30k")}, UNTIL, tmp_path)
    assert found == {"batch-30k": {}}


def test_an_objective_off_the_buckets_is_a_one_line_error_naming_a_value_that_works() -> None:
    bad = dataclasses.replace(PRODUCTION, objectives=(QueueObjective(queue="urgent", wait="45s"),))
    with pytest.raises(ValueError) as info:
        check_objectives(bad)
    message = str(info.value)
    assert "\n" not in message and "45s is not a bucket of celery_task_queue_wait_seconds" in message
    assert "CELERY_EXPORTER_QUEUE_WAIT_BUCKETS=0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,45,60," in message
    assert seconds("45s") == 45


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("objectives:\n  - {queue: urgent, wait: 45s}\n",
     "objective 45s is not a bucket of celery_task_queue_wait_seconds; set CELERY_EXPORTER_QUEUE_WAIT_BUCKETS="
     "0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,45,60,120,300,600,1800,3600 on the workers and the same "
     "list as queue_wait_buckets here"),
    ("objectives:\n  - {queue: batch, wait: 2h}\nqueue_wait_buckets: [1, 60, 300, 7200]\n"
     "default_objective: {wait: 5m, runtime: [{task: 'proj\\.report', within: 45s}]}\n",
     "objective 45s is not a bucket of celery_task_runtime_seconds; set CELERY_EXPORTER_RUNTIME_BUCKETS="
     "0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,45,60,120,300,600,1800,3600"),
    ("objectives:\n  - {queue: urgent, wait: 1m, latency: 5s}\n",
     "objectives: unknown key latency (expected queue, wait, target, runtime)"),
    ("objectives:\n  - {queue: urgent, wait: 1 minute}\n",
     "objective for queue 'urgent': not a Prometheus duration: '1 minute'"),
    ("objectives:\n  - {queue: urgent}\n", "objectives: {'queue': 'urgent'} needs queue, wait"),
    ("default_objective: {wait: 5m, target: 99}\n", "target 99 must be a share between 0 and 1"),
    ("objectives:\n  - {queue: '(urgent', wait: 1m}\n", "'(urgent' is not a regex"),
])
def test_a_bad_objective_is_one_line_and_exit_2(tmp_path: Path, yaml_text: str, message: str) -> None:
    """Through the real generator, as a user runs it: one line on stderr, exit 2, nothing written."""
    config = tmp_path / "mine.yaml"
    config.write_text(yaml_text)
    run = subprocess.run([sys.executable, "-m", "celery_signal_exporter.mixin", "--config", str(config),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("mixin: error: "), run.stderr
    assert message in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def test_a_good_objective_config_generates_rules_promtool_accepts(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("objectives:\n  - {queue: 'urgent|payments', wait: 1m, target: 0.999}\n"
                      "  - {queue: 'batch.*', wait: 1h, runtime: [{task: 'proj\\.report\\..*', within: 30m}]}\n"
                      "default_objective: {wait: 10m}\n")
    run = subprocess.run([sys.executable, "-m", "celery_signal_exporter.mixin", "--config", str(config),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rules = (tmp_path / "out" / "prometheus-rules.yaml").read_text()
    assert 'queue_name=~"urgent|payments", le=~"60(\\\\.0)?"' in rules
    assert 'queue_name=~"batch.*", queue_name!~"urgent|payments"' in rules
    assert "> 0.0144" in rules  # 14.4 x the 0.1 % budget of the 99.9 % objective
    assert "- alert: CeleryTaskRuntimeBudgetBurn" in rules
    checked = subprocess.run([promtool(), "check", "rules", str(tmp_path / "out" / "prometheus-rules.yaml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
