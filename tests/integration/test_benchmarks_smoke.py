"""Every benchmark runs, at toy size, so that none of them rots between full runs.

No timing is asserted here (numbers belong in benchmarks/results.md); this
only proves each benchmark still runs end to end against the real brokers,
the real worker, the real exporter and the event-based exporter in its own
virtualenv (installed on first use, then reused).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.harness import PYTHONPATH, ROOT

SECTIONS = (
    "## Publish overhead", "## Worker overhead", "## Exporter cost per task", "## Scrape cost at scale",
    "## Probe cost", "## Hook cost", "## Overhead in instructions", "## Worker main tick",
    "## Exporter memory while children recycle",
)


@pytest.mark.long
def test_every_benchmark_runs_at_tiny_size(tmp_path: os.PathLike[str], redis_base_url: str) -> None:
    out = os.path.join(tmp_path, "results.md")
    # The benchmarks' Redis (TEST_REDIS_HOST/PORT) is the session's private redis-server, never the machine's.
    host, port = redis_base_url.split("://", 1)[1].rsplit(":", 1)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, TEST_REDIS_HOST=host, TEST_REDIS_PORT=port)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--out", out], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=480, check=False)
    took = time.monotonic() - start
    assert proc.returncode == 0, f"benchmarks failed after {took:.0f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(out) as f:
        report = f.read()
    context = f"\n--- report ---\n{report}\n--- output ---\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for heading in (*SECTIONS, "## Machine", "## Targets"):
        assert heading in report, f"{heading} missing from the report{context}"
    assert "## Benchmarks that failed" not in report, context
    # Every target of the issue has a row, decided one way or the other.
    for what in ("publish throughput", "worker throughput", "publish-side receivers", "CPU per 1000 tasks",
                 "/metrics p95", "stock collector", "Redis probe", "publish instructions per task",
                 "worker main CPU per tick", "exporter RSS growth"):
        assert what in report, f"target row '{what}' missing{context}"
    # Ours counted every task of the tiny workload (the event-based one's count is reported, not judged:
    # events are lossy by design, and a lost one is a finding, not a broken benchmark).
    assert "Counted every task: ours yes" in report, context
