"""Lints for the generated dashboards and rules, in the spirit of Grafana's
dashboard-linter and mixtool, and a check that the committed files are what
the code generates.
"""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser as pq
import pytest
import yaml

from celery_signal_exporter.mixin.config import PRODUCTION, load
from celery_signal_exporter.mixin.dashboards import DASHBOARDS
from celery_signal_exporter.mixin.generate import main as generate_main
from celery_signal_exporter.mixin.generate import outputs, stale
from celery_signal_exporter.mixin.rules import alerts
from tests.catalogue_support import documented
from tests.mixin_support import (
    COUNTER_SUFFIXES,
    RATE_WINDOW,
    ROOT,
    RULES,
    all_exprs,
    dashboards,
    known_metrics,
    panels,
    recorded,
    selectors,
    substitute,
    vector_selectors,
)
from tests.profiles import short_profile

# Generation


def test_committed_files_are_what_the_code_generates() -> None:
    assert stale(PRODUCTION, ROOT) == [], "run `python -m celery_signal_exporter.mixin` and commit the result"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    for rel, text in outputs(PRODUCTION, repository=False).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert generate_main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "dashboards/celery-tasks.json").write_text("{}")
    assert generate_main(["--check", "--out", str(tmp_path)]) == 1


def test_bad_user_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for content in ("nonsense_knob: 1\n", "backlog_for: soon\n", "- a list\n"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(content)
        assert generate_main(["--config", str(bad), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mixin: error: ") and err.count("\n") == 1, err


def test_short_profile_only_shortens_windows() -> None:
    """The end-to-end test must exercise the production expressions, not look-alikes."""
    prod = {a.name: a.expr for a in alerts(PRODUCTION)}
    short = {a.name: a.expr for a in alerts(short_profile())}
    assert prod.keys() == short.keys()
    normalise = re.compile(r"\[\d+[smh]\]|\b\d+(\.\d+)?\b|job=~\"[^\"]*\"")
    for name in prod:
        assert normalise.sub("_", prod[name]) == normalise.sub("_", short[name]), name


def test_load_without_a_file_is_the_production_config() -> None:
    assert load(None) == PRODUCTION


# Rules


def test_alert_names_are_camel_case_with_severity_summary_description_runbook() -> None:
    runbooks = (ROOT / "docs/runbooks.md").read_text()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            assert re.fullmatch(r"Celery(?:[A-Z][a-z0-9]+)+", name), name
            assert rule["labels"]["severity"] in ("warning", "critical"), name
            notes = rule["annotations"]
            assert notes["summary"].endswith(".") and "\n" not in notes["summary"], name
            assert "{{" in notes["description"] or name in ("CeleryExporterDown",), name
            anchor = notes["runbook_url"].rsplit("#", 1)[1]
            assert anchor == name.lower()
            assert f"\n## {name}\n" in runbooks, f"docs/runbooks.md has no section for {name}"


def test_every_runbook_says_what_how_to_confirm_and_what_to_do() -> None:
    text = (ROOT / "docs/runbooks.md").read_text()
    sections = re.split(r"\n## ", text)[1:]
    names = {a.name for a in alerts(PRODUCTION)}
    assert {s.split("\n", 1)[0] for s in sections} >= names
    for s in sections:
        if s.split("\n", 1)[0] in names:
            for part in ("**Meaning.**", "**Confirm.**", "**Act.**"):
                assert part in s, f"{s.splitlines()[0]}: missing {part}"


# Expressions, everywhere


def test_expressions_use_only_catalogued_metrics_and_counters_only_in_rate() -> None:
    known = known_metrics()
    for where, expr in all_exprs():
        found = list(selectors(pq.parse(expr)))
        assert found, where
        for name, in_rate in found:
            assert name in known, f"{where}: {name} is not in docs/metrics.md"
            if name.endswith(COUNTER_SUFFIXES) and name != "celery_exporter_build_info":
                assert in_rate, f"{where}: counter {name} outside rate()/increase()"


# Dashboards


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_dashboard_lint(name: str) -> None:
    d = dashboards()[name]
    assert d["uid"] == f"celery-signal-{name.removeprefix('celery-').removesuffix('.json')}"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in (*PRODUCTION.group_labels, "queue", "task"):
        assert variables[var]["type"] == "query" and variables[var]["includeAll"], var
        assert variables[var]["datasource"]["uid"] == "${datasource}"
    for p in panels(d):
        title = p["title"]
        assert p.get("description"), f"{title}: no description"
        assert p["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert p["datasource"]["uid"] == "${datasource}", title
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", title
            # The error budget is over its own period, whatever the time range shown.
            allowed = (RATE_WINDOW, PRODUCTION.budget_period) if title == "Error budget left" else (RATE_WINDOW,)
            for window in re.findall(r"\[([^\]]+)\]", t["expr"]):
                assert window in allowed, f"{title}: range [{window}]"
            for selector in vector_selectors(pq.parse(substitute(t["expr"]))):
                matchers = {str(m) for m in selector.matchers.matchers}
                assert 'namespace=~".*"' in matchers, f"{title}: {selector} has no namespace filter"
                if selector.name not in recorded() | {"ALERTS"}:  # ALERTS carries the alerts' labels, no job
                    assert PRODUCTION.selector in matchers, f"{title}: {selector} lacks the config selector"


def test_dashboard_uids_are_unique_and_panels_do_not_overlap() -> None:
    uids = [d["uid"] for d in dashboards().values()]
    assert len(set(uids)) == len(uids)
    for name, d in dashboards().items():
        cells: set[tuple[int, int]] = set()
        for p in d["panels"]:
            g = p["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{name}: {p['title']} overlaps another panel"
            assert g["x"] + g["w"] <= 24
            cells |= mine


def test_dashboard_titles_cover_the_issue() -> None:
    titles = {name: {p["title"] for p in panels(d)} for name, d in dashboards().items()}
    assert {
        "Published vs completed",
        "Queue length",
        "Backlog growth",
        "Estimated time to drain",
        "Failure ratio",
        "Runtime quantiles",
        "Queue wait quantiles",
        "Workers up",
        "Pool utilisation",
        "Broker memory",
    } <= titles["celery-overview.json"]
    assert {
        "Runs by outcome",
        "Failures by exception",
        "Runtime heatmap",
        "Retries, revokes and expirations",
        "Time since last success",
    } <= titles["celery-tasks.json"]
    assert {
        "Length",
        "Unacked",
        "Consumers",
        "Oldest message age",
        "Queue wait p95",
        "Broker up",
        "Memory",
        "Alarms",
        "Probe errors",
    } <= titles["celery-queues.json"]
    assert {
        "CPU per runtime second",
        "Memory growth p95",
        "Oldest run vs time limit",
        "Publish rate by instance",
        "Publish latency p95 by instance",
    } <= titles["celery-tasks.json"]
    assert {
        "Resident memory",
        "Largest pool process",
        "Reserved by queue",
        "Scheduled by queue",
        "Consuming queues",
        "Slots per queue",
        "Tasks active",
    } <= titles["celery-workers.json"]


def test_every_catalogued_metric_is_on_a_dashboard() -> None:
    """A metric nobody can see is a metric nobody needs; build_info feeds the job variable."""
    from celery_signal_exporter.mixin.usage import index

    shown = {name for name, used in index(PRODUCTION).items() if used["panels"]}
    assert set(documented()) - shown == {"celery_exporter_build_info"}


