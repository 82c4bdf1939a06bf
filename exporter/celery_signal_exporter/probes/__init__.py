"""Broker probes, one per file, that register themselves; the URL's scheme picks one.

In the style of node_exporter's collectors: each probe module calls
`register(ProbeKind(...))` with its URL schemes, its own command-line options
and how to build its settings from them. The modules are found by listing
this package (plus the directories in `CELERY_EXPORTER_PROBE_PATH`), so a
new broker is one new file and nothing here changes. A probe module imports
its broker library only when a probe is created, so listing the probes (the
CLI does, for --help) loads no broker client.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from collections.abc import Mapping
from typing import Any

from celery_signal_exporter.probes.base import (
    BrokerSnapshot,
    NodeStats,
    OptionError,
    Probe,
    ProbeError,
    ProbeKind,
    ProbeOption,
    ProbeOptions,
    QueueStats,
)
from celery_signal_exporter.redact import redact_url

__all__ = [
    "PATH_ENV",
    "BrokerSnapshot",
    "NodeStats",
    "OptionError",
    "Probe",
    "ProbeError",
    "ProbeKind",
    "ProbeLoadError",
    "ProbeOption",
    "ProbeOptions",
    "QueueStats",
    "kind_for_url",
    "kinds",
    "probe_for_url",
    "probe_settings",
    "register",
    "schemes",
]

#: Extra directories searched for probe modules (os.pathsep-separated): a
#: broker of your own without touching the installed package.
PATH_ENV = "CELERY_EXPORTER_PROBE_PATH"
#: Modules of this package that are not probes.
_NOT_PROBES = frozenset({"base"})

_kinds: dict[str, ProbeKind] = {}


class ProbeLoadError(Exception):
    """A probe module that fails to import (typically one on CELERY_EXPORTER_PROBE_PATH)."""


_discovered = False


def register(kind: ProbeKind) -> ProbeKind:
    """Make a probe known; called by each probe module when it is imported.

    A scheme or option key already claimed by another probe is a bug in one
    of the two modules, so it fails loudly instead of one silently winning;
    the very same `ProbeOption` declared by both is one shared option.
    """
    for other in _kinds.values():
        if other.name == kind.name:
            continue
        if clash := set(other.schemes) & set(kind.schemes):
            raise ValueError(f"probe {kind.name!r}: scheme(s) {sorted(clash)} already belong to {other.name!r}")
        # An option declared identically (e.g. base.OLDEST_AGE) is shared, not a clash.
        if clash := {o.key for o in other.options if o not in kind.options} & {o.key for o in kind.options}:
            raise ValueError(f"probe {kind.name!r}: option(s) {sorted(clash)} already belong to {other.name!r}")
    _kinds[kind.name] = kind
    return kind


def _discover() -> None:
    """Import every probe module once; importing one registers it."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for extra in os.environ.get(PATH_ENV, "").split(os.pathsep):
        if extra and extra not in __path__:
            __path__.append(extra)
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_PROBES and not module.name.startswith("_"):
            try:
                importlib.import_module(f"{__name__}.{module.name}")
            except Exception as exc:  # a broken probe file of the user's: one line, not a traceback
                where = getattr(module.module_finder, "path", "?")
                raise ProbeLoadError(f"probe module {module.name!r} in {where} cannot be loaded: "
                                     f"{type(exc).__name__}: {exc}") from exc


def kinds() -> list[ProbeKind]:
    """Every registered probe, by name."""
    _discover()
    return [_kinds[name] for name in sorted(_kinds)]


def schemes() -> list[str]:
    """Every scheme a probe handles, as `scheme://`, for help and error texts."""
    return [f"{s}://" for kind in kinds() for s in kind.schemes]


def kind_for_url(url: str) -> ProbeKind:
    """The registered probe for this URL's scheme; ValueError, without the URL's secrets, if none."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    scheme = match.group(1).lower() if match else ""
    for kind in kinds():
        if scheme in kind.schemes:
            return kind
    known = ", ".join(schemes())
    raise ValueError(f"no broker probe for {redact_url(url)!r}: scheme {scheme or '(none)'!r} is not one of {known}")


def probe_for_url(url: str, options: ProbeOptions | None = None) -> Probe:
    """The probe for this broker URL, picked by its scheme."""
    return kind_for_url(url).create(url, options or ProbeOptions())


def probe_settings(values: Mapping[str, Any]) -> tuple[object, ...]:
    """Every probe's settings object from the command line's option values
    (by `ProbeOption.key`; a missing one takes its default).

    All are built, used or not, so a bad option value is an error even
    before a broker of its kind is configured. Raises `OptionError`.
    """
    built = []
    for kind in kinds():
        if kind.settings is not None:
            built.append(kind.settings({o.key: values.get(o.key, o.default) for o in kind.options}))
    return tuple(built)
