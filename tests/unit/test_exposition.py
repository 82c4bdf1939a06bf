"""Our encoder must write exactly what prometheus-client's encoders write, for
every Accept header prometheus-client negotiates, including the cases it
hands back to prometheus-client."""

from __future__ import annotations

import math

import pytest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import choose_encoder

from celery_signal_exporter.server.exposition import Encoder
from tests.recorded import observe

HOSTILE = 'a"b\\c\nd é☃ ' + "x" * 10_000


class Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def families() -> list[Metric]:
    sent = CounterMetricFamily("celery_task_sent", "Tasks published.\nSecond line \\ with backslash",
                               labels=["queue_name", "name"])
    sent.add_metric(["alpha", "t.ok"], 3)
    sent.add_metric(["beta", HOSTILE], 1e21)
    sent.add_metric(["", ""], 0)
    failed = CounterMetricFamily("celery_task_failed", "Failures.", labels=["name", "queue_name", "exception"])
    failed.add_metric(["t.fail", "alpha", HOSTILE], 2)
    runtime = HistogramMetricFamily("celery_task_runtime_seconds", "Runtime.", labels=["name", "queue_name"])
    runtime.add_metric(["t.ok", "alpha"], [("0.1", 1), ("1.0", 2), ("+Inf", 3)], sum_value=1.25)
    runtime.add_metric([HOSTILE, "beta"], [("0.1", 0), ("+Inf", 0)], sum_value=0)
    up = GaugeMetricFamily("celery_worker_up", 'Worker "up".', labels=["hostname"])
    up.add_metric(["w1@h"], 1)
    up.add_metric(["w2@h"], math.nan)
    up.add_metric(["w3@h"], -math.inf)
    up.add_metric(["w4@h"], -0.0)
    up.add_metric(["w5@h"], 0)
    up.add_metric(["w6@h"], 0.0)
    plain = GaugeMetricFamily("celery_exporter_scrape_duration_seconds", "Plain.", value=0.000123456789)
    big = GaugeMetricFamily("celery_broker_memory_used_bytes", "Bytes.", labels=["broker", "node"])
    big.add_metric(["redis://h:6379/0", "h:6379"], 1234567890123.0)
    return [sent, failed, runtime, up, plain, big]


def awkward() -> list[Metric]:
    """Families our fast path hands to prometheus-client."""
    stamped = GaugeMetricFamily("celery_stamped", "With a timestamp.", labels=["x"])
    stamped.add_metric(["1"], 1, timestamp=1700000000.5)
    summary = SummaryMetricFamily("celery_summary", "With _created.", labels=["x"])
    summary.add_metric(["1"], count_value=2, sum_value=3.5)
    summary.add_sample("celery_summary_created", {"x": "1"}, 1700000000.0)
    dotted = GaugeMetricFamily("celery.dotted", "Needs escaping.", labels=["bad-label"])
    dotted.add_metric(["v"], 1)
    return [stamped, summary, dotted]


ACCEPTS = [
    None,
    "",
    "text/plain",
    "text/plain; version=0.0.4",
    "text/plain; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text; version=2.0.0",
    "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
]


@pytest.mark.parametrize("accept", ACCEPTS)
@pytest.mark.parametrize("make", [families, awkward, lambda: families() + awkward()])
def test_same_bytes_as_prometheus_client(accept: str | None, make: object) -> None:
    fams = make()  # type: ignore[operator]
    encoder, content_type = choose_encoder(accept or "")
    expected = encoder(Families(fams))  # type: ignore[arg-type]
    ours = Encoder()
    for _ in range(2):  # the second render comes from the label cache
        body, ctype = ours.render(fams, accept)
        assert ctype == content_type
        assert body == expected


def test_the_fast_path_is_taken_for_our_families() -> None:
    """Otherwise the equality above would prove nothing about our own code."""
    ours = Encoder()
    assert ours._encode(families(), openmetrics=False) is not None
    assert ours._encode(families(), openmetrics=True) is not None
    for family in awkward():
        assert ours._encode([family], openmetrics=False) is None


def test_laid_out_families_from_a_real_merge_encode_like_prometheus_client(tmp_path: object) -> None:
    """The merge hands the encoder pre-laid-out families; their text must equal prometheus-client's
    rendering of the very same samples."""
    from celery_signal_exporter import catalogue as c
    from celery_signal_exporter.recording import metrics as m
    from celery_signal_exporter.recording.store import Store
    from celery_signal_exporter.server.collect import DirectoryCollector, LaidOut
    from tests.harness import write_as_dead_process

    def body(store: Store) -> None:
        for name in ("t.ok", HOSTILE, "ünï"):
            m.Recorder(store, c.SENT).labels(name, 'q"1').inc(3)
            observe(store, m.Recorder(store, c.RUNTIME, (0.1, 1.0)).labels(name, "q"), 0.5)
            m.Recorder(store, c.LAST_SUCCESS).labels(name).set(1700000000.25)

    directory = str(tmp_path)
    for _ in range(3):
        write_as_dead_process(directory, body)
    fams, _ = DirectoryCollector(directory).merge()
    assert any(isinstance(f, LaidOut) and f.values for f in fams)
    for accept in (None, "application/openmetrics-text"):
        encoder, _ = choose_encoder(accept or "")
        body_bytes, _ = Encoder().render(fams, accept)
        assert body_bytes == encoder(Families(fams))  # type: ignore[arg-type]
        assert b'celery_task_sent_total{name="t.ok",queue_name="q\\"1"} 9.0' in body_bytes


def test_the_encoder_keeps_only_what_the_last_scrape_served() -> None:
    """Values that change on every scrape (runtimes, timestamps) must not grow the encoder for ever.

    Before: every distinct value was kept up to 200 000 texts (~27 MiB) and
    label sets up to 200 000, whatever the scrapes still served.
    """
    encoder = Encoder()
    served = 0
    for scrape in range(300):
        gauge = GaugeMetricFamily("celery_changing", "Changes.", labels=["name"])
        names = 1000 if scrape < 150 else 10  # the series go away too
        for i in range(names):
            gauge.add_metric([f"t{(scrape * 7 + i) % 5000}"], scrape * 1000.0 + i + 0.5)
        served = names
        body, _ = encoder.render([gauge], None)
        assert body.count(b"\n") == names + 2
    kept = len(encoder._floats) + len(getattr(encoder, "_old_floats", {}))
    lines = len(encoder._lines) + len(getattr(encoder, "_old_lines", {}))
    assert kept <= 2 * served and lines <= 2 * served, f"{kept} value texts and {lines} label texts kept"
