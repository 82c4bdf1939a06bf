"""Compaction: fold dead processes' counter, histogram and gauge files into archives.

Why: with ``--max-tasks-per-child`` every recycled child leaves files behind,
and a scrape that reads thousands of files takes seconds. Compaction keeps the
directory at one archive per kind plus the files of live processes.

Who and when: the worker main process, on its heartbeat tick (and anyone
calling `compact()`, e.g. ``python -m exporter.compact DIR``). A file is dead
when its writer's lock (see store.py) is free, so compaction never needs to
see the writer's pid and is not fooled by pid reuse.

Atomicity, without counting anything twice or losing it on a crash:

1. Under ``.compact.lock`` (flock, exclusive: one compactor at a time; the
   exporter's reader takes it shared), each dead file is moved into a staging
   directory ``.compact-<N>``, N being one more than any generation so far.
2. For each kind, the archive (``counter_archive.db``, ``histogram_archive.db``,
   ``gauge_max_archive.db``, ...) is rewritten with the staged files added in:
   written to a temporary file, fsynced, renamed over the old archive. Its
   header records generation N in the four bytes prometheus-client leaves
   unused.
3. Staged files of generations up to the archive's are deleted.

A reader counts a staged file only if its staging generation is newer than
its kind's archive, so a crash after 1 counts it once from staging, a crash
after 2 counts it once from the archive, and the next compaction finishes the
job. A full disk fails step 2, leaves the staged files counted where they are,
and is retried on the next tick.

Archives are in prometheus-client's file format under names its stock
MultiProcessCollector accepts (``<kind>_archive.db``: the part after the kind
is only a pid label for mode ``all`` gauges, which are never archived). The
stock collector does not look into staging directories, so between steps 1
and 2 it reads a little low; our collector does not.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .metrics import COMPACTED
from .store import MAGIC, encode_entries, read_entries, series_key

log = logging.getLogger("celery_signal_exporter")

LOCK_NAME = ".compact.lock"
STAGING_PREFIX = ".compact-"
ARCHIVE_SUFFIX = "_archive.db"
#: Kinds whose values outlive their process, and how two values merge.
MERGE_RULES: dict[str, str] = {
    "counter": "sum", "histogram": "sum", "gauge_sum": "sum",
    "gauge_max": "max", "gauge_min": "min", "gauge_mostrecent": "mostrecent",
}
_SOURCE = re.compile(r"^(counter|histogram|gauge_sum|gauge_max|gauge_min|gauge_mostrecent)_([0-9][0-9-]*)\.db$")
_STAGING = re.compile(r"^\.compact-(\d+)$")
_TMP = re.compile(r"^\..+\.tmp$")
_LIVE = re.compile(r"^gauge_live[a-z]+_[0-9][0-9-]*\.db$")
_GEN = struct.Struct("<I")

Entries = dict[str, tuple[float, float]]
COMPACTED_KEY = series_key(COMPACTED.name, COMPACTED.name + "_total", {}, COMPACTED.help)


def kind_of(filename: str) -> str | None:
    """'counter_123.db' -> 'counter'; None for archives, live gauges and foreign files."""
    match = _SOURCE.match(filename)
    return match.group(1) if match else None


def archive_name(kind: str) -> str:
    return kind + ARCHIVE_SUFFIX


def archive_generation(data: bytes) -> int:
    """The compaction generation recorded in an archive's header."""
    return int(_GEN.unpack_from(data, 4)[0]) if len(data) >= 8 else 0


def staging_dirs(names: list[str]) -> dict[int, str]:
    """Staging generation -> directory name, from a directory listing."""
    out: dict[int, str] = {}
    for name in names:
        match = _STAGING.match(name)
        if match:
            out[int(match.group(1))] = name
    return out


def merge_into(target: Entries, entries: Iterator[tuple[str, float, float]], rule: str) -> None:
    """Fold one file's entries into `target` by the kind's merge rule."""
    for key, value, stamp in entries:
        old = target.get(key)
        if old is None:
            target[key] = (value, stamp)
        elif rule == "sum":
            target[key] = (old[0] + value, 0.0)
        elif rule == "max":
            target[key] = (max(old[0], value), max(old[1], stamp))
        elif rule == "min":
            target[key] = (min(old[0], value), max(old[1], stamp))
        elif stamp > old[1]:  # mostrecent
            target[key] = (value, stamp)


