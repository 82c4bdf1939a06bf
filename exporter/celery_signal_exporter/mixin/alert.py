"""One alert rule as the generators build it, shared by rules.py and objectives.py."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Alert:
    """One alert rule; `description` may template `$labels` and `$value`; `panel` is (dashboard, title);
    `labels` are added to the severity (an objective's alerts say which objective paged)."""

    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    panel: tuple[str, str]
    labels: dict[str, str] = field(default_factory=dict)


def num(value: float) -> str:
    """A number as PromQL reads it, without a trailing `.0`."""
    return f"{value:g}" if value != int(value) else str(int(value))
