"""The exporter's memory stays flat while the values it serves keep changing (issue 27, item 1).

A writer (this test, through the store) observes a new runtime for each of 400
series ten times a second, so scrapes keep serving sums never served before; four scrapers ask
for /metrics as fast as it answers, for 30 s. The exporter's RSS over the
last two thirds must grow by at most 2 MB. Before: the encoder kept the text of
every distinct value served (up to 200 000 of them, ~27 MiB), +6 MB in 120 s
with one writer and +7.3 MB in the last third of a 10-minute soak; this test
measured +10.1 MB over its last 20 s (+0.4 MB after).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from tests.harness import exporter
from tests.http_support import rss_mb
from tests.recorded import observe

#: Timing-sensitive: .ci/run runs it alone, after the parallel tests.
pytestmark = pytest.mark.serial

SECONDS = 30.0
MAX_GROWTH_MB = 2.0


def test_rss_is_flat_while_values_keep_changing(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    stop = threading.Event()

    def write() -> None:
        store = Store(str(directory))
        runtime = m.Recorder(store, c.RUNTIME, [0.001 * 2 ** i for i in range(12)])
        series = [runtime.labels(f"app.tasks.t{i:03d}", "default") for i in range(400)]
        while not stop.is_set():
            for one in series:
                observe(store, one, random.random())
            time.sleep(0.1)
        store.close()

    scrapes = [0]

    def scrape(url: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                assert client.get(url).status_code == 200
                scrapes[0] += 1

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    with exporter(str(tmp_path), "--metrics-dir", str(directory), "--compact-interval", "0") as ex:
        scrapers = [threading.Thread(target=scrape, args=(ex.url + "/metrics",), daemon=True) for _ in range(4)]
        for t in scrapers:
            t.start()
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        try:
            while (now := time.monotonic()) - start < SECONDS:
                samples.append((now - start, rss_mb(ex.proc.pid)))
                time.sleep(0.5)
        finally:
            stop.set()
            for t in [*scrapers, writer]:
                t.join(30)
    after_third = [mb for t, mb in samples if t >= SECONDS / 3]
    first, last = statistics.median(after_third[:5]), statistics.median(after_third[-5:])
    print(" ".join(f"{mb:.0f}" for _, mb in samples[::4]))
    print(f"\n{scrapes[0]} scrapes; RSS {samples[0][1]:.1f} MB at start, {first:.1f} at a third, {last:.1f} at the end "
          f"(+{last - first:.1f} MB over the last two thirds)")
    assert scrapes[0] > 100, "too few scrapes for this test to mean anything"
    assert last - first <= MAX_GROWTH_MB, f"RSS grew {last - first:.1f} MB over the last two thirds"