def _read(path: str) -> bytes:
    """The used part of a file; O_NONBLOCK so that a FIFO in a file's place cannot hang us."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, 4096)
        if len(data) >= 4:
            used = int.from_bytes(data[:4], "little", signed=True)
            while 0 < len(data) < used:
                more = os.read(fd, used - len(data))
                if not more:
                    break
                data += more
    finally:
        os.close(fd)
    return data


@contextmanager
def directory_lock(directory: str, exclusive: bool, wait: float = 0.0) -> Iterator[bool]:
    """Hold ``.compact.lock``; yields False if it could not be had in `wait` seconds.

    The reader takes it shared so that it never sees half a compaction; a
    read-only mount or a directory no compactor has used yet has no lock
    file, and then yields True with nothing held (nothing to be consistent with).
    """
    path = os.path.join(directory, LOCK_NAME)
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


@dataclass
class CompactResult:
    """What one compaction did, for logs, tests and benchmarks."""

    busy: bool = False  # another compactor held the lock; nothing done
    absorbed: int = 0  # dead files folded into archives this time
    live: int = 0  # files skipped because their writer is alive
    remaining: int = 0  # dead files left for the next call (over max_files)
    reaped: int = 0  # live-gauge files of dead writers, removed
    damaged: list[str] = field(default_factory=list)  # unreadable files, left where they are
    errors: list[str] = field(default_factory=list)  # archives that could not be read or written


#: archive path -> (its stat identity, generation, entries): the archive as this process last
#: read or wrote it, so a compaction tick does not parse megabytes it already knows.
_archive_cache: dict[str, tuple[tuple[int, int, int, int], int, Entries]] = {}


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _header_generation(path: str) -> int:
    """An archive's generation from its header alone (0 if it has none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        return archive_generation(os.pread(fd, 8, 0))
    except OSError:
        return 0
    finally:
        os.close(fd)


def _load_archive(path: str, rule: str) -> tuple[int, Entries]:
    """(generation, a private copy of the entries); (0, {}) if there is no archive yet."""
    try:
        ident = _identity(path)
    except FileNotFoundError:
        return 0, {}
    cached = _archive_cache.get(path)
    if cached is not None and cached[0] == ident:
        return cached[1], dict(cached[2])
    data = _read(path)
    entries: Entries = {}
    merge_into(entries, read_entries(data), rule)
    generation = archive_generation(data)
    _archive_cache[path] = (ident, generation, entries)
    return generation, dict(entries)


def _remember_archive(path: str, generation: int, entries: Entries) -> None:
    try:
        _archive_cache[path] = (_identity(path), generation, entries)
    except OSError:
        _archive_cache.pop(path, None)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_archive(directory: str, kind: str, entries: Entries, generation: int) -> None:
    path = os.path.join(directory, archive_name(kind))
    tmp = os.path.join(directory, f".{archive_name(kind)}.{os.getpid()}.tmp")
    data = encode_entries([(k, v, t) for k, (v, t) in entries.items()], _GEN.pack(generation))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, len(data))  # ENOSPC here, before the old archive is touched
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)


