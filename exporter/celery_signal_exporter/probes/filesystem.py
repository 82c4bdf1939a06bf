"""Filesystem probe: queue depth and head age of kombu's filesystem transport.

kombu writes each message as one file, `<monotonic ms>_<uuid>.<queue>.msg`,
into the producer's `data_folder_out`, and a consumer takes the first file
of its queue (by name) from its own `data_folder_in`, moving it away. So
what waits for a worker is the files of a queue in the worker's
`data_folder_in`: one directory listing per cycle counts every queue. The
message's wall-clock write time is its file's mtime (the name's clock is
monotonic, per machine), so the oldest file gives the head's age.

Nothing else is on disk: delivered but unacknowledged messages live in the
worker's memory, and consumers are processes polling a directory.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery_signal_exporter.probes import register
from celery_signal_exporter.probes.base import (
    OLDEST_AGE,
    BrokerSnapshot,
    ProbeError,
    ProbeKind,
    ProbeOptions,
    QueueStats,
)

#: kombu's file name for a message: `<ms>_<uuid4>.<queue>.msg`; the queue is
#: everything after the first dot (a uuid has none), as kombu reads it.
MESSAGE_FILE = re.compile(r"[0-9]+_[0-9a-fA-F-]+\.(?P<queue>.+)\.msg")
#: kombu's defaults, relative to the working directory, as in the transport.
DEFAULT_DATA_FOLDER_IN = "data_in"
DEFAULT_CONTROL_FOLDER = "control"
#: The `vhost` label: kombu's virtual host for a URL without a path.
VHOST = "/"


@dataclass(frozen=True)
class FilesystemSettings:
    """What only this probe reads (ProbeOptions.settings)."""

    #: stat() every message file for the oldest-age metric (`--oldest-age`, shared with the others).
    read_oldest_age: bool = True

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> FilesystemSettings:
        return cls(read_oldest_age=bool(values["oldest_age"]))


def classify(exc: OSError) -> str:
    """A missing folder is a broker that is not there; a denied one, an auth problem."""
    if isinstance(exc, PermissionError):
        return "auth"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "connection"


class FilesystemProbe:
    """Probe for `filesystem://` (the folders come from the transport options, as for kombu)."""

    def __init__(self, url: str, options: ProbeOptions | None = None) -> None:
        opts = options or ProbeOptions()
        transport = opts.transport_options
        if not url.lower().startswith("filesystem://"):
            raise ValueError("the filesystem probe needs a filesystem:// URL")
        self.folder = Path(str(transport.get("data_folder_in") or DEFAULT_DATA_FOLDER_IN))
        self.control_folder = Path(str(transport.get("control_folder") or DEFAULT_CONTROL_FOLDER))
        self.read_oldest_age = opts.settings_for(FilesystemSettings).read_oldest_age

    def discover(self) -> set[str]:
        """Queues bound in kombu's exchange tables (`<control>/<exchange>.exchange`, JSON lists of
        [routing_key, pattern, queue]), so an empty queue reads 0 rather than nothing."""
        found: set[str] = set()
        try:
            tables = [p for p in self.control_folder.iterdir() if p.name.endswith(".exchange")]
        except FileNotFoundError:
            return found  # nothing bound yet
        except OSError as exc:
            raise ProbeError(classify(exc), type(exc).__name__, f"{exc.strerror}: {self.control_folder}") from None
        for table in tables:
            try:
                rows = json.loads(table.read_bytes())
            except (OSError, ValueError):
                continue  # being rewritten, or not kombu's
            if isinstance(rows, list):
                found.update(str(row[2]) for row in rows if isinstance(row, list) and len(row) == 3 and row[2])
        return found

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        """One listing of `data_folder_in`: every queue with files, plus `queues` at 0."""
        counts = dict.fromkeys(queues, 0)
        oldest: dict[str, float] = {}
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    match = MESSAGE_FILE.fullmatch(entry.name)
                    if match is None:
                        continue
                    queue = match.group("queue")
                    if self.read_oldest_age:
                        try:
                            written = entry.stat().st_mtime
                        except FileNotFoundError:
                            continue  # consumed between the listing and the stat
                        if written < oldest.get(queue, written + 1):
                            oldest[queue] = written
                    counts[queue] = counts.get(queue, 0) + 1
        except OSError as exc:
            raise ProbeError(classify(exc), type(exc).__name__, f"{exc.strerror}: {self.folder}") from None
        now = time.time()
        return BrokerSnapshot(queues=[
            QueueStats(
                name=name, vhost=VHOST, length=count,
                oldest_message_age_seconds=max(0.0, now - oldest[name]) if name in oldest else None,
            )
            for name, count in sorted(counts.items())
        ])

    def close(self) -> None:
        """Nothing held open."""


register(ProbeKind(
    name="filesystem",
    schemes=("filesystem",),
    create=FilesystemProbe,
    options=(OLDEST_AGE,),
    settings=FilesystemSettings.from_options,
))
