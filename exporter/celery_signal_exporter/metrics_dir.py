"""Where the shared metrics directory is: the one place that knows the fallback.

`instrument()`, `serve`, `check` and the demo all ask here, so the variables
(ours first, then prometheus-client's `PROMETHEUS_MULTIPROC_DIR`, which many
deployments already set) are read in one order everywhere.
"""

from __future__ import annotations

import os

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
