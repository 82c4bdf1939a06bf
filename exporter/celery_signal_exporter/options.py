"""The options an operator types, parsed the same way by `instrument()`, `check` and the CLI.

Histogram buckets, the opt-in switches, the metrics directory's variables and the metric-exclusion
regex each have one parser here, so a typo gets the same one-line message (naming the option or
variable) whether it fails the app's import, an init container's `check` or `serve`'s start. This
module imports neither Celery nor anything of the exporter, so the CLI parses options without them.

Exclusion: `CELERY_EXPORTER_EXCLUDE_METRICS` (or `instrument(exclude_metrics=...)`, `serve
--exclude-metrics`) is matched in full against each family's name, with or without its sample suffix
(`celery_task_sent` and `celery_task_sent_total` both name the sent counter), so
`celery_task_queue_wait_seconds|celery_task_cpu.*` drops two families. The workers then write nothing
of them (no file space, no series) and the exporter serves nothing of them, whoever wrote them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

# --- Histogram buckets

def parse_buckets(text: str, option: str, unit: str = "seconds") -> tuple[float, ...]:
    """Comma-separated upper bounds in `unit` (seconds, or bytes for memory), e.g. ``"0.01,0.1,1,10"``.

    They must be finite numbers greater than 0, in strictly increasing order
    (+Inf is always added by the histogram itself, so it is refused here).
    Raises ValueError with one line naming `option` and the bad item.
    """
    example = "1048576,16777216,268435456" if unit == "bytes" else "0.1,1,10"
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise ValueError(f"{option}: no buckets given; expected comma-separated {unit} such as {example}")
    bounds: list[float] = []
    for position, item in enumerate(items, 1):
        if not item:
            raise ValueError(f"{option}: bucket {position} is empty; expected comma-separated {unit} such as {example}")
        try:
            bound = float(item)
        except ValueError:
            raise ValueError(f"{option}: bucket {item!r} is not a number") from None
        if not math.isfinite(bound):
            raise ValueError(f"{option}: bucket {item!r} must be finite (+Inf is always added)")
        if bound <= 0:
            raise ValueError(f"{option}: bucket {item!r} must be greater than 0")
        if bounds and bound <= bounds[-1]:
            raise ValueError(f"{option}: bucket {item!r} must be greater than the one before it ({bounds[-1]:g})")
        bounds.append(bound)
    return tuple(bounds)


def check_buckets(value: Any, option: str, unit: str = "seconds") -> tuple[float, ...]:
    """Bucket bounds from a list of numbers or a "0.1,1,10" string, checked by the CLI's parser.

    Checked here, at instrument() time, so that a bad list fails the app's
    import with one line naming the option, never later inside a signal
    handler. A trailing +Inf, as prometheus-client users write it, is allowed.
    """
    if isinstance(value, str):
        return parse_buckets(value, option, unit)
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{option}: expected a list of {unit}, not {type(value).__name__}") from None
    if items and not isinstance(items[-1], bool) and isinstance(items[-1], (int, float)) and items[-1] == math.inf:
        items.pop()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"{option}: bucket {item!r} is not a number")
    return parse_buckets(",".join(repr(float(b)) for b in items), option, unit)


def or_env(value: Sequence[float] | str | None, name: str, default: Sequence[float]) -> Sequence[float] | str:
    """The argument, else CELERY_EXPORTER_<name>, else the default."""
    if value is not None:
        return value
    return os.environ.get(f"CELERY_EXPORTER_{name}") or default


# --- The opt-in switches

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


#: The opt-in measures' switches, as CELERY_EXPORTER_<name> (`celery-signal-exporter check` validates them).
OPT_IN_SWITCHES = ("TASK_RESOURCES", "PUBLISH_TIMING")


def switch(value: bool, name: str) -> bool:
    """An opt-in switch: on if the argument is True or CELERY_EXPORTER_<name> says so.

    Checked at instrument() time, so a typo fails the app's import with one line naming
    the variable instead of silently leaving the measure off.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name.lower()}: expected True or False, not {value!r}")
    variable = f"CELERY_EXPORTER_{name}"
    text = os.environ.get(variable, "").strip().lower()
    if text not in _TRUE and text not in _FALSE:
        raise ValueError(f"{variable}: expected 1 or 0 (true/false, yes/no, on/off), not {os.environ[variable]!r}")
    return value or text in _TRUE


# --- Metric exclusion

EXCLUDE_ENV = "CELERY_EXPORTER_EXCLUDE_METRICS"

_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def parse_exclude(text: str | None, option: str = EXCLUDE_ENV) -> re.Pattern[str] | None:
    """The compiled regex, None when unset or empty; ValueError with one line naming `option`."""
    if text is None or not text.strip():
        return None
    try:
        return re.compile(text.strip())
    except re.error as exc:
        raise ValueError(f"{option}: {text.strip()!r} is not a regex: {exc}") from None


def excluded(pattern: re.Pattern[str] | None, name: str) -> bool:
    """Whether the family `name` (or one of its sample names, or the family of a sample name) is
    switched off."""
    if pattern is None:
        return False
    family = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
    return any(pattern.fullmatch(candidate) for candidate in (name, family, *(family + s for s in _SUFFIXES)))


# --- The metrics directory

#: Environment variables naming the directory, in the order they are tried.
METRICS_DIR_ENV = ("CELERY_EXPORTER_METRICS_DIR", "PROMETHEUS_MULTIPROC_DIR")


def metrics_dir_or_env(metrics_dir: str | None) -> str | None:
    """`metrics_dir` if given, else the first variable of METRICS_DIR_ENV that is set, else None."""
    if metrics_dir:
        return metrics_dir
    for var in METRICS_DIR_ENV:
        if os.environ.get(var):
            return os.environ[var]
    return None


def resolve_metrics_dir(metrics_dir: str | None) -> str:
    directory = metrics_dir_or_env(metrics_dir)
    if directory is None:
        raise ValueError(
            "celery-signal-exporter: no metrics directory; pass metrics_dir= or set "
            f"{METRICS_DIR_ENV[0]} (or {METRICS_DIR_ENV[1]})"
        )
    return directory
