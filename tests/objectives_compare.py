"""docs/monitoring.md's comparison: minutes from an overload's onset to the first page, for the
objective rules, for the rules before them (git revision 8cbd7b1) and for celery-mixin's queue alert.

    .venv/bin/python -m tests.objectives_compare [OLD_RULES]

Same simulated queues as tests/system/test_alert_rules_objectives.py (30 s scrape and evaluation, Poisson
arrivals, 30 minutes at 0.9 x before the onset), run for 150 minutes after the onset.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.objectives_sim import first_pages, series, simulate
from tests.rules_support import ROOT, RULES

ONSET = 1800
UNTIL = ONSET + 9000
CASES = [(10, 1.05), (10, 1.1), (10, 1.2), (10, 1.5), (10, 3), (1, 1.2), (100, 1.1)]
OLD = "8cbd7b1"  # the last main before objectives
# celery-mixin (danihodovic/celery-exporter): more than 100 messages in the broker's queue for 20m.
MIXIN = {"groups": [{"name": "celery-mixin", "rules": [{
    "alert": "CeleryHighQueueLength",
    "expr": 'sum(celery_queue_length{job=~".*celery.*", queue_name!~"None"}) by (job, namespace, queue_name) > 100',
    "for": "20m", "labels": {"severity": "warning"},
}]}]}
OLD_BACKLOG = 'alertname=~"CeleryBacklogGrowing|CeleryBacklogWillBreach|CeleryQueueWaitHigh|CeleryOldestMessageTooOld"'


def first_wait_past(objective: float, ratio: float) -> float:
    return ratio * objective / (ratio - 1)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old = Path(argv[0]) if argv else tmp / "old.yml"
        if not argv:
            old.write_text(subprocess.run(["git", "show", f"{OLD}:deploy/prometheus/celery-rules.yml"], cwd=ROOT,
                                          check=True, capture_output=True, text=True).stdout)
        mixin = tmp / "mixin.yml"
        mixin.write_text(yaml.safe_dump(MIXIN))
        cases = {}
        for i, (drain, ratio) in enumerate(CASES):
            run = simulate(lambda t, d=drain, r=ratio: d * (0.9 if t < ONSET else r), lambda t, d=drain: d, UNTIL,
                           (60.0, 300.0), seed=i)
            cases[f"d{drain:g}-r{ratio:g}"] = series(run, f"d{drain:g}-r{ratio:g}")
        ours = first_pages(RULES, cases, UNTIL, tmp)
        before = first_pages(old, cases, UNTIL, tmp, OLD_BACKLOG)
        theirs = first_pages(mixin, cases, UNTIL, tmp, 'alertname="CeleryHighQueueLength"')
    print("| drain | arrivals | first task waits 5m | objectives (page) | before (first backlog alert) | "
          "celery-mixin CeleryHighQueueLength |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (drain, ratio), queue in zip(CASES, cases, strict=True):
        def shown(found: dict[str, float]) -> str:
            if not found:
                return "none in 150 min"
            name, at = min(found.items(), key=lambda item: item[1])
            return f"{(at - ONSET) / 60:.1f} min ({name})"
        print(f"| {drain:g}/s | {ratio:g} x | {first_wait_past(300, ratio) / 60:.0f} min | {shown(ours[queue])} | "
              f"{shown(before[queue])} | {shown(theirs[queue])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
