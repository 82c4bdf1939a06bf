"""The merge under long, messy operation: files growing while read, children recycling for hours.

Writers here are real processes (forked, writing through the product's own
Store), and the reader is the exporter's own DirectoryCollector.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
import tracemalloc
from typing import Any

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.compact import compact
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.recorded import merged_samples, observe

STARTED = 'celery_task_started_total{name="steady",queue_name="q"}'


def _grow(directory: str, ready: Any, done: Any) -> None:
    """Count 1000 starts of one task, then add 4000 new histogram series: the file grows (past the
    reader's first 4 KB read and past its 64 KB preallocation) while the reader reads it."""
    store = Store(directory)
    m.Recorder(store, c.STARTED).labels("steady", "q").inc(1000)
    runtime = m.Recorder(store, c.RUNTIME, m.DEFAULT_RUNTIME_BUCKETS)
    ready.set()
    for n in range(4000):
        observe(store, runtime.labels(f"young-{n}", "q"), 0.1)
    done.set()
    time.sleep(60)  # stay alive (the file stays live) until the test is done


def test_a_file_growing_under_the_reader_is_never_damaged_and_never_goes_backwards(tmp_path: Any) -> None:
    directory = str(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_grow, args=(directory, ready, done))
    writer.start()
    try:
        assert ready.wait(30), "the writer did not start"
        collector = DirectoryCollector(directory)
        counts: list[int] = []
        while not done.is_set() or len(counts) < 5:
            samples = merged_samples(collector)
            assert collector.last.files_unreadable == 0, collector.last.unreadable
            assert samples.get(STARTED) == 1000, "the whole file was dropped from this scrape"
            counts.append(int(sum(v for k, v in samples.items()
                                  if k.startswith("celery_task_runtime_seconds_count"))))
        samples = merged_samples(collector)  # one more, after the writer is done
        counts.append(int(sum(v for k, v in samples.items() if k.startswith("celery_task_runtime_seconds_count"))))
        assert counts == sorted(counts), "a counter went backwards between two scrapes"
        assert len(set(counts)) >= 3, f"too few scrapes caught the file growing: {counts}"
        assert counts[-1] == 4000
        assert os.path.getsize(os.path.join(directory, f"histogram_{writer.pid}.db")) > 1 << 16
    finally:
        writer.kill()
        writer.join(30)


NAMES = [f"task.{i}" for i in range(30)]


def _recycled_child(directory: str, seed: int) -> None:
    """A pool child's life: it first sees the app's task names in its own order, then exits."""
    tracemalloc.stop()  # the parent's tracing is inherited; only the collector's memory is measured
    if seed % 4 == 0:  # the worker's tick compacts what earlier children left (here a child does it)
        compact(directory)
    store = Store(directory)
    names = NAMES[:]
    random.Random(seed).shuffle(names)
    started = m.Recorder(store, c.STARTED)
    runtime = m.Recorder(store, c.RUNTIME, m.DEFAULT_RUNTIME_BUCKETS)
    for name in names:
        started.labels(name, "q").inc()
        observe(store, runtime.labels(name, "q"), 0.01)
    store.close()
    os._exit(0)


def test_caches_are_bounded_by_the_directory_not_by_how_many_children_came_and_went(tmp_path: Any) -> None:
    """Each recycled child lays its file out in its own order; the collector once kept every layout
    it had seen (about 62 KB a child). After the first few hundred children, memory must be flat."""
    directory = str(tmp_path)
    collector = DirectoryCollector(directory)
    ctx = multiprocessing.get_context("fork")
    tracemalloc.start()
    try:
        traced: dict[int, int] = {}
        for child in range(1, 301):
            proc = ctx.Process(target=_recycled_child, args=(directory, child))
            proc.start()
            proc.join(30)
            merged = merged_samples(collector)
            if child in (100, 300):
                traced[child] = tracemalloc.get_traced_memory()[0]
        assert merged['celery_task_started_total{name="task.0",queue_name="q"}'] == 300
        growth = traced[300] - traced[100]
        assert growth < 256 * 1024, f"the collector grew {growth} bytes over 200 recycled children"
    finally:
        tracemalloc.stop()
