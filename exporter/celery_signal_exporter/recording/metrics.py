"""The recording machinery: a catalogue entry bound to this process's store.

What each metric is (name, type, labels, help, merge mode) is defined in
`catalogue.py`; this module writes its values into the process's file in the
metrics directory, in prometheus-client's format. The task side records
through it in `receivers.py`, the worker side in `worker.py`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import cast

from celery_signal_exporter.catalogue import Spec
from celery_signal_exporter.directory import format_le, series_key
from celery_signal_exporter.options import excluded
from celery_signal_exporter.recording.store import Doubles, MetricFile, Store, write_gauge

DEFAULT_RUNTIME_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)
DEFAULT_QUEUE_WAIT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)
#: Bytes, powers of four from 1 MiB to 4 GiB: a run that set no new peak (0) sits in the lowest
#: bucket, a 200 MB run in the one below 256 MiB. Few buckets: one histogram per (task, queue).
DEFAULT_MEMORY_GROWTH_BUCKETS: tuple[float, ...] = tuple(float(4**i * 2**20) for i in range(7))
#: Seconds, about 3 times apart: a local broker answers in about a millisecond, a far or blocked one in
#: seconds. Few buckets: every producer writes one histogram per (task, queue) it publishes.
DEFAULT_PUBLISH_BUCKETS: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)


def file_prefix(spec: Spec) -> str:
    """The file kind a spec's series go to: gauges are split by merge mode, as prometheus-client does."""
    return f"gauge_{spec.mode}" if spec.kind == "gauge" else spec.kind


class Series:
    """One labelled series, writing straight into this process's file.

    Its slots are looked up once and kept as indexes into the file's doubles
    until the store changes (after a fork), so a write is one lock and one
    `values[i] += x`.
    """

    __slots__ = ("_bounds", "_excluded", "_file", "_generation", "_index", "_keys", "_prefix", "_store")

    def __init__(self, store: Store, spec: Spec, values: Sequence[str], buckets: Sequence[float],
                 excluded: bool = False) -> None:
        labels = dict(zip(spec.labels, values, strict=True))
        self._store = store
        self._bounds: list[float] = list(buckets)
        if spec.kind == "counter":
            self._keys = [series_key(spec.name, spec.name + "_total", labels, spec.help)]
        elif spec.kind == "gauge":
            self._keys = [series_key(spec.name, spec.name, labels, spec.help)]
        else:
            self._keys = [
                series_key(spec.name, spec.name + "_bucket", {**labels, "le": format_le(b)}, spec.help)
                for b in self._bounds
            ] + [series_key(spec.name, spec.name + "_sum", labels, spec.help)]
        self._prefix = file_prefix(spec)
        self._generation = -1
        self._file: MetricFile | None = None
        self._index: list[int] = []
        # A family switched off (options.py) writes into memory nobody reads: no file space, no series,
        # and every caller (the per-task path binds several series at once) stays as it is.
        self._excluded = excluded
        if excluded:
            self._file = cast(MetricFile, _Scratch(len(self._keys) + 1))
            self._index = list(range(len(self._keys)))

    def _current(self) -> MetricFile:
        f = self._file
        if f is None or (self._generation != self._store.generation and not self._excluded):
            f = self._store.file(self._prefix)
            self._index = [f.slot(k) >> 3 for k in self._keys]
            self._file = f
            self._generation = self._store.generation
        return f

    @property
    def key(self) -> str:
        """The file key of a counter's or gauge's one value (the ledger holds such keys)."""
        return self._keys[0]

    @property
    def bounds(self) -> list[float]:
        """A histogram's bucket upper bounds, +Inf last."""
        return self._bounds

    def binding(self) -> tuple[MetricFile, list[int]]:
        """The file and value indexes to write, for a caller that holds the store lock and
        writes several series at once (the per-task path in receivers.py)."""
        return self._current(), self._index

    def inc(self, amount: float = 1.0) -> None:
        with self._store.lock:
            self._current().values[self._index[0]] += amount

    def set(self, value: float, timestamp: float = 0.0) -> None:
        with self._store.lock:
            write_gauge(self._current().values, self._index[0], value, timestamp)


def write_observation(values: Doubles, index: list[int], bounds: list[float], value: float) -> None:
    """One histogram observation: its (non-cumulative) bucket and the sum. The caller holds the store lock."""
    values[index[bisect.bisect_left(bounds, value)]] += 1.0
    values[index[-1]] += value


class _Scratch:
    """Where a switched-off family's series write: the doubles of one series (and a gauge's timestamp)."""

    __slots__ = ("values",)

    def __init__(self, size: int) -> None:
        self.values = [0.0] * size


class Recorder:
    """A catalogue entry bound to a store, with its series cached by label values."""

    def __init__(self, store: Store, spec: Spec, buckets: Sequence[float] = ()) -> None:
        self.spec = spec
        self._store = store
        self._excluded = excluded(store.exclude, spec.name)
        finite = sorted(float(b) for b in buckets if b != math.inf)
        self._buckets = (*finite, math.inf) if spec.kind == "histogram" else ()
        self._series: dict[tuple[str, ...], Series] = {}

    def labels(self, *values: str) -> Series:
        series = self._series.get(values)
        if series is None:
            series = Series(self._store, self.spec, values, self._buckets, self._excluded)
            self._series[values] = series
        return series

