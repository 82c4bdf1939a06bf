"""The metrics directory's contract: the one place its rules are written down.

- **Names.** A writer's file is ``<kind>_<id>.db``: kind ``counter``, ``histogram``,
  ``summary`` or ``gauge_<mode>``; id the writer's pid, or ``<pid>-<n>`` when a live process
  in another pid namespace holds the plain name. ``<kind>_archive.db`` is an archive,
  ``.compact-<N>/`` a staging directory of generation N, ``counter_<id>-<inode>-<mtime_ns>.db``
  a reaper's file of lost runs (two dashes or more: no writer makes one), and
  ``.<name>.<pid>.<thread>.tmp`` a file being made whole before it is linked into place.
- **Contents.** Bytes 0-4 hold the used size (int32, little-endian); bytes 4-8 hold `MAGIC` in
  our writers' files and the compaction generation in an archive. Entries follow, up to the
  used size. A reader trusts the used size it read first: a writer fills an entry before it
  raises the used size, so that prefix is complete.
- **Liveness.** A writer holds an exclusive flock on its file for as long as it lives; a free
  lock means a dead writer, seen from any container, with no pid to reuse. Files without
  `MAGIC` are judged by nobody, except live gauges by the pid in their name, and only by a
  worker main (a pid means something in its own pid namespace only).
- **Compaction.** Compactors take ``.compact.lock`` exclusive, readers shared. A dead
  writer's live gauges are removed (its runs in progress counted lost first); its other files
  move into staging, then fold into their kind's archive by `MERGE_RULES`. A staged file
  counts only while its generation is newer than its kind's archive.

store.py writes by these rules, collect.py reads by them, compact.py and worker.py judge and
move files by them; none of them spells a rule out again.
"""

from __future__ import annotations

import fcntl
import json
import math
import mmap
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# ---- names ----------------------------------------------------------------------------------

LOCK_NAME = ".compact.lock"
STAGING_PREFIX = ".compact-"
ARCHIVE_SUFFIX = "_archive.db"
#: Kinds whose files outlive their writer and are folded into one archive each (live gauges are
#: not), and how two values of one series merge there.
MERGE_RULES: dict[str, str] = {
    "counter": "sum", "histogram": "sum", "gauge_sum": "sum",
    "gauge_max": "max", "gauge_min": "min", "gauge_mostrecent": "mostrecent",
}
ARCHIVED_KINDS = tuple(MERGE_RULES)
GAUGE_MODES = frozenset({"all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
                         "mostrecent", "livemostrecent"})
_ARCHIVED = "|".join(ARCHIVED_KINDS)
_ID = r"[0-9][0-9-]*"
_SOURCE = re.compile(rf"^({_ARCHIVED})_({_ID})\.db$")
_STAGING = re.compile(rf"^{re.escape(STAGING_PREFIX)}(\d+)$")
_TMP = re.compile(r"^\..+\.tmp$")
_LIVE = re.compile(rf"^gauge_live[a-z]+_({_ID})\.db$")
_LIVE_PID = re.compile(r"^gauge_live[a-z]+_(\d+)(?:-\d+)?\.db$")
_LOST_RUNS = re.compile(r"^counter_[0-9]+(?:-[0-9]+){2,}\.db$")


def writer_file(prefix: str, pid: int, n: int = 0) -> str:
    """The n-th name a process may write kind `prefix` under: ``counter_<pid>.db``, then ``counter_<pid>-<n>.db``."""
    return f"{prefix}_{pid}{'' if n == 0 else f'-{n}'}.db"


def is_live_kind(prefix: str) -> bool:
    """Live gauges: their values mean nothing once their writer is gone."""
    return prefix.startswith("gauge_live")


def tmp_file(name: str) -> str:
    """A temporary name for a new `name`, unique to this thread, that compactors recognise as such."""
    return f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"


def parse_name(filename: str) -> tuple[str, str, str] | None:
    """'gauge_livesum_123.db' -> ('gauge', 'livesum', '123'); None if not a metrics file name.

    Archives parse too ('counter_archive.db' -> ('counter', '', 'archive')): prometheus-client
    takes the text after the kind as a pid.
    """
    if not filename.endswith(".db"):
        return None
    parts = filename[:-3].split("_")
    if parts[0] == "gauge" and len(parts) >= 3 and parts[1] in GAUGE_MODES:
        return "gauge", parts[1], "_".join(parts[2:])
    if parts[0] in ("counter", "histogram", "summary") and len(parts) >= 2:
        return parts[0], "", "_".join(parts[1:])
    return None


