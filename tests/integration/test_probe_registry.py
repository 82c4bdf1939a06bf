"""Probes register themselves: the CLI reads the registry, loads no broker
library until a probe is created, and a third broker is one file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from celery_signal_exporter.options import metrics_dir_or_env
from celery_signal_exporter.probes import (
    PATH_ENV,
    Probe,
    ProbeKind,
    ProbeOption,
    ProbeOptions,
    kind_for_url,
    kinds,
    register,
)
from tests.harness import PYTHONPATH, ROOT, exporter, value, wait_until

#: Top-level modules of the broker clients: none may load before a probe exists.
BROKER_LIBRARIES = ("redis", "pyrabbit2", "requests", "kombu", "boto3", "botocore")

#: A test probe for the made-up `fixedq://` scheme. It talks to no broker and
#: reports one queue of the length its own option says: it shows what one
#: new probe file has to hold, and stands in for no real broker.
FIXED_PROBE = '''
"""Test probe: one queue, `fixed`, of the length --fixedq-length says."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery_signal_exporter.probes import register
from celery_signal_exporter import catalogue as c
from celery_signal_exporter.probes.base import BrokerSnapshot, ProbeKind, ProbeOption, ProbeOptions, QueueStats


@dataclass(frozen=True)
class FixedSettings:
    length: int = 7

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> FixedSettings:
        return cls(length=values["fixedq_length"])


class FixedProbe:
    def __init__(self, url: str, options: ProbeOptions | None = None) -> None:
        self.length = (options or ProbeOptions()).settings_for(FixedSettings).length

    def discover(self) -> set[str]:
        return set()

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        # Figures of its own ride on the catalogue's entries: the loop serves them unchanged.
        return BrokerSnapshot(queues=[QueueStats(name="fixed", vhost="/", length=self.length,
                                                 measures=((c.QUEUE_DELAYED, 3.0),))],
                              counters=((c.PROBE_REQUESTS, 11.0),))

    def close(self) -> None:
        pass


