"""The installed distribution's version, from pyproject.toml: one source, read without importing the rest."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("celery-signal-exporter")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
