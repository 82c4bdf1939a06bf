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
