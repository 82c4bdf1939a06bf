"""Lints for the generated dashboards and rules, in the spirit of Grafana's
dashboard-linter and mixtool, and a check that the committed files are what
the code generates.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pq
import pytest
import yaml

from celery_signal_exporter.mixin.config import COUNT_FIELDS, PRODUCTION, load, scaled, seconds
from celery_signal_exporter.mixin.dashboards import DASHBOARDS
from celery_signal_exporter.mixin.generate import main as generate_main
from celery_signal_exporter.mixin.generate import outputs, stale
from celery_signal_exporter.mixin.rules import alerts, rule_groups
from celery_signal_exporter.mixin.usage import expand_name_regex
from tests.profiles import short_profile
from tests.test_catalogue import documented

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


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (bash .ci/tools.sh does)", pytrace=False)
    return path


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


def test_users_regenerate_with_their_own_thresholds(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("backlog_floor: 5000\nselector: 'job=\"my-celery\"'\ngroup_labels: [cluster, namespace]\n")
    assert generate_main(["--config", str(mine), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "prometheus-rules.yaml").read_text()
    assert "queue:celery_queue_backlog:sum > 5000" in text
    assert 'celery_queue_length{job="my-celery"}' in text
    assert "sum by (cluster, namespace, queue_name)" in text
    run = subprocess.run([promtool(), "check", "rules", str(tmp_path / "prometheus-rules.yaml")])
    assert run.returncode == 0


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


def test_promtool_checks_the_rule_files(tmp_path: Path) -> None:
    operator = yaml.safe_load((ROOT / "deploy/kubernetes/base/prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"] == yaml.safe_load(RULES.read_text())
    run = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    count = sum(len(g["rules"]) for g in rule_groups(PRODUCTION)["groups"])
    assert f"SUCCESS: {count} rules found" in run.stdout


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


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    """promtool is the parser of record: dashboard queries go through it as recording rules."""
    rules = [{"record": f"check:expr:{i}", "expr": expr} for i, (_, expr) in enumerate(all_exprs())]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    run = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


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


#: Prometheus duration literals, e.g. 5m, 1h30m is not used by the rules.
DURATION = re.compile(r"(?<![\w.])(\d+)(ms|s|m|h|d|w)(?![\w])")


def test_the_scaled_profile_divides_every_duration_and_count_by_k_and_changes_nothing_else(tmp_path: Path) -> None:
    """The incident suite judges alerts at production windows through `scaled(PRODUCTION, K)`: a page
    after t seconds there is a page after K·t in production only if nothing but durations and count
    thresholds differ, and every duration in every rule (none hard-coded) is divided."""
    k = 60
    fast = scaled(PRODUCTION, k)
    for name in vars(PRODUCTION):
        prod, ours = getattr(PRODUCTION, name), getattr(fast, name)
        if name in COUNT_FIELDS:
            assert ours * k == pytest.approx(prod), name
        elif isinstance(prod, str) and DURATION.fullmatch(prod):
            assert seconds(ours) * k == pytest.approx(seconds(prod)), name
        elif name in ("run_limits", "periodic_tasks"):
            assert [(r.name_regex, seconds(r.max_age) * k) for r in ours] == \
                   [(r.name_regex, pytest.approx(seconds(r.max_age))) for r in prod], name
        elif name in ("objectives", "default_objective"):
            mine = ours if name == "objectives" else (ours,)
            theirs = prod if name == "objectives" else (prod,)
            assert [(o.queue, o.target, seconds(o.wait) * k) for o in mine] == \
                   [(o.queue, o.target, pytest.approx(seconds(o.wait))) for o in theirs], name
        elif name in ("burn_page", "burn_ticket"):
            assert [(b.factor, seconds(b.long) * k, seconds(b.short) * k) for b in ours] == \
                   [(b.factor, pytest.approx(seconds(b.long)), pytest.approx(seconds(b.short))) for b in prod], name
        elif name in ("queue_wait_buckets", "runtime_buckets"):
            # Objectives are buckets: they shrink together.
            assert [b * k for b in ours] == pytest.approx(list(prod)), name
        else:
            assert ours == prod, name
    slow_rules = [r for g in rule_groups(PRODUCTION)["groups"] for r in g["rules"]]
    fast_rules = [r for g in rule_groups(fast)["groups"] for r in g["rules"]]
    assert [r.get("alert", r.get("record")) for r in fast_rules] == \
           [r.get("alert", r.get("record")) for r in slow_rules]
    for slow, quick in zip(slow_rules, fast_rules, strict=True):
        what = slow.get("alert", slow.get("record"))
        for text_slow, text_fast in ((slow["expr"], quick["expr"]), (slow.get("for", "0s"), quick.get("for", "0s"))):
            durations_slow = [seconds(a + b) for a, b in DURATION.findall(text_slow)]
            durations_fast = [seconds(a + b) for a, b in DURATION.findall(text_fast)]
            assert [d * k for d in durations_fast] == pytest.approx(durations_slow), f"{what}: {text_fast}"
            # With every duration and number blanked, the expressions are the same text.
            assert blank(text_fast) == blank(text_slow), what
    rules = tmp_path / "scaled.yml"
    rules.write_text(yaml.safe_dump(rule_groups(fast)))
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def blank(expr: str) -> str:
    """An expression with its durations and numbers replaced by placeholders."""
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", DURATION.sub("D", expr))
