"""Metric exclusion (issue 26): families switched off by one regex, on both sides.

The workers record nothing of an excluded family (nothing in their files, so no series even for an
exporter that excludes nothing), the exporter serves nothing of one whoever wrote it, every other
count stays exact, and `check` names the alerts an exclusion leaves blind, one line each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from celery_signal_exporter.options import excluded, parse_exclude
from tests.harness import ROOT, Samples, env_for, exporter, produce, value, wait_until, worker

WORKER_SIDE = "celery_task_queue_wait_seconds|celery_task_runtime_seconds"


def test_a_family_matches_by_name_with_or_without_its_sample_suffix() -> None:
    pattern = parse_exclude("celery_task_sent|celery_task_cpu_.*")
    assert excluded(pattern, "celery_task_sent") and excluded(pattern, "celery_task_sent_total")
    assert excluded(pattern, "celery_task_cpu_seconds")
    assert not excluded(pattern, "celery_task_sent_at") and not excluded(pattern, "celery_task_started")
    assert excluded(parse_exclude("celery_task_runtime_seconds_bucket"), "celery_task_runtime_seconds")
    assert parse_exclude("") is None and parse_exclude(None) is None and not excluded(None, "celery_task_sent")
    with pytest.raises(ValueError, match=r"^exclude_metrics: '\(x' is not a regex: missing \)"):
        parse_exclude("(x", "exclude_metrics")


def test_workers_record_nothing_of_an_excluded_family_and_the_rest_stays_exact(
        redis_url: str, tmp_path: Path) -> None:
    metrics_dir = str(tmp_path / "metrics")
    env = env_for(redis_url, metrics_dir, CELERY_EXPORTER_EXCLUDE_METRICS=WORKER_SIDE)
    with (
        worker(env, str(tmp_path), concurrency=2),
        exporter(str(tmp_path), "--metrics-dir", metrics_dir) as plain,
        exporter(str(tmp_path), "--metrics-dir", metrics_dir, "--exclude-metrics", "celery_task_sent_total") as ex,
    ):
        produce(env, "counts")

        def settled() -> Samples | None:
            s = plain.scrape()
            done = value(s, "celery_task_succeeded_total") + value(s, "celery_task_failed_total")
            return s if done >= 45 else None

        s = wait_until(settled, 90, "the workload to finish")
        served = ex.get("/metrics").text
    # Nothing of the excluded families anywhere: not served, not even written to a file.
    assert not [k for k in s if k[0].startswith(("celery_task_queue_wait_seconds", "celery_task_runtime_seconds"))]
    written = b"".join(Path(metrics_dir, f).read_bytes() for f in os.listdir(metrics_dir))
    assert b"celery_task_queue_wait_seconds" not in written and b"celery_task_runtime_seconds" not in written
    # Everything else exact (tests/integration/test_worker_counts.py's workload).
    assert value(s, "celery_task_started_total", name="t.ok") == 30
    assert value(s, "celery_task_succeeded_total", name="t.retry_twice", queue_name="beta") == 5
    assert value(s, "celery_task_failed_total", name="t.fail") == 10
    assert value(s, "celery_task_sent_total", name="t.ok", queue_name="beta") == 10
    assert value(s, "celery_task_in_progress") == 0
    # The exporter side: the sent counter the workers wrote is not served there, the rest is.
    assert "celery_task_sent_total" not in served and "# TYPE celery_task_sent " not in served
    assert 'celery_task_started_total{name="t.ok",queue_name="alpha"} 20.0' in served


def test_check_names_the_rules_an_exclusion_leaves_blind() -> None:
    env = {**os.environ, "CELERY_EXPORTER_EXCLUDE_METRICS": "celery_task_queue_wait_seconds"}
    run = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli", "check"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "ok: 1 metric families excluded\n"
    warnings = run.stderr.splitlines()
    assert all(line.startswith("celery-signal-exporter: warning: ") for line in warnings), warnings
    blind = {line.split(": warning: ")[1].split(" goes blind")[0] for line in warnings}
    assert {"CeleryQueueWaitBudgetBurn", "CeleryQueueWaitBudgetBurnSlow",
            "queue:celery_task_queue_wait:error_ratio"} <= blind
    assert "CeleryQueueWaitWillBreach" not in blind  # it reads the backlog and starts, not the histogram
    assert len(blind) == len(warnings), "one line per rule"