def kind_of(filename: str) -> str | None:
    """'counter_123.db' -> 'counter': a dead writer's file compaction may fold; None for anything else."""
    match = _SOURCE.match(filename)
    return match.group(1) if match else None


def archive_name(kind: str) -> str:
    return kind + ARCHIVE_SUFFIX


def archive_kind(filename: str) -> str | None:
    """'counter_archive.db' -> 'counter'; None if not an archive."""
    return filename[: -len(ARCHIVE_SUFFIX)] if filename.endswith(ARCHIVE_SUFFIX) else None


def staging_name(generation: int) -> str:
    return f"{STAGING_PREFIX}{generation}"


def staging_dirs(names: Iterable[str]) -> dict[int, str]:
    """Staging generation -> directory name, from a directory listing."""
    out: dict[int, str] = {}
    for name in names:
        match = _STAGING.match(name)
        if match:
            out[int(match.group(1))] = name
    return out


def lost_runs_file(live_id: str, inode: int, mtime_ns: int) -> str:
    """The counter file of a dead live file's lost runs: the same name for the same file, whoever reaps it."""
    return f"counter_{live_id}-{inode}-{mtime_ns}.db"


def is_lost_runs(filename: str) -> bool:
    return _LOST_RUNS.match(filename) is not None


def is_tmp(filename: str) -> bool:
    return _TMP.match(filename) is not None


def live_file_id(filename: str) -> str | None:
    """'gauge_livesum_12-1.db' -> '12-1'; None if not a live-gauge file."""
    match = _LIVE.match(filename)
    return match.group(1) if match else None


def live_file_pid(filename: str) -> int | None:
    """'gauge_livesum_12-1.db' -> 12: the pid a live-gauge file without our tag is judged by."""
    match = _LIVE_PID.match(filename)
    return int(match.group(1)) if match else None


def needs_a_look(filename: str) -> bool:
    """Whether a compactor has anything to judge under this name (a writer's or temporary file).

    The rest of a listing (archives, staging, the lock, anything foreign) is ignored by name alone.
    """
    return bool(_SOURCE.match(filename) or _LIVE.match(filename) or _TMP.match(filename))


# ---- contents -------------------------------------------------------------------------------

#: Bytes 4-8 of our files' header (prometheus-client leaves them zero).
MAGIC = b"csx\x01"
TAG_OFFSET = 4
HEADER_SIZE = 8
_INT = struct.Struct("<i")
_GEN = struct.Struct("<I")
_TWO_DOUBLES = struct.Struct("<dd")


def used_size(data: bytes | mmap.mmap) -> int:
    """The used size a file's header gives (`data` starts at byte 0)."""
    return int(_INT.unpack_from(data, 0)[0])


def encode_used(used: int) -> bytes:
    return _INT.pack(used)


def new_header(tag: bytes = MAGIC) -> bytes:
    """The header of an empty file: 8 bytes used, then `tag`."""
    return _INT.pack(HEADER_SIZE) + tag


def is_ours(head: bytes) -> bool:
    """Whether a file's first bytes carry our writers' tag (so its writer's lock says whether it lives)."""
    return head[TAG_OFFSET:HEADER_SIZE] == MAGIC


def generation_tag(generation: int) -> bytes:
    """An archive's header tag: its compaction generation."""
    return _GEN.pack(generation)


def archive_generation(data: bytes) -> int:
    """The compaction generation recorded in an archive's header."""
    return int(_GEN.unpack_from(data, TAG_OFFSET)[0]) if len(data) >= HEADER_SIZE else 0


def padded_length(length: int) -> int:
    """A key's length padded so that the value after it (and its 4-byte length) is 8-aligned."""
    return length + (8 - (length + 4) % 8)


