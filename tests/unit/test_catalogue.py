"""The catalogue module is the contract: /metrics serves exactly what it defines,
and docs/metrics.md is what it generates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from celery_signal_exporter import catalogue
from tests.catalogue_support import documented
from tests.harness import ROOT

PACKAGE = Path(ROOT) / "exporter" / "celery_signal_exporter"
STALE = "docs/metrics.md is stale: run python -m celery_signal_exporter.catalogue"


def test_catalogue_parses() -> None:
    docs = documented()
    assert len(docs) >= 30
    assert docs["celery_task_failed_total"] == {"name", "queue_name", "exception"}
    assert docs["celery_exporter_scrape_duration_seconds"] == frozenset()


def test_docs_metrics_md_is_what_the_catalogue_generates() -> None:
    assert (Path(ROOT) / "docs" / "metrics.md").read_text(encoding="utf-8") == catalogue.render(), STALE


def test_check_mode_reports_a_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "metrics.md"
    assert catalogue.main(["--check", "--out", str(page)]) == 1
    assert "run python -m celery_signal_exporter.catalogue" in capsys.readouterr().err
    assert catalogue.main(["--out", str(page)]) == 0
    assert catalogue.main(["--check", "--out", str(page)]) == 0


def test_every_name_is_defined_once() -> None:
    served = [spec.name for spec in catalogue.SERVED]
    assert len(served) == len(set(served))
    internal = {catalogue.HEARTBEAT, catalogue.BEAT_HEARTBEAT}
    assert set(catalogue.RECORDED) - set(catalogue.SERVED) == internal, "only the heartbeats are internal"
    assert all(spec.mode for spec in catalogue.RECORDED if spec.kind == "gauge"), "a recorded gauge needs a merge mode"


def test_no_metric_name_or_help_outside_the_catalogue() -> None:
    """Names and help texts live in catalogue.py only (the mixin's queries aside: they use metrics, not define them)."""
    specs = (*catalogue.SERVED, *catalogue.RECORDED)
    defined = {s.name for s in specs} | {s.sample_name for s in specs} | {s.help for s in specs}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "catalogue.py" or "mixin" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in defined:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []


