"""The exporter process: merge the metrics directory, probe the brokers, serve /metrics.

`collect` merges the directory's files, `exposition` writes the text, `service` and `_http` answer
HTTP (`webconfig`: TLS and basic auth), `probe_loop` runs the broker probes off the request path and
`serving` wires them together for `celery-signal-exporter serve`. Nothing here imports Celery's
receivers (recording/) or the mixin.
"""