def series_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """The mmap key prometheus-client uses for one series of one sample."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def format_le(bound: float) -> str:
    """Bucket bound formatted as prometheus-client formats it (the `le` in a series key)."""
    if bound == math.inf:
        return "+Inf"
    text = repr(float(bound))
    return text[:-2] if text.endswith(".0") else text


def encode_entry(key: str, value: float, timestamp: float) -> bytes:
    encoded = key.encode("utf-8")
    padding = 8 - (len(encoded) + 4) % 8
    return _INT.pack(len(encoded)) + encoded + b" " * padding + _TWO_DOUBLES.pack(value, timestamp)


def walk_entries(data: bytes, used: int | None = None) -> Iterator[tuple[str, int, int]]:
    """Yield (key, encoded key length, offset) of every entry in one file's bytes.

    `used` is the used size the reader settled on; by default the header's.
    A reader of a live file passes the size it read, not the header in the
    bytes: the writer may have appended (and raised the header) between the
    two, and the prefix it read is complete, since a writer fills an entry
    before its header counts it.

    Raises ValueError on anything that is not a well-formed file, so the
    reader can count the file as damaged instead of failing the scrape.
    """
    if len(data) < HEADER_SIZE:
        raise ValueError("shorter than its 8-byte header")
    if used is None:
        used = used_size(data)
    if used < HEADER_SIZE or used > len(data):
        raise ValueError(f"header says {used} bytes used of {len(data)}")
    pos = HEADER_SIZE
    while pos < used:
        if pos + 4 > used:
            raise ValueError("truncated entry length")
        length = _INT.unpack_from(data, pos)[0]
        if length <= 0 or pos + 4 + padded_length(length) + 16 > used:
            raise ValueError("entry runs past the used size")
        yield data[pos + 4 : pos + 4 + length].decode("utf-8"), length, pos
        pos += 4 + padded_length(length) + 16


def read_entries(data: bytes, used: int | None = None) -> Iterator[tuple[str, float, float]]:
    """Yield (key, value, timestamp) from one file's bytes; ValueError on a damaged file."""
    for key, length, pos in walk_entries(data, used):
        value, timestamp = _TWO_DOUBLES.unpack_from(data, pos + 4 + padded_length(length))
        yield key, value, timestamp


def encode_entries(entries: Iterable[tuple[str, float, float]], tag: bytes = b"\0\0\0\0") -> bytes:
    """A whole file's bytes for `entries`; `tag` fills the unused header bytes 4-8."""
    body = tag + b"".join(encode_entry(key, value, timestamp) for key, value, timestamp in entries)
    return _INT.pack(len(body) + 4) + body


def open_to_read(path: str) -> int:
    """O_NONBLOCK: a FIFO in a file's place must not hang us."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def read_prefix(fd: int) -> tuple[bytes, int]:
    """A file's used part and the used size read first, from a descriptor just opened (offset 0).

    Files are preallocated, so only the used part is read; a live one grows
    while we read it, and only the used size read first names a complete prefix.
    """
    data = os.read(fd, 4096)
    used = used_size(data) if len(data) >= 4 else len(data)
    if len(data) == 4096 and used > len(data):
        data = os.pread(fd, used, 0)  # one read, no concatenation: live files run to megabytes
    return data, used


def read_used(path: str) -> tuple[bytes, int]:
    """A regular file's used part and used size, for `read_entries`; ValueError if not a regular file."""
    fd = open_to_read(path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        return read_prefix(fd)
    finally:
        os.close(fd)


def read_generation(path: str) -> int:
    """An archive's generation from its header alone; OSError if it cannot be read."""
    fd = open_to_read(path)
    try:
        return archive_generation(os.pread(fd, HEADER_SIZE, 0))
    finally:
        os.close(fd)


# ---- liveness -------------------------------------------------------------------------------

def lock_as_writer(fd: int) -> None:
    """Take the writer's lock, held for the writer's life; BlockingIOError if another holds it.

    On a filesystem without flock the file is written unlocked, as before
    locks were used: every reader then takes its writer for alive.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:
        pass


def held_by_a_live_writer(fd: int) -> bool:
    """True if another open file description holds the writer's lock on this file.

    Taking the lock and dropping it at once is the test; the caller must not
    keep it (a writer opening the file meanwhile would pick another name).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held; anything else (a filesystem without flock): assume alive
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def claim_if_dead(fd: int) -> bool:
    """Take a dead writer's lock and keep it (until `fd` closes), so no new writer can take the file.

    False if its writer lives (or the filesystem has no flock: then nobody is ever judged dead).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid lives in our pid namespace (a zombie is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def dead_by_pid(pid: int) -> bool:
    """The rule for a live-gauge file without our tag: its writer is dead if the pid in its name is.

    Only a worker main may apply it (a pid means something in its own pid namespace only).
    """
    return pid != os.getpid() and not pid_alive(pid)


def same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd` (not moved, reaped or replaced since)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


# ---- the compaction lock --------------------------------------------------------------------

def lock_path(directory: str) -> str:
    return os.path.join(directory, LOCK_NAME)


@contextmanager
def directory_lock(directory: str, exclusive: bool, wait: float = 0.0) -> Iterator[bool]:
    """Hold ``.compact.lock``; yields False if it could not be had in `wait` seconds.

    The reader takes it shared so that it never sees half a compaction; a
    read-only mount or a directory no compactor has used yet has no lock
    file, and then yields True with nothing held (nothing to be consistent with).
    """
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if exclusive else os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield not exclusive
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.002)
        yield True
    finally:
        os.close(fd)