register(ProbeKind(
    name="fixedq",
    schemes=("fixedq",),
    create=FixedProbe,
    options=(ProbeOption("--fixedq-length", type=int, default=7, help="Length the fixedq probe reports."),),
    settings=FixedSettings.from_options,
))
'''


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})


def test_cli_and_help_load_no_broker_library_until_a_probe_is_created() -> None:
    code = textwrap.dedent(f"""
        import json, sys
        libraries = {BROKER_LIBRARIES!r}

        def loaded():
            return sorted(m for m in sys.modules if m.split(".")[0] in libraries)

        seen = {{}}
        from celery_signal_exporter import cli
        seen["import"] = loaded()
        for args in (["--help"], ["serve", "--help"], ["demo", "--help"], ["check", "--help"]):
            try:
                cli.cli.main(args=args, prog_name="celery-signal-exporter", standalone_mode=True)
            except SystemExit:
                pass
            seen[" ".join(args)] = loaded()
        from celery_signal_exporter.probes import kinds
        kinds()
        seen["kinds"] = loaded()
        from celery_signal_exporter.probes import probe_for_url
        probe_for_url("redis://127.0.0.1:1/0")
        seen["redis probe"] = sorted({{m.split(".")[0] for m in loaded()}})
        probe_for_url("sqs://127.0.0.1:1")
        seen["sqs probe"] = sorted({{m.split(".")[0] for m in loaded()}})
        print(json.dumps(seen))
    """)
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    for step in ("import", "--help", "serve --help", "demo --help", "check --help", "kinds"):
        assert seen[step] == [], (step, seen[step])
    assert "redis" in seen["redis probe"] and "pyrabbit2" not in seen["redis probe"], seen["redis probe"]
    assert "boto3" not in seen["redis probe"], "boto3 loads only with an SQS probe"
    assert {"boto3", "botocore"} <= set(seen["sqs probe"]), seen["sqs probe"]


def test_the_registry_knows_both_brokers_and_their_options() -> None:
    by_name = {k.name: k for k in kinds()}
    assert set(by_name) >= {"redis", "rabbitmq"}
    assert kind_for_url("REDIS://h/0").name == "redis" and kind_for_url("pyamqp://h").name == "rabbitmq"
    assert [o.flag for o in by_name["redis"].options] == ["--oldest-age/--no-oldest-age"]
    assert {o.key for o in by_name["rabbitmq"].options} == {
        "rabbitmq_management_url", "rabbitmq_management_user", "rabbitmq_management_password", "rabbitmq_vhosts",
        "rabbitmq_alarm_interval", "oldest_age"}
    # The one option both read is the same declaration, shared rather than a clash.
    assert by_name["redis"].options[0] in by_name["rabbitmq"].options
    assert kind_for_url("sqs://").name == "sqs" and kind_for_url("filesystem://").name == "filesystem"
    assert by_name["sqs"].options == () and by_name["filesystem"].options == (by_name["redis"].options[0],)
    with pytest.raises(ValueError, match="no broker probe"):
        kind_for_url("kafka://h")


def test_a_scheme_or_option_claimed_twice_is_refused() -> None:
    def create(url: str, options: ProbeOptions) -> Probe:
        raise AssertionError("never created")

    kinds()  # every probe module registered first

    with pytest.raises(ValueError, match="already belong to 'redis'"):
        register(ProbeKind(name="impostor", schemes=("rediss",), create=create))
    with pytest.raises(ValueError, match=r"\['oldest_age'\] already belong to"):
        register(ProbeKind(name="impostor", schemes=("impostor",), create=create,
                           options=(ProbeOption("--oldest-age", help="taken"),)))
    assert "impostor" not in {k.name for k in kinds()}


def test_metrics_dir_falls_back_in_one_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELERY_EXPORTER_METRICS_DIR", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert metrics_dir_or_env(None) is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/prom")
    assert metrics_dir_or_env(None) == "/prom"
    monkeypatch.setenv("CELERY_EXPORTER_METRICS_DIR", "/ours")
    assert metrics_dir_or_env(None) == "/ours"
    assert metrics_dir_or_env("/given") == "/given"


def test_a_third_broker_is_one_file(tmp_path: Path) -> None:
    plugins = tmp_path / "probes"
    plugins.mkdir()
    (plugins / "fixedq.py").write_text(FIXED_PROBE)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, PATH_ENV: str(plugins)}

    helped = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli", "serve", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=env)
    assert helped.returncode == 0, helped.stderr
    flat = re.sub(r"\s+", "", helped.stdout)
    assert "--fixedq-length" in helped.stdout and "CELERY_EXPORTER_FIXEDQ_LENGTH" in flat
    assert "fixedq://" in flat and "redis://" in flat  # --broker-url lists every registered scheme

    with exporter(str(tmp_path), "--broker-url", "fixedq://anywhere", "--fixedq-length", "42",
                  "--probe-interval", "1", "--probe-timeout", "1", env=env) as ex:
        samples = wait_until(lambda: (s := ex.scrape()) and value(s, "celery_broker_up") == 1 and s, 20,
                             "the fixedq probe's first cycle")
        assert value(samples, "celery_queue_length", queue_name="fixed", vhost="/") == 42
        assert value(samples, "celery_broker_up", broker="fixedq://anywhere") == 1
        # Its own figures (a per-queue gauge, a broker counter) with no change to the loop or the CLI.
        assert value(samples, "celery_queue_delayed", queue_name="fixed", vhost="/") == 3
        assert value(samples, "celery_exporter_probe_requests_total", broker="fixedq://anywhere") == 11

    # The option's environment variable reaches the probe as well.
    with exporter(str(tmp_path), "--broker-url", "fixedq://anywhere", "--probe-interval", "1",
                  "--probe-timeout", "1", env={**env, "CELERY_EXPORTER_FIXEDQ_LENGTH": "5"}) as ex:
        wait_until(lambda: value(ex.scrape(), "celery_queue_length", queue_name="fixed") == 5, 20,
                   "the length from CELERY_EXPORTER_FIXEDQ_LENGTH")


def test_a_broken_probe_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    plugins = tmp_path / "probes"
    plugins.mkdir()
    (plugins / "broken.py").write_text("import not_a_module_anywhere\n")
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, PATH_ENV: str(plugins)}
    run = subprocess.run([sys.executable, "-m", "celery_signal_exporter.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"celery-signal-exporter: error: probe module 'broken' in {plugins} cannot be loaded: "
        "ModuleNotFoundError: No module named 'not_a_module_anywhere'"
    ]
