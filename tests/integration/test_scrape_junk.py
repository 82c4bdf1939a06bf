"""A scrape costs the same with 50 000 foreign files in the directory (issue 27, the junk item).

In-process, through the service's own render (merge and text), on two
directories with the same metrics, one of them also holding the junk of
tests/integration/test_worker_tick.py (empty and garbage files under our names, and
foreign names). Scrapes alternate between the two, so that the machine's
load falls on both alike, and their 95th percentiles are compared: a ratio
(with 2 ms of slack for a shared machine), as the issue asks for; the best of
up to three rounds of 40 each.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest

from celery_signal_exporter.server.config import ServeConfig
from celery_signal_exporter.server.service import Exporter
from tests.harness import make_junk, settle
from tests.http_support import fill

#: Timing-sensitive: .ci/run runs it alone, after the parallel tests.
pytestmark = pytest.mark.serial

SCRAPES = 40
ROUNDS = 3


def p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20)[-1]


def test_junk_in_the_directory_does_not_slow_a_scrape(tmp_path: Path) -> None:
    """Before: p50 23 -> 247 ms (every junk file opened on every scrape)."""
    clean, junk = tmp_path / "clean", tmp_path / "junk"
    fill(clean, 300)
    fill(junk, 300)
    make_junk(str(junk))
    time.sleep(2.5)  # a file that fails younger than 2 s is read again (a foreign writer may be making it)
    settle(str(junk))
    settle(str(clean))
    exporters = {"clean": Exporter(ServeConfig(metrics_dir=str(clean))),
                 "junk": Exporter(ServeConfig(metrics_dir=str(junk)))}
    bodies = {what: ex.render(None)[0] for what, ex in exporters.items()}  # the first scrape reads everything
    assert bodies["clean"].split(b"\n# HELP celery_exporter_merge_errors")[0] == \
        bodies["junk"].split(b"\n# HELP celery_exporter_merge_errors")[0]
    stats = exporters["junk"].directory.last if exporters["junk"].directory else None
    assert stats is not None and stats.files_unreadable == len([n for n in os.listdir(junk) if n.endswith(".db")]) \
        - len([n for n in os.listdir(clean)]), "the junk is still counted as unreadable"
    rounds = []
    for _ in range(ROUNDS):  # a busy shared machine only ever adds to a round: the best one tells
        times: dict[str, list[float]] = {"clean": [], "junk": []}
        for _ in range(SCRAPES):
            for what, ex in exporters.items():
                start = time.perf_counter()
                ex.render(None)
                times[what].append(time.perf_counter() - start)
        clean_p95, junk_p95 = p95(times["clean"]), p95(times["junk"])
        rounds.append((junk_p95 - 1.2 * clean_p95, clean_p95, junk_p95))
        print(f"\nscrape p50/p95: clean {1000 * statistics.median(times['clean']):.1f}/{1000 * clean_p95:.1f} ms, "
              f"50 000 junk files {1000 * statistics.median(times['junk']):.1f}/{1000 * junk_p95:.1f} ms")
        if junk_p95 <= 1.2 * clean_p95 + 0.002:
            break
    _, clean_p95, junk_p95 = min(rounds)
    assert junk_p95 <= 1.2 * clean_p95 + 0.002, f"p95 {1000 * junk_p95:.1f} ms against {1000 * clean_p95:.1f} clean"
