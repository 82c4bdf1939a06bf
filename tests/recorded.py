"""What tests and benchmarks write into and read out of a metrics directory, and the product never needs.

The product observes histograms only on the per-task path (recording/receivers.py, the write inlined)
and serves a merge only as text; tests want a single observation through a series, and a merge
flattened to a dict.
"""

from __future__ import annotations

from celery_signal_exporter.recording.metrics import Series, write_observation
from celery_signal_exporter.recording.store import Store
from celery_signal_exporter.server.collect import DirectoryCollector


def observe(store: Store, series: Series, value: float) -> None:
    """One histogram observation through `series` of `store`, under the store's lock as the product writes."""
    with store.lock:
        file, index = series.binding()
        write_observation(file.values, index, series.bounds, value)


def merged_samples(collector: DirectoryCollector) -> dict[str, float]:
    """A collector's output flattened to 'name{a="b"}' -> value."""
    out: dict[str, float] = {}
    for family in collector.collect():
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out