def compact(directory: str, max_files: int = 5000, _crash_after: str = "") -> CompactResult:
    """Fold the files of dead writers into the archives. Safe to call from anywhere, any time.

    Bounded work: at most `max_files` dead files are absorbed per call.
    `_crash_after` ("stage" or "archive") is for tests: stop as a crash would.
    """
    result = CompactResult()
    with directory_lock(directory, exclusive=True) as held:
        if not held:
            result.busy = True
            return result
        names = os.listdir(directory)
        generations = {kind: _header_generation(os.path.join(directory, archive_name(kind))) for kind in MERGE_RULES}
        archives: dict[str, Entries | None] = {}  # read only for kinds with work to do; None: damaged

        def archive(kind: str) -> Entries | None:
            if kind not in archives:
                try:
                    generations[kind], archives[kind] = _load_archive(
                        os.path.join(directory, archive_name(kind)), MERGE_RULES[kind])
                except (OSError, ValueError) as exc:
                    result.errors.append(f"{archive_name(kind)}: {exc}")  # never overwritten: kind left alone
                    archives[kind] = None
            return archives[kind]

        staged = staging_dirs(names)
        new_gen = max([0, *generations.values(), *staged]) + 1

        # 1. Move dead writers' files into the new staging directory.
        stage = os.path.join(directory, f"{STAGING_PREFIX}{new_gen}")
        moved = 0
        for name in sorted(names):
            if _TMP.match(name):
                _remove_abandoned_tmp(os.path.join(directory, name))
                continue
            source_kind = kind_of(name)
            if source_kind is None and _LIVE.match(name):
                result.reaped += _reap_live(os.path.join(directory, name))
                continue
            if source_kind is None:
                continue
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode) or os.pread(fd, 8, 0)[4:8] != MAGIC:
                    continue  # not written by us: its writer holds no lock to judge by
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # held by its live writer (or no flock here: then never judged dead)
                    result.live += 1
                    continue
                if moved >= max_files:
                    result.remaining += 1
                    continue
                if archive(source_kind) is None:
                    continue  # its archive is damaged: leave the file where it is, counted by readers
                try:
                    list(read_entries(_read(path)))
                except (OSError, ValueError) as exc:
                    result.damaged.append(f"{name}: {exc}")  # left where it is; the reader counts it
                    continue
                st, now = os.fstat(fd), os.stat(path)
                if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                    continue
                if moved == 0:
                    os.makedirs(stage, exist_ok=True)
                    staged[new_gen] = os.path.basename(stage)
                os.rename(path, os.path.join(stage, name))  # still locked: no writer can take it now
                moved += 1
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)
        if moved:
            _fsync_dir(stage)
            _fsync_dir(directory)
        if _crash_after == "stage":
            return result

        # 2. Rewrite each archive that has staged files newer than it.
        written: dict[str, int] = {}
        damaged: set[str] = set()
        pending: dict[str, list[tuple[int, str]]] = {}
        for gen in sorted(staged):
            for name in sorted(os.listdir(os.path.join(directory, staged[gen]))):
                staged_kind = kind_of(name)
                if staged_kind is not None and gen > generations[staged_kind]:
                    pending.setdefault(staged_kind, []).append((gen, name))
        for kind, files in pending.items():
            entries = archive(kind)
            if entries is None:
                continue
            absorbed = 0
            for gen, name in files:
                if gen <= generations[kind]:
                    continue  # the full read of the archive knows better than its header did
                path = os.path.join(directory, staged[gen], name)
                try:
                    merge_into(entries, read_entries(_read(path)), MERGE_RULES[kind])
                    absorbed += 1
                except (OSError, ValueError) as exc:
                    damaged.add(path)
                    result.damaged.append(f"{staged[gen]}/{name}: {exc}")
            if not absorbed:
                continue
            if kind == "counter":  # one counter file per process: the count is exact, and atomic with it
                entries[COMPACTED_KEY] = (entries.get(COMPACTED_KEY, (0.0, 0.0))[0] + absorbed, 0.0)
            try:
                _write_archive(directory, kind, entries, new_gen)
                _remember_archive(os.path.join(directory, archive_name(kind)), new_gen, entries)
            except OSError as exc:
                result.errors.append(f"{archive_name(kind)}: {exc}")  # staged files stay counted
                continue
            written[kind] = new_gen
            result.absorbed += absorbed
        if written:
            _fsync_dir(directory)
        if _crash_after == "archive":
            return result

        # 3. Delete what the archives now hold; keep anything they do not.
        for gen, sname in sorted(staged.items()):
            sdir = os.path.join(directory, sname)
            for name in os.listdir(sdir):
                staged_kind = kind_of(name)
                path = os.path.join(sdir, name)
                # Only what a readable archive of generation >= gen holds; a damaged one holds nothing.
                if staged_kind is not None and path not in damaged and archive(staged_kind) is not None \
                        and gen <= written.get(staged_kind, generations[staged_kind]):
                    os.unlink(path)
            try:
                os.rmdir(sdir)
            except OSError:
                pass  # something not absorbed is left in it
    return result


def _reap_live(path: str) -> int:
    """Remove a live-gauge file whose writer is dead: its values speak for nobody. 1 if removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.pread(fd, 8, 0)[4:8] != MAGIC:
            return 0
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st, now = os.fstat(fd), os.stat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            return 0
        os.unlink(path)
        return 1
    except OSError:  # BlockingIOError: alive; FileNotFoundError: gone already
        return 0
    finally:
        os.close(fd)


def _remove_abandoned_tmp(path: str, min_age: float = 60.0) -> None:
    """A writer's or compactor's temporary file whose creator died before renaming it.

    Only old ones: a writer creates its file before it locks it, and a young
    unlocked file may be one being made right now.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if time.time() - os.fstat(fd).st_mtime < min_age:
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """``python -m exporter.compact DIR``: compact once and print what was done."""
    if len(argv) != 1:
        print("usage: python -m exporter.compact METRICS_DIR", file=sys.stderr)
        return 2
    result = compact(argv[0], max_files=1 << 30)
    print(f"absorbed={result.absorbed} live={result.live} busy={result.busy} errors={len(result.errors)}")
    for error in result.errors:
        print(error, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
