"""The receivers Celery calls on every task catch their own errors: garbage in, a counted error out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.harness import PYTHONPATH, ROOT


def test_every_receiver_survives_garbage_and_counts_it(tmp_path: os.PathLike[str]) -> None:
    # Its own interpreter: instrument() is once per process.
    script = textwrap.dedent("""
        import sys
        from celery import Celery
        import celery_signal_exporter
        from celery_signal_exporter.server.collect import DirectoryCollector
        from tests.recorded import merged_samples

        app = Celery("guard", broker="memory://", set_as_current=False)
        inst = celery_signal_exporter.instrument(app, metrics_dir=sys.argv[1])
        garbage = object()
        for signal, label, receiver in inst.receivers():
            receiver(signal=signal, sender=garbage, headers=garbage, task=garbage, request=garbage,
                     exchange=[], routing_key={}, task_id=[], state="SUCCESS", message=garbage)
        samples = merged_samples(DirectoryCollector(sys.argv[1]))
        for _, label, _ in inst.receivers():
            print(label, samples.get(f'celery_exporter_handler_errors_total{{signal="{label}"}}', 0))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False, env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    assert out.returncode == 0, out.stderr
    errors = dict(line.split() for line in out.stdout.splitlines())
    for label in ("before_task_publish", "after_task_publish", "task_received", "task_prerun", "task_postrun",
                  "task_failure", "task_retry"):
        assert float(errors[label]) == 1, (label, out.stdout, out.stderr)
    assert "receiver failed" in out.stderr  # logged, once per signal
