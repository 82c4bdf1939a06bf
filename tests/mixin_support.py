"""The generated dashboards and rules as the tests read them: panels, expressions and the metrics they use."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pq
import yaml

from celery_signal_exporter.mixin.config import PRODUCTION
from celery_signal_exporter.mixin.dashboards import DASHBOARDS
from celery_signal_exporter.mixin.generate import main as generate_main
from celery_signal_exporter.mixin.rules import rule_groups
from celery_signal_exporter.mixin.usage import expand_name_regex
from tests.catalogue_support import documented

RATE_WINDOW = "$__rate_interval"


ROOT = Path(__file__).resolve().parent.parent


RULES = ROOT / "deploy/prometheus/celery-rules.yml"


COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


# What Grafana substitutes before a query reaches Prometheus: a range, and "All" for every variable.
RANGE = ("$__rate_interval", "1m")


VARIABLE = re.compile(r"\$(\w+)")


def dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads((ROOT / "dashboards" / name).read_text()) for name in DASHBOARDS}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in dashboard["panels"] if p["type"] != "row")


def dashboard_exprs() -> Iterator[tuple[str, str, str]]:
    """(dashboard, panel title, raw expression) for every query of every panel."""
    for name, d in dashboards().items():
        for p in panels(d):
            for t in p["targets"]:
                yield name, p["title"], t["expr"]


def substitute(expr: str) -> str:
    return VARIABLE.sub(".*", expr.replace(*RANGE))


def rule_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def recorded() -> set[str]:
    return {r["record"] for g in rule_groups(PRODUCTION)["groups"] for r in g["rules"] if "record" in r}


def known_metrics() -> set[str]:
    """Every series name an expression may use: the catalogue, histogram parts, our records, and
    Prometheus' own `up` and `ALERTS` (the Periodic tasks dashboard lists its alerts' states)."""
    names = set(documented())
    text = (ROOT / "docs/metrics.md").read_text()
    for histogram in re.findall(r"^\| `(celery_[a-z_]+)` \| histogram \|", text, flags=re.M):
        names |= {histogram + s for s in ("_bucket", "_count", "_sum")}
    return names | recorded() | {"up", "ALERTS"}


def selectors(node: Any, in_range_fn: bool = False) -> Iterator[tuple[str, bool]]:
    """(metric name, whether it sits inside rate/increase/irate) for every selector in the tree."""
    if isinstance(node, pq.MatrixSelector):
        yield from selectors(node.vector_selector, in_range_fn)
    elif isinstance(node, pq.VectorSelector):
        if node.name:
            yield node.name, in_range_fn
        for m in node.matchers.matchers:
            if m.name == "__name__":
                for name in expand_name_regex(m.value):
                    yield name, in_range_fn
    elif isinstance(node, pq.Call):
        inside = in_range_fn or node.func.name in ("rate", "increase", "irate")
        for arg in node.args:
            yield from selectors(arg, inside)
    elif isinstance(node, pq.BinaryExpr):
        yield from selectors(node.lhs, in_range_fn)
        yield from selectors(node.rhs, in_range_fn)
    elif isinstance(node, pq.AggregateExpr):
        yield from selectors(node.expr, in_range_fn)
    elif isinstance(node, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
        yield from selectors(node.expr, in_range_fn)


def vector_selectors(node: Any) -> Iterator[Any]:
    """Every vector selector in an expression tree, inside ranges and functions too."""
    if isinstance(node, pq.VectorSelector):
        yield node
    elif isinstance(node, pq.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, pq.Call):
        for arg in node.args:
            yield from vector_selectors(arg)
    elif isinstance(node, pq.BinaryExpr):
        yield from vector_selectors(node.lhs)
        yield from vector_selectors(node.rhs)
    elif isinstance(node, (pq.AggregateExpr, pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
        yield from vector_selectors(node.expr)


def all_exprs() -> list[tuple[str, str]]:
    return [(f"{d} / {title}", substitute(e)) for d, title, e in dashboard_exprs()] + list(rule_exprs())




#: Its panels have data only where beat runs: this module checks them (test_monitoring_e2e, the others).
PERIODIC_DASHBOARD = "celery-periodic.json"


MINE = """\
selector: 'job="celery-prod", env="eu"'
group_labels: [cluster, namespace]
disabled_alerts: [CeleryWorkerDown]
ignore_tasks: 'celery\\.backend_cleanup|proj\\.internal\\..*'
ignore_queues: 'celeryev\\..*'
grafana_url: https://grafana.example.com/
"""


#: Prometheus duration literals, e.g. 5m, 1h30m is not used by the rules.
DURATION = re.compile(r"(?<![\w.])(\d+)(ms|s|m|h|d|w)(?![\w])")


def generate_mine(root: Path) -> Path:
    """The flat layout generated from MINE under `root`, as a user would run it; returns its folder."""
    (root / "mine.yaml").write_text(MINE)
    assert generate_main(["--config", str(root / "mine.yaml"), "--out", str(root / "out")]) == 0
    return root / "out"
