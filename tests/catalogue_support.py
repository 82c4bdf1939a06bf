"""What the catalogue defines and what /metrics serves, as plain dicts the tests compare."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from celery_signal_exporter import catalogue

Catalogue = dict[str, frozenset[str]]


#: Sample-side name -> (type, help, label names), as served.
Families = dict[str, tuple[str, str, frozenset[str]]]


def documented(section: str | None = None) -> Catalogue:
    """metric name (counters with `_total`) -> label names, for every metric the catalogue serves
    (or the metrics of one section of it)."""
    specs = catalogue.SERVED if section is None else next(s.specs for s in catalogue.SECTIONS if s.title == section)
    return {spec.sample_name: frozenset(spec.labels) for spec in specs}


#: Served by the beat process and by workers running beat's entries: tests/system/test_beat.py holds them
#: to the catalogue.
BEAT = "Beat metrics"


def families(text: str) -> Families:
    """Family name (counters with `_total`) -> type, help and the label names seen on its samples
    (histogram `le` aside)."""
    found: Families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for sample in family.samples for k in sample.labels if k != "le"}
        found[name] = (family.type, family.documentation, frozenset(labels))
    return found


def exposed(text: str) -> Catalogue:
    """Family name -> label names seen on its samples (histogram `le` aside)."""
    return {name: labels for name, (_, _, labels) in families(text).items()}
