"""The scrape's text, as prometheus-client would write it, but cheaper.

A merged directory repeats the same few hundred label sets across every
family and every histogram bucket, and prometheus-client escapes and joins
each one again for every sample: at 200 task names x 4 queues that is most of
a scrape. Here each label set's text is built once and reused across samples
and scrapes. What is kept is what the last scrape served, never more: values
that keep changing would otherwise grow the cache for as long as they do.
Negotiation is still prometheus-client's (`choose_encoder`), and anything
this encoder does not handle (exemplars, timestamps, native histograms,
OpenMetrics 2.0, names that need escaping) goes to prometheus-client's own
encoder. tests/unit/test_exposition.py checks that both
write the same bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om
from prometheus_client.utils import floatToGoString

_go_float = cast(Callable[[float], str], floatToGoString)  # Go's float formatting, as Prometheus expects

_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "summary": "summary",
               "unknown": "untyped"}


def line_prefix(name: str, labels: dict[str, str]) -> str | None:
    """`name{a="1",b="2"} ` as both formats write a sample, or None when a name needs escaping."""
    items = sorted(labels.items())
    if not _PLAIN_NAME.fullmatch(name) or not all(_PLAIN_NAME.fullmatch(k) for k, _ in items):
        return None
    inner = ",".join(f'{k}="{_escape_value(v)}"' for k, v in items)
    return f"{name}{{{inner}}} " if inner else f"{name} "


class _Families:
    """A one-shot collector, the shape prometheus-client's encoders take."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Encoder:
    """Renders families for an Accept header; keeps the texts of the series and values it last served.

    Two generations: a render fills new tables, taking texts from the last
    render's first, then drops the old ones. So the tables hold what one
    scrape served, and a label set or a value gone from the directory is
    forgotten a scrape later (about 20% slower per value than one table that
    never forgets, and ten times faster than none).
    """

    def __init__(self) -> None:
        self._lines: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._old_lines: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._floats: dict[float, str] = {}  # counts repeat a lot: bucket counts, 0, 1
        self._old_floats: dict[float, str] = {}

    def render(self, families: Iterable[Metric], accept: str | None) -> tuple[bytes, str]:
        try:
            return self._render(families, accept)
        finally:
            self._old_lines, self._lines = self._lines, {}
            self._old_floats, self._floats = self._floats, {}

    def _render(self, families: Iterable[Metric], accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        metrics = list(families)
        options: dict[str, Any] = getattr(encoder, "keywords", {})
        function = getattr(encoder, "func", encoder)
        openmetrics = function is om.generate_latest
        simple = options.get("escaping", om.UNDERSCORES) in (om.UNDERSCORES, om.ALLOWUTF8) and (
            not openmetrics or options.get("version", "1.0.0") == "1.0.0"
        )
        if simple:
            text = self._encode(metrics, openmetrics)
            if text is not None:
                return text.encode("utf-8"), content_type
        return encoder(_Families(metrics)), content_type  # type: ignore[arg-type]

    def _prefix(self, name: str, labels: dict[str, str]) -> str | None:
        """`name{labels} `, built once per series; None if a name needs escaping."""
        key = (name, tuple(labels.items()))
        text = self._lines.get(key)
        if text is None:
            text = self._old_lines.get(key)
            if text is None:
                text = line_prefix(name, labels)
                if text is None:
                    return None
            self._lines[key] = text
        return text

    def _value(self, value: float) -> str:
        if value == 0:  # -0.0 == 0.0 as a key, but prints differently
            return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
        text = self._floats.get(value)
        if text is None:
            text = self._old_floats.get(value)
            if text is None:
                text = _go_float(value)
            self._floats[value] = text
        return text

    def _encode(self, metrics: list[Metric], openmetrics: bool) -> str | None:
        """The whole body, or None when some family needs prometheus-client's encoder."""
        out: list[str] = []
        value_text = self._value
        for metric in metrics:
            name = metric.name
            if not _PLAIN_NAME.fullmatch(name):
                return None
            if openmetrics:
                out.append(f"# HELP {name} {_escape_value(metric.documentation)}\n# TYPE {name} {metric.type}\n")
                if metric.unit:
                    out.append(f"# UNIT {name} {metric.unit}\n")
            else:
                kind = _TEXT_TYPES.get(metric.type)
                if kind is None:
                    return None
                shown = name + "_total" if kind == "counter" else name
                doc = metric.documentation.replace("\\", "\\\\").replace("\n", "\\n")
                out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {kind}\n")
            laid_out: list[tuple[str, dict[str, str], str | None]] | None = getattr(metric, "entries", None)
            if laid_out is not None:
                values: list[float] = metric.values  # type: ignore[attr-defined]
                for (_, _, prefix), v in zip(laid_out, values, strict=True):
                    if prefix is None:
                        return None
                    out.append(f"{prefix}{value_text(v)}\n")
                continue
            created = name + "_created"
            for s in metric.samples:
                if s.timestamp is not None or s.exemplar is not None or s.native_histogram is not None:
                    return None
                if not openmetrics and s.name == created:
                    return None  # the text format moves these to a family of their own
                prefix = self._prefix(s.name, s.labels)
                if prefix is None:
                    return None
                out.append(f"{prefix}{value_text(s.value)}\n")
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out)
