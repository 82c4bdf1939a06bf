"""docs/cardinality.md stays true: its figures are measured again on a real worker and its snippets run.

The page is rendered from figures it carries (tests/cardinality.py). Here the
figures for 10 and 50 task names are measured again, one worker start-up per
configuration, and must equal the page's; the page's 200-name figures were
measured too, and the checks below show they are the figure that does not
scale plus 200 times the per-pair one, which is the same at every step. The
bucket-thinning snippet is run by a real Prometheus against the real exporter,
and the aggregation snippets go through promtool.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import cardinality
from tests.harness import exporter, free_port, wait_until
from tests.stack import _process, program

STALE = "docs/cardinality.md is stale: run python -m tests.cardinality"


@pytest.fixture(scope="module")
def page() -> str:
    return cardinality.DOC_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def figures(page: str) -> dict[str, Any]:
    return cardinality.recorded(page)


def yaml_blocks(page: str) -> list[str]:
    """The page's yaml code blocks, unindented."""
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", page, flags=re.S | re.M)
    return ["\n".join(line[len(indent):] for line in body.splitlines()) for indent, body in blocks]


def test_the_page_is_what_its_figures_render(page: str, figures: dict[str, Any]) -> None:
    assert cardinality.render(figures) == page, STALE
    assert cardinality.main(["--check"]) == 0


def test_a_pod_is_what_does_not_scale_plus_pairs_times_the_per_pair_figure(figures: dict[str, Any]) -> None:
    assert figures["steps"] == [10, 50, 200]
    for key, cfg in figures["configs"].items():
        assert ("events" in cfg) == (key == "defaults")
        for side in ("worker", "producer"):
            by_step = cfg[side]
            first = by_step["10"]
            per_pair = sum(first["per_pair"].values())
            for step, found in by_step.items():
                assert found["per_pair"] == first["per_pair"], (key, side, step)
                assert found["buckets"] == first["buckets"], (key, side, step)
                assert found["fixed"] == first["fixed"], (key, side, step)
                assert found["total"] == sum(found["fixed"].values()) + int(step) * per_pair, (key, side, step)
    workers = {key: sum(cfg["worker"]["50"]["per_pair"].values()) for key, cfg in figures["configs"].items()}
    # What the issue measured on a new user's pod: 51 per (task, queue), 38 of them buckets.
    assert workers == {"defaults": 51, "opt_ins": 62, "six_buckets": 27}
    assert sum(figures["configs"]["defaults"]["worker"]["50"]["buckets"].values()) == 38


def test_the_figures_hold_on_a_real_worker(redis_url: str, tmp_path: Path, figures: dict[str, Any]) -> None:
    started = time.monotonic()
    measured = cardinality.measure(redis_url, tmp_path, steps=(10, 50))
    for key, cfg in figures["configs"].items():
        for side in ("worker", "producer"):
            for step in ("10", "50"):
                assert measured["configs"][key][side][step] == cfg[side][step], (key, side, step)
    # Two failures and a retry that fails for good: +1 per (task, queue, exception class), +1 retried, +1 sent.
    assert measured["configs"]["defaults"]["events"] == figures["configs"]["defaults"]["events"]
    assert len(figures["configs"]["defaults"]["events"]["added"]) == 5
    assert measured["probe"] == figures["probe"]
    assert measured["event_exporter"] == figures["event_exporter"]
    assert time.monotonic() - started < 240

    # The thinning snippet, in a real Prometheus scraping the real exporter on the defaults' directory.
    scrape = next(b for b in yaml_blocks(cardinality.DOC_PATH.read_text()) if "metric_relabel_configs" in b)
    relabel = yaml.safe_load(scrape.replace("# ... kubernetes_sd_configs, relabel_configs as before ...", ""))
    job = relabel["scrape_configs"][0]
    metrics_dir = str(tmp_path / "defaults" / "worker-metrics")
    with exporter(str(tmp_path), "--metrics-dir", metrics_dir) as ex:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ex.port}"]}]
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [job]}
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [program("prometheus", "prometheus"), f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}", f"--web.listen-address=127.0.0.1:{port}"]
        with _process(argv, os.path.join(tmp_path, "prometheus.log"), f"{url}/-/ready", "prometheus"):
            def buckets() -> list[dict[str, str]]:
                r = httpx.get(f"{url}/api/v1/series", params={"match[]": '{__name__=~".+_bucket"}'}, timeout=10)
                return list(r.json()["data"])

            kept = wait_until(buckets, 30, "Prometheus to scrape the exporter")
            started_total = wait_until(lambda: httpx.get(f"{url}/api/v1/series", params={
                "match[]": "celery_task_started_total"}, timeout=10).json()["data"], 10, "started in Prometheus")
    per_histogram: dict[tuple[str, str], set[str]] = {}
    for s in kept:
        assert "__tmp_keep_bucket" not in s
        per_histogram.setdefault((s["__name__"], s["name"]), set()).add(s["le"])
    # 50 names, each with its two histograms: 6 buckets of 19 kept, the same 6 for every one.
    assert len(per_histogram) == 2 * 50
    assert {frozenset(les) for les in per_histogram.values()} == {
        frozenset({"0.1", "1", "10", "60", "300", "+Inf"})}
    assert len(started_total) == 50  # the other families pass untouched


def test_the_aggregation_snippets_are_valid(tmp_path: Path, page: str) -> None:
    blocks = yaml_blocks(page)
    rules = next(b for b in blocks if "groups:" in b)
    (tmp_path / "rules.yml").write_text(rules)
    run = subprocess.run([program("promtool", "prometheus"), "check", "rules", str(tmp_path / "rules.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "2 rules found" in run.stdout, run.stdout + run.stderr
    remote = next(b for b in blocks if "remote_write:" in b)
    (tmp_path / "prometheus.yml").write_text(remote)
    run = subprocess.run([program("promtool", "prometheus"), "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
