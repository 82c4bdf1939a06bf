"""Compaction racing itself, scrapes and churn: two compactors, two churners and a scraper stay exact.

Dead writers are real forked processes that wrote and exited; liveness is
their writer lock, exactly as in a worker.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from typing import Any

from celery_signal_exporter import compact as compaction
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.harness import files, one_task, write_as_dead_process
from tests.recorded import merged_samples

SENT = 'celery_task_sent_total{name="a",queue_name="q"}'
RUNTIME_COUNT = 'celery_task_runtime_seconds_count{name="a",queue_name="q"}'


def test_concurrent_compactors_scrapes_and_churn_stay_exact(tmp_path: Any) -> None:
    d, stop = str(tmp_path / "m"), str(tmp_path / "stop")
    os.makedirs(d)
    ctx = multiprocessing.get_context("fork")
    n = 300
    scraping = ctx.Event()
    churners = [ctx.Process(target=_churn, args=(d, n, scraping)) for _ in range(2)]
    compactors = [ctx.Process(target=_compactor, args=(d, stop)) for _ in range(2)]
    for p in churners + compactors:
        p.start()
    collector = DirectoryCollector(d)
    seen = []
    while any(p.is_alive() for p in churners):
        s = merged_samples(collector)
        seen.append((s.get(SENT, 0), s.get(RUNTIME_COUNT, 0)))
        if len(seen) == 3:
            scraping.set()
    for p in churners:
        p.join()
        assert p.exitcode == 0
    open(stop, "w").close()
    for p in compactors:
        p.join()
        assert p.exitcode == 0
    assert len(seen) >= 3, "scrapes really ran during the churn"
    assert all(a <= b for a, b in itertools.pairwise(seen)), "a count went down: something was lost"
    assert max(v for v, _ in seen) <= 2 * n and max(v for _, v in seen) <= 2 * n, "something was counted twice"
    s = merged_samples(collector)
    assert (s[SENT], s[RUNTIME_COUNT]) == (2 * n, 2 * n)
    assert collector.last.files_unreadable == 0
    assert files(d) == ["counter_archive.db", "gauge_max_archive.db", "histogram_archive.db"], "only archives left"


def _churn(directory: str, n: int, scraping: Any) -> None:
    """n processes in a row, each counting 1 and exiting, as recycled children do.

    Halfway through it waits until the test has scraped a few times, so that scrapes
    overlap the churn however fast or slow this machine is at the moment."""
    for i in range(n):
        if i == n // 2 and not scraping.wait(timeout=120):
            raise SystemExit("no scrapes arrived within 120 s")
        write_as_dead_process(directory, one_task(i))


def _compactor(directory: str, until: str) -> None:
    while not os.path.exists(until):
        compaction.compact(directory, max_files=7)
    compaction.compact(directory, max_files=1 << 30)
