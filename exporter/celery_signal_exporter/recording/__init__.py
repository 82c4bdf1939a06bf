"""What runs inside our users' Celery processes: producers, worker mains, pool children and beat.

`receivers.instrument()` connects the signal receivers; they record into per-process files through
`store` (the writer) and `metrics` (series and recorders). `worker` adds the worker main's tick
(heartbeat, compaction) and `worker_state` what it reads on that tick; `beat` watches the schedule;
`tick` is the thread for where no timer ticks; `host` is what worker and beat may use of the
instrumentation. Nothing here imports the exporter (server/), the probes or the mixin.
"""
