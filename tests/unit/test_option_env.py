"""Every option of every command is also an environment variable, under a valid shell name, and it works."""

from __future__ import annotations

import re
from typing import Any

import click
import pytest

from celery_signal_exporter.cli import cli

SHELL_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def _options() -> list[tuple[str, click.Option]]:
    assert isinstance(cli, click.Group)
    return [(name, param) for name, command in sorted(cli.commands.items()) for param in command.params
            if isinstance(param, click.Option) and param.envvar and param.name not in ("help", "version")]


def _other_value(option: click.Option, tmp: str) -> tuple[str, Any]:
    """A value for the option's variable, and what the option must then read, unlike its default."""
    kind = option.type
    if option.is_flag:
        return ("false", False) if option.default else ("true", True)
    if isinstance(kind, click.Choice):
        choice = next(c for c in kind.choices if c != option.default)
        return str(choice), choice
    if isinstance(kind, click.IntRange | click.types.IntParamType):
        return "2", 2
    if isinstance(kind, click.FloatRange | click.types.FloatParamType):
        return "3.5", 3.5
    if isinstance(kind, click.Path):
        return tmp, tmp
    if option.multiple:
        return "redis://a:1/0 redis://b:2/0" if "url" in (option.name or "") else "alpha", None
    return "{}" if "options" in (option.name or "") else "a.b:c", None


@pytest.mark.parametrize(("command", "option"), _options(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_option_reads_its_environment_variable(command: str, option: click.Option, tmp_path: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(option.envvar, str) and SHELL_NAME.match(option.envvar), option.envvar
    raw, expected = _other_value(option, str(tmp_path))
    monkeypatch.setenv(option.envvar, raw)
    assert isinstance(cli, click.Group)
    ctx = cli.commands[command].make_context(command, [], resilient_parsing=True)
    got = ctx.params[option.name or ""]
    assert got != option.default or (option.default is None and got is not None), (option.envvar, raw, got)
    if expected is not None:
        assert got == expected, (option.envvar, raw, got)


def test_serve_hands_every_option_to_its_one_config(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve builds one ServeConfig from its options (here all from the environment) and passes it whole:
    to serving.run, to every probe loop, and on to the merge's caps."""
    from celery_signal_exporter import cli as cli_module
    from celery_signal_exporter.options import parse_exclude
    from celery_signal_exporter.server import serving
    from celery_signal_exporter.server.service import Exporter
    from celery_signal_exporter.server.webconfig import WebConfig
    from tests.harness import free_port

    port = free_port()
    env = {"METRICS_DIR": str(tmp_path), "HOST": "127.0.0.1", "PORT": str(port), "WORKER_TIMEOUT": "3.5",
           "BROKER_URL": "redis://a:1/0 redis://b:2/0", "PROBE_INTERVAL": "9", "PROBE_TIMEOUT": "4",
           "QUEUE": "q1 q2", "QUEUE_INCLUDE": "q.*", "QUEUE_EXCLUDE": "x", "MAX_QUEUES": "5",
           "TRANSPORT_OPTIONS": '{"sep": ":"}', "OLDEST_AGE": "false", "MAX_TASK_NAMES": "6",
           "MAX_QUEUE_NAMES": "7", "COMPACT_INTERVAL": "0", "HEADER_TIMEOUT": "2.5", "SEND_TIMEOUT": "3.5",
           "MAX_CONNECTIONS": "8", "EXCLUDE_METRICS": "celery_task_cpu_seconds", "LOG_LEVEL": "warning"}
    for name, raw in env.items():
        monkeypatch.setenv(f"CELERY_EXPORTER_{name}", raw)
    seen: list[tuple[Any, Any]] = []

    def run(config: Any, probes: Any, listener: Any, duration: float = 0.0) -> bool:
        listener.close()
        seen.append((config, probes))
        return True

    monkeypatch.setattr(serving, "run", run)
    monkeypatch.setattr(cli_module, "_setup_logging", lambda level: None)
    cli_module.main(["serve"])
    ((config, probes),) = seen
    assert {name: getattr(config, name) for name in (
        "metrics_dir", "host", "port", "worker_timeout", "broker_urls", "probe_interval", "probe_timeout", "queues",
        "queue_include", "queue_exclude", "max_queues", "transport_options", "max_task_names", "max_queue_names",
        "compact_interval", "header_timeout", "send_timeout", "max_connections", "log_level", "web_config",
        "exclude_metrics")} == {
        "metrics_dir": str(tmp_path), "host": "127.0.0.1", "port": port, "worker_timeout": 3.5,
        "broker_urls": ("redis://a:1/0", "redis://b:2/0"), "probe_interval": 9.0, "probe_timeout": 4.0,
        "queues": ("q1", "q2"), "queue_include": ("q.*",), "queue_exclude": ("x",), "max_queues": 5,
        "transport_options": {"sep": ":"}, "max_task_names": 6, "max_queue_names": 7, "compact_interval": 0.0,
        "header_timeout": 2.5, "send_timeout": 3.5, "max_connections": 8, "log_level": "warning",
        "web_config": WebConfig(), "exclude_metrics": parse_exclude("celery_task_cpu_seconds", "--exclude-metrics")}
    assert config.probe_values["oldest_age"] is False
    (group,) = probes
    assert len(group.loops) == 2 and all(loop.config is config for loop in group.loops)
    exporter = Exporter(config)
    assert exporter.directory is not None
    assert (exporter.directory.max_task_names, exporter.directory.max_queue_names) == (6, 7)
