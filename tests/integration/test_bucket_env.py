"""Workers take their buckets from the same variables `check` validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import PYTHONPATH, ROOT

SCRIPT = """
from celery import Celery
import celery_signal_exporter
inst = celery_signal_exporter.instrument(Celery("x"), metrics_dir={d!r}{extra})
print(inst.options.runtime_buckets, inst.options.queue_wait_buckets)
"""


def run(tmp: Path, env: dict[str, str], extra: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(d=str(tmp), extra=extra)], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": PYTHONPATH, **env},
                          capture_output=True, text=True)


def test_buckets_from_the_environment(tmp_path: Path) -> None:
    out = run(tmp_path, {"CELERY_EXPORTER_RUNTIME_BUCKETS": "0.5,2", "CELERY_EXPORTER_QUEUE_WAIT_BUCKETS": "1,60"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "(0.5, 2.0) (1.0, 60.0)"


def test_an_explicit_argument_wins_over_the_environment(tmp_path: Path) -> None:
    out = run(tmp_path, {"CELERY_EXPORTER_RUNTIME_BUCKETS": "0.5,2"}, ", runtime_buckets=(1, 10)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(1.0, 10.0) ")


def test_bad_buckets_in_the_environment_fail_the_import_with_one_named_line(tmp_path: Path) -> None:
    out = run(tmp_path, {"CELERY_EXPORTER_RUNTIME_BUCKETS": "2,1"})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: runtime_buckets"), last
