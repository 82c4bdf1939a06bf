"""The names we add to Celery's messages and requests, all prefixed `csx_`.

The producer (recording/receivers.py) writes them, the worker and beat read them, and the Redis
probe reads `csx_due` from queued messages without running any of our code: so they are a contract
between processes and releases, written down once here as directory.py is for the metric files.
"""

from __future__ import annotations

#: Message header carrying the UNIX time a task became due: its publish time, or its ETA when it has
#: one, i.e. max(publish time, ETA). Queue wait and the oldest message's age start there.
DUE_HEADER = "csx_due"
#: Added by the worker main process to the request it hands to the pool, so pool processes know the
#: queue the message really came from.
QUEUE_HEADER = "csx_queue"
#: Message header naming the beat schedule entry a run was dispatched for.
ENTRY_HEADER = "csx_entry"
#: Message header holding the UNIX time the entry's next run is due, as beat saw it at dispatch.
NEXT_DUE_HEADER = "csx_next_due"
#: Attribute prerun sets on the request of a beat run: (entry series, next due), for postrun.
BEAT_RUN_ATTR = "csx_beat_run"
