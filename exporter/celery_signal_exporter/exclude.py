"""Metric families switched off by one regex: the same parser for `instrument()`, `serve` and `check`.

`CELERY_EXPORTER_EXCLUDE_METRICS` (or `instrument(exclude_metrics=...)`, `serve --exclude-metrics`) is
matched in full against each family's name, with or without its sample suffix (`celery_task_sent` and
`celery_task_sent_total` both name the sent counter), so `celery_task_queue_wait_seconds|celery_task_cpu.*`
drops two families. The workers then write nothing of them (no file space, no series) and the exporter
serves nothing of them, whoever wrote them.
"""

from __future__ import annotations

import re

ENV = "CELERY_EXPORTER_EXCLUDE_METRICS"

_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def parse_exclude(text: str | None, option: str = ENV) -> re.Pattern[str] | None:
    """The compiled regex, None when unset or empty; ValueError with one line naming `option`."""
    if text is None or not text.strip():
        return None
    try:
        return re.compile(text.strip())
    except re.error as exc:
        raise ValueError(f"{option}: {text.strip()!r} is not a regex: {exc}") from None


def excluded(pattern: re.Pattern[str] | None, name: str) -> bool:
    """Whether the family `name` (or one of its sample names, or the family of a sample name) is
    switched off."""
    if pattern is None:
        return False
    family = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
    return any(pattern.fullmatch(candidate) for candidate in (name, family, *(family + s for s in _SUFFIXES)))


def blind_rules(pattern: re.Pattern[str]) -> list[tuple[str, list[str]]]:
    """The production rules (recorded series and alerts, in order) that read a switched-off family,
    directly or through a recorded series, with what they read: `check` warns about each."""
    from celery_signal_exporter.mixin.config import PRODUCTION
    from celery_signal_exporter.mixin.rules import rule_groups

    blind: set[str] = set()
    found: list[tuple[str, list[str]]] = []
    for group in rule_groups(PRODUCTION)["groups"]:
        for rule in group["rules"]:
            names = set(_NAMES.findall(rule["expr"]))
            reads = sorted({n for n in names if excluded(pattern, n)} | (names & blind))
            if not reads:
                continue
            name = rule.get("alert") or rule["record"]
            if "record" in rule:
                blind.add(rule["record"])
            found.append((name, reads))
    merged: dict[str, list[str]] = {}  # a name recorded or alerted on by several rules: one line
    for name, reads in found:
        merged[name] = sorted({*merged.get(name, []), *reads})
    return list(merged.items())


_NAMES = re.compile(r"\b(?:celery_[a-z0-9_]+|(?:queue|task):[a-z0-9_]+:[a-z0-9_]+)")
