"""A non-default config reaches every rule and every panel: selector, group labels,
ignore regexes, alert switches, and the Grafana links alerts carry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import promql_parser as pq
import pytest
import yaml

from celery_signal_exporter.mixin import panels
from celery_signal_exporter.mixin.config import PRODUCTION, Config, load
from celery_signal_exporter.mixin.generate import LAYOUT, generated, outputs, repository_root
from celery_signal_exporter.mixin.generate import main as generate_main
from celery_signal_exporter.mixin.rules import alerts, rule_groups
from tests.mixin_support import ROOT, generate_mine, substitute, vector_selectors

SELECTOR = {'job="celery-prod"', 'env="eu"'}
# As the parser prints them: the regexes themselves, unquoted.
IGNORES = {'name!~"celery\\.backend_cleanup|proj\\.internal\\..*"', 'queue_name!~"celeryev\\..*"'}
GROUPS = {'cluster=~".*"', 'namespace=~".*"'}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flat layout generated from MINE, as a user would run it."""
    return generate_mine(tmp_path_factory.mktemp("mine"))


@pytest.fixture(scope="module")
def config(out: Path) -> Config:
    return load(out.parent / "mine.yaml")


def rules(out: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load((out / "prometheus-rules.yaml").read_text())["groups"] for r in g["rules"]]


def dashboards(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "dashboards").glob("*.json"))}


def panel_exprs(out: Path) -> Iterator[tuple[str, str]]:
    for name, d in dashboards(out).items():
        for p in d["panels"]:
            for t in p.get("targets", []):
                yield f"{name} / {p['title']}", t["expr"]


def recorded(out: Path) -> set[str]:
    return {r["record"] for r in rules(out) if "record" in r}


def matchers(selector: Any) -> set[str]:
    return {str(m) for m in selector.matchers.matchers}


def test_every_rule_reads_raw_metrics_through_the_selector_and_ignores(out: Path) -> None:
    """Alerts on recorded series inherit both from the recording rule, which is checked here too."""
    records = recorded(out)
    for rule in rules(out):
        raw = [s for s in vector_selectors(pq.parse(rule["expr"])) if s.name not in records]
        for selector in raw:
            missing = (SELECTOR | IGNORES) - matchers(selector)
            assert not missing, f"{rule.get('alert') or rule['record']}: {selector} lacks {missing}"


def test_every_panel_and_variable_carries_the_selector_ignores_and_group_filters(out: Path) -> None:
    records = recorded(out)
    exprs = list(panel_exprs(out))
    for name, d in dashboards(out).items():
        variables = [v for v in d["templating"]["list"] if v["type"] == "query"]
        assert [v["name"] for v in variables] == ["cluster", "namespace", "queue", "task"], name
        for v in variables:
            selector = re.fullmatch(r"label_values\((.*), \w+\)", v["query"])
            assert selector, v["query"]
            exprs.append((f"{name} / ${v['name']}", selector.group(1)))
    for where, expr in exprs:
        found = list(vector_selectors(pq.parse(substitute(expr))))
        assert found, where
        for selector in found:
            have = matchers(selector)
            if selector.name in records or selector.name == "ALERTS":
                # job is aggregated away; the recording rule applied the selector and ignores
                # (ALERTS, Prometheus' own, carries the alert's labels and no job).
                assert GROUPS <= have, f"{where}: {selector}"
            elif "$" not in where:
                assert SELECTOR | IGNORES | GROUPS <= have, f"{where}: {selector} lacks {SELECTOR | IGNORES | GROUPS}"
            else:
                assert SELECTOR | IGNORES <= have, f"{where}: {selector}"


def test_panels_split_by_the_group_labels(out: Path) -> None:
    for where, expr in panel_exprs(out):
        for by in re.findall(r"\bby \(([^)]*)\)", expr):
            if by != "le":  # heatmaps: one cell per bucket
                assert by.startswith("cluster, namespace"), f"{where}: by ({by})"


def test_a_disabled_alert_is_absent(out: Path, config: Config) -> None:
    names = {r["alert"] for r in rules(out) if "alert" in r}
    assert "CeleryWorkerDown" not in names
    assert names == {a.name for a in alerts(PRODUCTION)} - {"CeleryWorkerDown"}
    assert "CeleryWorkerDown" not in (out / "prometheusrule.yaml").read_text()
    assert {a.name for a in alerts(config)} == names
    # Each panel lists the alerts that link to it; the switched-off one is in no list.
    listed = {
        name
        for d in dashboards(out).values()
        for p in d["panels"]
        for line in p.get("description", "").splitlines()
        if line.startswith("Alerts: ")
        for name in line.removeprefix("Alerts: ").rstrip(".").split(", ")
    }
    assert listed == names
    assert "CeleryWorkerDown" not in json.dumps(dashboards(out))
    production = json.loads(generated(PRODUCTION)["dashboards/celery-overview.json"])
    (workers_up,) = [p for p in production["panels"] if p["title"] == "Workers up"]
    assert workers_up["description"].endswith("\n\nAlerts: CeleryWorkerDown.")


