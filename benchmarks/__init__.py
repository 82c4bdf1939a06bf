"""Benchmarks of celery-signal-exporter: `python -m benchmarks` runs them all (see run.py)."""
