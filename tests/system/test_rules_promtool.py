"""promtool, the parser of record, on every generated rule file and dashboard query: the committed
rules, a user's own config, the scaled test profile and every panel's expression."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from celery_signal_exporter.mixin.config import COUNT_FIELDS, PRODUCTION, scaled, seconds
from celery_signal_exporter.mixin.generate import main as generate_main
from celery_signal_exporter.mixin.rules import rule_groups
from tests.harness import promtool
from tests.mixin_support import (
    DURATION,
    ROOT,
    RULES,
    all_exprs,
    generate_mine,
)

# Generation


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flat layout generated from tests/mixin_support.py's MINE, as a user would run it."""
    return generate_mine(tmp_path_factory.mktemp("mine"))


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


def test_promtool_checks_the_rule_files(tmp_path: Path) -> None:
    operator = yaml.safe_load((ROOT / "deploy/kubernetes/base/prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"] == yaml.safe_load(RULES.read_text())
    run = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    count = sum(len(g["rules"]) for g in rule_groups(PRODUCTION)["groups"])
    assert f"SUCCESS: {count} rules found" in run.stdout


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    """promtool is the parser of record: dashboard queries go through it as recording rules."""
    rules = [{"record": f"check:expr:{i}", "expr": expr} for i, (_, expr) in enumerate(all_exprs())]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    run = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


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


def test_promtool_checks_the_generated_rules(out: Path) -> None:
    run = subprocess.run(
        [promtool(), "check", "rules", str(out / "prometheus-rules.yaml")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    operator = yaml.safe_load((out / "prometheusrule.yaml").read_text())
    assert operator["spec"] == yaml.safe_load((out / "prometheus-rules.yaml").read_text())


def blank(expr: str) -> str:
    """An expression with its durations and numbers replaced by placeholders."""
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", DURATION.sub("D", expr))