@pytest.mark.parametrize("which", ["mine", "production"])
def test_every_dashboard_url_opens_a_panel_that_exists(out: Path, which: str) -> None:
    if which == "mine":
        alert_rules = [r for r in rules(out) if "alert" in r]
        boards = dashboards(out)
        base = "https://grafana.example.com/d/"
    else:
        alert_rules = [r for g in rule_groups(PRODUCTION)["groups"] for r in g["rules"] if "alert" in r]
        boards = {n: json.loads(t) for n, t in generated(PRODUCTION).items() if n.endswith(".json")}
        base = f"{PRODUCTION.grafana_url}/d/"
    by_uid = {d["uid"]: {p["id"]: p for p in d["panels"]} for d in boards.values()}
    for rule in alert_rules:
        url = rule["annotations"]["dashboard_url"]
        assert url.startswith(base), url
        parts = urlsplit(url)
        uid = parts.path.rsplit("/", 1)[1]
        (panel_id,) = parse_qs(parts.query)["viewPanel"]
        assert uid in by_uid, f"{rule['alert']}: no dashboard {uid}"
        panel = by_uid[uid].get(int(panel_id))
        assert panel and panel["type"] != "row", f"{rule['alert']}: {uid} has no panel {panel_id}"


def test_panel_ids_are_unique_stable_and_all_panels_have_one() -> None:
    for name, text in generated(PRODUCTION).items():
        if not name.endswith(".json"):
            continue
        d = json.loads(text)
        slug = d["uid"].removeprefix(f"{PRODUCTION.uid_prefix}-")
        ids = [p["id"] for p in d["panels"]]
        assert len(set(ids)) == len(ids) and 0 not in ids, name
        # "Runtime objectives" is drawn only where a runtime objective is configured (none by default).
        expected = {t: i for t, i in panels.IDS[slug].items() if t != "Runtime objectives"}
        assert {p["title"]: p["id"] for p in d["panels"]} == expected, name


def test_dashboards_read_the_recorded_series_of_the_alerts(out: Path) -> None:
    """One definition of each derived quantity: the panel an alert links to plots what it watches."""
    exprs = dict(panel_exprs(out))
    every: dict[str, list[str]] = {}
    for where, expr in panel_exprs(out):
        every.setdefault(where, []).append(expr)
    assert exprs["celery-overview.json / Estimated time to drain"] == (
        'queue:celery_queue_drain_seconds:estimate{cluster=~"$cluster", namespace=~"$namespace", queue_name=~"$queue"}'
    )
    for where, series in (
        ("celery-overview.json / Queue length", "queue:celery_queue_length:sum"),
        ("celery-overview.json / Backlog growth", "queue:celery_queue_backlog:deriv"),
        ("celery-overview.json / Failure ratio", "task:celery_task_failure:ratio"),
        ("celery-queues.json / Length", "queue:celery_queue_length:sum"),
        ("celery-queues.json / Queue wait p95", "queue:celery_task_queue_wait_seconds:quantile"),
        ("celery-tasks.json / Runtime quantiles", "task:celery_task_runtime_seconds:quantile"),
        ("celery-overview.json / Queue length", "queue:celery_queue_backlog:sum"),
        ("celery-queues.json / Length", "queue:celery_queue_backlog:sum"),
        ("celery-workers.json / Slots per queue", "queue:celery_worker_slots:sum"),
    ):
        assert any(e.startswith(series + "{") for e in every[where]), where
    # Nothing re-derives the drain estimate or the backlog growth from the raw metrics.
    for where, expr in exprs.items():
        assert "celery_task_received_total" not in expr or "celery_queue_length" not in expr, where
        assert "deriv(" not in expr, where


def test_out_writes_exactly_the_documented_flat_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    documented = re.findall(r"DIR/(\S+)", LAYOUT)
    monitoring = (ROOT / "docs/monitoring.md").read_text()
    for name in documented:
        assert f"`{name}`" in monitoring, f"docs/monitoring.md does not list {name}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert generate_main(["--out", str(tmp_path / "out")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == sorted(documented)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"] and not any(cwd.iterdir())
    assert set(outputs(PRODUCTION, repository=False)) == set(documented)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    assert "DIR/prometheusrule.yaml" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content",
    [
        "disabled_alerts: [CeleryNoSuchAlert]\n",
        "ignore_tasks: '.*'\n",  # would drop every series without a name label
        "ignore_queues: '(unclosed'\n",
        "group_labels: [queue]\n",  # the name of a dashboard variable
        "run_limits: [{name_regex: '(x', max_age: 1h}]\n",
        "run_limits: [{name_regex: 'x', max_age: soon}]\n",
        "run_limits: [{name: 'x', max_age: 1h}]\n",
    ],
)
def test_bad_switches_and_regexes_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    assert generate_main(["--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixin: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_every_runbook_links_its_panel_and_says_how_to_switch_it_off() -> None:
    text = (ROOT / "docs/runbooks.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in re.split(r"\n## ", text)[1:]}
    for alert in alerts(PRODUCTION):
        section = sections[alert.name]
        dashboard, title = alert.panel
        link = f"/d/{panels.uid(PRODUCTION, dashboard)}?viewPanel={panels.IDS[dashboard][title]}"
        assert link in section, f"{alert.name}: runbook does not link {link}"
        assert f"disabled_alerts: [{alert.name}]" in section, f"{alert.name}: runbook does not say how to switch it off"


def test_without_out_the_checkout_is_regenerated_in_place() -> None:
    """The repository's own files keep their places, so the stale check and the deploy/ paths hold."""
    assert repository_root() == ROOT
    assert generate_main(["--check"]) == 0
    assert set(outputs(PRODUCTION)) >= {"deploy/prometheus/celery-rules.yml", "docs/metric-usage.md"}
