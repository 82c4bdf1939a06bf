"""The merge under long, messy operation: children recycling for hours (a file growing while it is
read: tests/unit/test_merge.py).

Writers here are real processes (forked, writing through the product's own
Store), and the reader is the exporter's own DirectoryCollector.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import tracemalloc
from typing import Any

import pytest

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.compact import compact
from celery_signal_exporter.recording import metrics as m
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server.collect import DirectoryCollector
from tests.recorded import merged_samples, observe

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


@pytest.mark.long
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
