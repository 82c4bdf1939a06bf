"""Real Prometheus, Alertmanager and a webhook receiver, each started on a free port for one test
and stopped after it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import free_port, wait_until


def program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's `{package}` package (bash .ci/tools.sh does)", pytrace=False)
    return path


@contextmanager
def _process(argv: list[str], log_path: str, ready_url: str, what: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise AssertionError(f"{what} exited {proc.returncode}:\n{f.read()[-3000:]}")
        try:
            return httpx.get(ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, f"{what} to be ready")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Webhook:
    """Collects what Alertmanager posts, as an on-call pager would receive it. Each payload keeps
    the time it arrived (`_received`, UNIX seconds), for the incident suite's time to page."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        received = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(body)
                payload["_received"] = time.time()
                for alert in payload["alerts"]:
                    alert["_received"] = payload["_received"]
                received.append(payload)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def notifications(self, alertname: str, status: str) -> list[dict[str, Any]]:
        """Alerts named `alertname` that arrived with `status` (firing or resolved)."""
        return [
            a
            for p in list(self.payloads)
            for a in p["alerts"]
            if a["labels"].get("alertname") == alertname and a["status"] == status
        ]

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def alertmanager(tmp: str, webhook_url: str, group_wait: str = "1s", group_interval: str = "1s",
                 repeat_interval: str = "1h") -> Iterator[str]:
    port = free_port()
    config = {
        "route": {
            "receiver": "pager",
            "group_by": ["alertname", "queue_name"],
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        },
        "receivers": [{"name": "pager", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }
    path = os.path.join(tmp, "alertmanager.yml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    argv = [program("prometheus-alertmanager", "prometheus-alertmanager"), f"--config.file={path}",
            f"--storage.path={os.path.join(tmp, 'am-data')}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address="]
    url = f"http://127.0.0.1:{port}"
    with _process(argv, os.path.join(tmp, "alertmanager.log"), f"{url}/-/ready", "alertmanager"):
        yield url


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def series(self, selector: str) -> list[dict[str, str]]:
        r = httpx.get(f"{self.url}/api/v1/series", params={"match[]": selector}, timeout=10)
        assert r.status_code == 200, r.text
        data: list[dict[str, str]] = r.json()["data"]
        return data

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/alerts", timeout=10)
        return [a for a in r.json()["data"]["alerts"] if a["state"] == state]


@contextmanager
def prometheus(tmp: str, targets: dict[str, str], rule_files: list[str], alertmanager_url: str | None,
               interval: str = "1s", backfill: str | None = None) -> Iterator[Prometheus]:
    """Scrapes and evaluates rules every `interval` (a second unless told), labelling targets as a
    namespace would, and sends alerts to `alertmanager_url` (None: nowhere). `backfill`: OpenMetrics
    text written into the TSDB before Prometheus starts (`promtool tsdb create-blocks-from
    openmetrics`), for history older than the test."""
    port = free_port()
    data = os.path.join(tmp, "prom-data")
    if backfill is not None:
        source = os.path.join(tmp, "backfill.om")
        with open(source, "w") as f:
            f.write(backfill if backfill.endswith("# EOF\n") else backfill + "# EOF\n")
        out = subprocess.run([program("promtool", "prometheus"), "tsdb", "create-blocks-from", "openmetrics",
                              source, data], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"promtool backfill failed:\n{out.stdout}\n{out.stderr}"
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": rule_files,
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target], "labels": {"namespace": "e2e"}}]}
            for job, target in targets.items()
        ],
    }
    if alertmanager_url is not None:
        address = alertmanager_url.split("//", 1)[1]
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [address]}]}]}
    path = os.path.join(tmp, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    argv = [program("prometheus", "prometheus"), f"--config.file={path}",
            f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}"
    with _process(argv, os.path.join(tmp, "prometheus.log"), f"{url}/-/ready", "prometheus"):
        yield Prometheus(url)


@dataclass
class Monitoring:
    """What a test reads: Prometheus, and the pager (the webhook Alertmanager posts to)."""

    prom: Prometheus
    pager: Webhook


@contextmanager
def monitoring(tmp: str, targets: dict[str, str], rules: dict[str, Any], *, alerting: bool = True,
               interval: str = "1s", group_wait: str = "1s", group_interval: str = "1s",
               repeat_interval: str = "1h", backfill: str | None = None) -> Iterator[Monitoring]:
    """The monitoring stack: a Prometheus scraping `targets` (job -> host:port) every `interval` and
    evaluating `rules` (file name -> rule groups, written into `tmp`), alerting through an Alertmanager
    to the pager. `alerting=False`: no Alertmanager, for tests that read alert states from Prometheus
    itself (the pager then stays empty). `backfill`: see prometheus()."""
    rule_files = []
    for name, groups in rules.items():
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            yaml.safe_dump(groups, f)
        rule_files.append(path)
    with ExitStack() as stack:
        pager = stack.enter_context(Webhook())
        am_url = stack.enter_context(alertmanager(tmp, pager.url, group_wait=group_wait, group_interval=group_interval,
                                                  repeat_interval=repeat_interval)) if alerting else None
        prom = stack.enter_context(prometheus(tmp, targets, rule_files, am_url, interval=interval, backfill=backfill))
        yield Monitoring(prom, pager)
