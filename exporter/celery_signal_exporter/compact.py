"""Compaction: fold dead processes' counter, histogram and gauge files into archives.

Why: with ``--max-tasks-per-child`` every recycled child leaves files behind,
and a scrape that reads thousands of files takes seconds. Compaction keeps the
directory at one archive per kind plus the files of live processes.

Who and when: the worker main process, on its heartbeat tick (and anyone
calling `compact()`, e.g. ``python -m celery_signal_exporter.compact DIR``). A file is dead
when its writer's lock (see directory.py) is free, so compaction never needs to
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

Dead writers' live-gauge files are reaped first, in their own pass under the
same lock (``reap``). A run still counted in ``celery_task_in_progress`` when
its process died started and never finished: the reaper writes it as a
``celery_task_failed_total{exception="WorkerLostError"}`` counter file under a
name derived from the live file (made whole under a temporary name, fsynced,
linked into place), and only then unlinks the live file. A crash in between
leaves both; the next reaper finds the counter file under the same name and
does not write it again, and the counter file is never staged before its live
file is gone, so every lost run is counted once, by whoever reaps it, whatever
the pool and whether or not Celery requeues the message.

A tick costs what the worker's own files cost, not what the directory holds:
the listing is re-read only when the directory's mtime changed (or changed
too recently to be trusted), and a file judged foreign or damaged is not
opened again while its name keeps its inode, for `VERDICT_TTL` seconds at
most. That memory is rebuilt from each new listing, so it never outgrows the
directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from celery_signal_exporter.catalogue import COMPACTED, FAILED, IN_PROGRESS
from celery_signal_exporter.directory import (
    MAGIC,
    MERGE_RULES,
    archive_generation,
    archive_name,
    claim_if_dead,
    dead_by_pid,
    directory_lock,
    encode_entries,
    generation_tag,
    is_lost_runs,
    is_ours,
    is_tmp,
    kind_of,
    live_file_id,
    live_file_pid,
    lost_runs_file,
    needs_a_look,
    open_to_read,
    read_entries,
    read_generation,
    read_prefix,
    read_used,
    same_file,
    series_key,
    staging_dirs,
    staging_name,
    tmp_file,
    used_size,
)

log = logging.getLogger("celery_signal_exporter")

#: Seconds a verdict that a file is foreign or damaged is trusted before the file is opened again.
#: Without a bound, a file a process later adopts in place (store.open_owned tags an untagged file
#: under its own name; the directory's mtime does not change) would never be compacted.
VERDICT_TTL = 1800.0
#: A listing taken less than this long after the directory's mtime is not trusted: mtimes have
#: coarse granularity, and a change within the same clock tick as the listing would not show.
LISTING_SETTLE_NS = 2_000_000_000
LOST_EXCEPTION = "WorkerLostError"

Entries = dict[str, tuple[float, float]]
COMPACTED_KEY = series_key(COMPACTED.name, COMPACTED.name + "_total", {}, COMPACTED.help)


#: How far ahead of our clock a writer's timestamp may be and still count as now: pods on other
#: nodes may run a little ahead. Beyond it, the writer's clock has since been stepped back.
FUTURE_SLACK = 60.0


def merge_into(target: Entries, entries: Iterator[tuple[str, float, float]], rule: str) -> None:
    """Fold one file's entries into `target` by the kind's merge rule.

    For the rules that pick one value, a value stamped in our future (a
    clock since stepped back) loses to any other, so an archive never keeps a
    series frozen at a time that has not come yet.
    """
    horizon = time.time() + FUTURE_SLACK
    for key, value, stamp in entries:
        old = target.get(key)
        if old is None:
            target[key] = (value, stamp)
        elif rule == "sum":
            target[key] = (old[0] + value, 0.0)
        elif (old[1] > horizon) != (stamp > horizon):
            if stamp <= horizon:
                target[key] = (value, stamp)
        elif rule == "max":
            target[key] = (max(old[0], value), max(old[1], stamp))
        elif rule == "min":
            target[key] = (min(old[0], value), max(old[1], stamp))
        elif stamp > old[1]:  # mostrecent
            target[key] = (value, stamp)


@dataclass
class CompactResult:
    """What one compaction did, for logs, tests and benchmarks."""

    busy: bool = False  # another compactor held the lock; nothing done
    absorbed: int = 0  # dead processes' files folded into archives this time (not the reaper's own)
    live: int = 0  # files skipped because their writer is alive
    remaining: int = 0  # dead files left for the next call (over max_files)
    reaped: int = 0  # live-gauge files of dead writers, removed
    lost_runs: int = 0  # runs found in progress in reaped files, counted as WorkerLostError
    opened: int = 0  # files opened to be judged: what a tick costs, whatever else the directory holds
    relisted: bool = False  # the directory was listed again (it changed, or the last listing was too fresh)
    damaged: list[str] = field(default_factory=list)  # unreadable files, left where they are
    errors: list[str] = field(default_factory=list)  # archives that could not be read or written
    reap_errors: list[str] = field(default_factory=list)  # dead live files left for the next tick, and why


class _View:
    """What this process knows about one directory between ticks, so that a tick re-reads only
    what may have changed. Used only under the directory's exclusive lock.

    `work` holds the names a tick must judge every time (live writers' files, dead ones not yet
    compacted, temporary files); `verdicts` the names judged foreign or damaged, with the inode
    judged, left unopened until their deadline. Both are rebuilt from each new listing.
    """

    def __init__(self) -> None:
        self.stamp: tuple[int, int, int] | None = None
        self.trusted = False
        self.staging: dict[int, str] = {}
        self.work: dict[str, int] = {}  # name -> inode as listed
        self.verdicts: dict[str, tuple[int, float]] = {}  # name -> (inode, monotonic time to look again)
        self.ignored: set[str] = set()  # names no tick looks at, whatever their inode
        self.next_look = math.inf

    def refresh(self, directory: str) -> bool:
        """Re-list if the directory changed; put back verdicts that are due. True if re-listed."""
        st = os.stat(directory)
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns)
        now = time.monotonic()
        if stamp == self.stamp and self.trusted:
            if now >= self.next_look:
                self._requeue(now)
            return False
        listed = {entry.name: entry.inode() for entry in os.scandir(directory)}
        self.stamp = stamp
        self.trusted = time.time_ns() - st.st_mtime_ns >= LISTING_SETTLE_NS
        verdicts: dict[str, tuple[int, float]] = {}
        work: dict[str, int] = {}
        ignored: set[str] = set()
        for name in sorted(listed):
            inode = listed[name]
            if name in self.ignored:
                ignored.add(name)
                continue
            known = self.verdicts.get(name)
            if known is not None and known[0] == inode and known[1] > now:
                verdicts[name] = known
            elif needs_a_look(name):
                work[name] = inode
            else:
                ignored.add(name)
        self.verdicts, self.work, self.ignored = verdicts, work, ignored
        self.staging = staging_dirs(ignored)  # no compactor's name: never looked at, never judged
        self.next_look = min((t for _, t in verdicts.values()), default=math.inf)
        return True

    def _requeue(self, now: float) -> None:
        due = [name for name, (_, t) in self.verdicts.items() if t <= now]
        for name in due:
            self.work[name] = self.verdicts.pop(name)[0]
        self.next_look = min((t for _, t in self.verdicts.values()), default=math.inf)

    def judged(self, name: str, inode: int, look_again_in: float) -> None:
        """Not to be opened again for `look_again_in` seconds while `name` keeps `inode`."""
        self.work.pop(name, None)
        when = time.monotonic() + look_again_in
        self.verdicts[name] = (inode, when)
        self.next_look = min(self.next_look, when)

    def gone(self, name: str) -> None:
        self.work.pop(name, None)


#: directory -> its view; one per directory this process compacts (normally one).
_views: dict[str, _View] = {}

#: archive path -> (its stat identity, generation, entries): the archive as this process last
#: read or wrote it, so a compaction tick does not parse megabytes it already knows.
_archive_cache: dict[str, tuple[tuple[int, int, int, int], int, Entries]] = {}


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _load_archive(path: str, rule: str) -> tuple[int, Entries]:
    """(generation, a private copy of the entries); (0, {}) if there is no archive yet."""
    try:
        ident = _identity(path)
    except FileNotFoundError:
        return 0, {}
    cached = _archive_cache.get(path)
    if cached is not None and cached[0] == ident:
        return cached[1], dict(cached[2])
    data, used = read_used(path)
    entries: Entries = {}
    merge_into(entries, read_entries(data, used), rule)
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
    tmp = os.path.join(directory, tmp_file(archive_name(kind)))
    _write_durably(tmp, encode_entries([(k, v, t) for k, (v, t) in entries.items()], generation_tag(generation)))
    os.rename(tmp, path)


def _write_durably(tmp: str, data: bytes) -> None:
    """`data` into a new file `tmp`, on disk before the caller links or renames it into place.

    Space is taken first (ENOSPC here, before anything in place is touched); on any failure the
    temporary file is removed.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, len(data))
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)


@contextmanager
def _tending(directory: str) -> Iterator[tuple[CompactResult, _View | None]]:
    """The prologue `reap()` and `compact()` share: the exclusive lock, and this process's view of
    the directory brought up to date. The view is None when another compactor holds the lock."""
    result = CompactResult()
    with directory_lock(directory, exclusive=True) as held:
        if not held:
            result.busy = True
            yield result, None
            return
        view = _views.setdefault(directory, _View())
        result.relisted = view.refresh(directory)
        yield result, view


def reap(directory: str, by_pid: bool = False) -> CompactResult:
    """Only the reaping pass of `compact()`, under the same lock: for the worker's start."""
    with _tending(directory) as (result, view):
        if view is not None:
            _reap_pass(directory, view, result, by_pid)
    return result


def compact(directory: str, max_files: int = 5000, by_pid: bool = False) -> CompactResult:
    """Reap dead writers' live gauges, then fold dead writers' files into the archives.

    Safe to call from anywhere, any time. Bounded work: at most `max_files`
    dead files are absorbed per call. `by_pid`: also remove live-gauge files
    without our tag whose pid is dead; only a worker main may ask for that,
    since a pid means something in its own pid namespace only.
    """
    with _tending(directory) as (result, view):
        if view is None:
            return result
        # Live gauges first, in a pass of their own: no lost-run file is staged while its live file exists.
        _reap_pass(directory, view, result, by_pid)
        _fold_dead(directory, view, result, max_files)
    return result


def _fold_dead(directory: str, view: _View, result: CompactResult, max_files: int) -> None:
    """Steps 1 to 3 of the module docstring: stage dead files, rewrite the archives, remove what they hold."""
    archives = _Archives(directory, view.staging, result)
    staged = _stage_dead(directory, view, archives, result, max_files)
    unread = _fold_staged(directory, staged, archives, result)
    _remove_absorbed(directory, staged, archives, unread)


class _Archives:
    """One compaction's archives: generations from their headers, contents read only for kinds with work.

    A kind whose archive cannot be read is left alone (its entries are None): never overwritten,
    and nothing is deleted on its word.
    """

    def __init__(self, directory: str, staged: dict[int, str], result: CompactResult) -> None:
        self.directory, self.result = directory, result
        self.generations = {kind: _header_generation(self._path(kind)) for kind in MERGE_RULES}
        self.new = max([0, *self.generations.values(), *staged]) + 1  # this compaction's generation
        self.written: dict[str, int] = {}
        self._entries: dict[str, Entries | None] = {}

    def _path(self, kind: str) -> str:
        return os.path.join(self.directory, archive_name(kind))

    def entries(self, kind: str) -> Entries | None:
        """The archive's entries (a private copy, to add to), read on first use; None if it is damaged."""
        if kind not in self._entries:
            try:
                self.generations[kind], self._entries[kind] = _load_archive(self._path(kind), MERGE_RULES[kind])
            except (OSError, ValueError) as exc:
                self.result.errors.append(f"{archive_name(kind)}: {exc}")
                self._entries[kind] = None
        return self._entries[kind]

    def newer(self, kind: str, generation: int) -> bool:
        """Whether staged files of `generation` are newer than the archive of their kind (so not in it)."""
        return generation > self.written.get(kind, self.generations[kind])

    def write(self, kind: str, entries: Entries) -> None:
        _write_archive(self.directory, kind, entries, self.new)
        _remember_archive(self._path(kind), self.new, entries)
        self.written[kind] = self.new


def _header_generation(path: str) -> int:
    """An archive's generation from its header alone (0 if it has none)."""
    try:
        return read_generation(path)
    except OSError:
        return 0


def _stage_dead(directory: str, view: _View, archives: _Archives, result: CompactResult,
                max_files: int) -> dict[int, str]:
    """Move dead writers' files into a new staging directory; every staging directory, by generation."""
    staged = dict(view.staging)
    stage = os.path.join(directory, staging_name(archives.new))
    moved = 0
    for name in sorted(view.work):
        kind = kind_of(name)
        if kind is not None and _stage_one(directory, name, kind, stage, view, archives, result,
                                           room=moved < max_files):
            moved += 1
    if moved:
        staged[archives.new] = staging_name(archives.new)
        _fsync_dir(stage)
        _fsync_dir(directory)
    return staged


def _stage_one(directory: str, name: str, kind: str, stage: str, view: _View, archives: _Archives,
               result: CompactResult, room: bool) -> bool:
    """Move one file into `stage` if its writer is dead and it is whole; True if moved.

    It is moved still locked, so a new writer with the same pid cannot take it meanwhile.
    """
    path = os.path.join(directory, name)
    try:
        fd = open_to_read(path)
    except FileNotFoundError:
        view.gone(name)
        return False
    except OSError:
        view.judged(name, view.work[name], VERDICT_TTL)  # unreadable: not ours to judge
        return False
    result.opened += 1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not is_ours(os.pread(fd, 8, 0)):
            view.judged(name, st.st_ino, VERDICT_TTL)  # not written by us: its writer holds no lock to judge by
            return False
        if not claim_if_dead(fd):
            result.live += 1
            return False
        if not room:
            result.remaining += 1
            return False
        if archives.entries(kind) is None:
            return False  # its archive is damaged: leave the file where it is, counted by readers
        try:
            list(read_entries(*read_prefix(fd)))
        except (OSError, ValueError) as exc:
            result.damaged.append(f"{name}: {exc}")  # left where it is; the reader counts it
            view.judged(name, st.st_ino, VERDICT_TTL)
            return False
        if not same_file(fd, path):
            return False
        os.makedirs(stage, exist_ok=True)
        os.rename(path, os.path.join(stage, name))
        view.gone(name)
        return True
    except FileNotFoundError:
        view.gone(name)
        return False
    finally:
        os.close(fd)


def _fold_staged(directory: str, staged: dict[int, str], archives: _Archives, result: CompactResult) -> set[str]:
    """Rewrite each archive that has staged files newer than it; the staged files it could not read."""
    pending: dict[str, list[tuple[int, str]]] = {}
    for gen in sorted(staged):
        for name in sorted(os.listdir(os.path.join(directory, staged[gen]))):
            kind = kind_of(name)
            if kind is not None and archives.newer(kind, gen):
                pending.setdefault(kind, []).append((gen, name))
    unread: set[str] = set()
    for kind, files in pending.items():
        _fold_kind(directory, kind, [(gen, os.path.join(staged[gen], name)) for gen, name in files],
                   archives, result, unread)
    if archives.written:
        _fsync_dir(directory)
    return unread


def _fold_kind(directory: str, kind: str, files: list[tuple[int, str]], archives: _Archives,
               result: CompactResult, unread: set[str]) -> None:
    """Add one kind's staged files (generation, path under `directory`) into its archive and write it."""
    entries = archives.entries(kind)
    if entries is None:
        return
    absorbed = processes = 0
    for gen, name in files:
        if not archives.newer(kind, gen):
            continue  # the full read of the archive knows better than its header did
        path = os.path.join(directory, name)
        try:
            merge_into(entries, iter(list(read_entries(*read_used(path)))), MERGE_RULES[kind])  # whole or not at all
        except (OSError, ValueError) as exc:
            unread.add(path)
            result.damaged.append(f"{name}: {exc}")
            continue
        absorbed += 1
        processes += not is_lost_runs(os.path.basename(name))  # a reaper's file is no process
    if not absorbed:
        return
    if kind == "counter" and processes:  # one counter file per process: exact, and atomic with it
        entries[COMPACTED_KEY] = (entries.get(COMPACTED_KEY, (0.0, 0.0))[0] + processes, 0.0)
    try:
        archives.write(kind, entries)
    except OSError as exc:
        result.errors.append(f"{archive_name(kind)}: {exc}")  # staged files stay counted
        return
    result.absorbed += absorbed if kind != "counter" else processes  # processes' files, not the reaper's


def _remove_absorbed(directory: str, staged: dict[int, str], archives: _Archives, unread: set[str]) -> None:
    """Delete what the archives now hold, and staging directories left empty; keep anything they do not."""
    for gen, sname in sorted(staged.items()):
        sdir = os.path.join(directory, sname)
        for name in os.listdir(sdir):
            kind = kind_of(name)
            path = os.path.join(sdir, name)
            # Only what a readable archive of generation >= gen holds; a damaged one holds nothing.
            if kind is not None and path not in unread and archives.entries(kind) is not None \
                    and not archives.newer(kind, gen):
                os.unlink(path)
        try:
            os.rmdir(sdir)
        except OSError:
            pass  # something not absorbed is left in it


def _reap_pass(directory: str, view: _View, result: CompactResult, by_pid: bool) -> None:
    """Remove dead writers' live-gauge files (their lost runs counted first) and abandoned temporary files."""
    for name in sorted(view.work):
        if is_tmp(name):
            look_again = _remove_abandoned_tmp(os.path.join(directory, name))
            if look_again is None:
                view.gone(name)
            else:
                view.judged(name, view.work[name], look_again)
            result.opened += 1
            continue
        file_id = live_file_id(name)
        if file_id is None:
            continue
        verdict = _reap_live(directory, name, file_id, by_pid, result)
        if isinstance(verdict, tuple):  # reaped; the counter file of its lost runs, if any, is staged next
            result.reaped += 1
            view.gone(name)
            if verdict[0]:
                view.work[verdict[0]] = verdict[1]
        elif verdict == "gone":
            view.gone(name)
        elif isinstance(verdict, int):  # foreign or damaged: the inode judged
            view.judged(name, verdict, VERDICT_TTL)


def _reap_live(directory: str, name: str, file_id: str, by_pid: bool,
               result: CompactResult) -> str | int | tuple[str, int]:
    """Judge one live-gauge file: 'alive', 'gone', the inode of a foreign or damaged file, or, once
    reaped, (the name of the counter file its lost runs went to, or "", that file's inode).

    A file with our tag is dead when its writer's lock is free; one without,
    when `by_pid` and the pid in its name is dead. A damaged file is never
    removed: its values cannot be read, so its lost runs could not be counted.
    """
    path = os.path.join(directory, name)
    try:
        fd = open_to_read(path)
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "alive"  # unreadable now (permissions?): tried again next tick
    result.opened += 1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return st.st_ino
        head = os.pread(fd, 8, 0)
        if not is_ours(head):
            return _reap_untagged(path, st, head, by_pid)
        if not claim_if_dead(fd):
            return "alive"  # its writer holds the lock (or this filesystem has no flock: taken for alive)
        if not same_file(fd, path):
            return "gone"  # replaced since it was opened: the new one is judged next tick
        try:
            lost = _lost_runs(*read_prefix(fd))  # read through the locked descriptor: the file judged dead
        except (OSError, ValueError) as exc:
            result.damaged.append(f"{name}: {exc}")
            return st.st_ino
        counted = _count_lost_runs(directory, name, lost_runs_file(file_id, st.st_ino, st.st_mtime_ns), lost,
                                   result) if lost else ""
        if counted is None:
            return "alive"  # the live file stays, so its runs are counted (once) on a later tick
        return _unlink_reaped(path, counted, lost, result)
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "alive"
    finally:
        os.close(fd)


def _count_lost_runs(directory: str, name: str, counter_name: str, lost: dict[str, float],
                     result: CompactResult) -> str | None:
    """Write a dead live file's lost runs as the counter file `counter_name`; its path, or None if not written."""
    counted = os.path.join(directory, counter_name)
    try:
        _write_lost_runs(directory, counted, lost)
    except OSError as exc:
        result.reap_errors.append(f"{name}: lost runs not written: {exc}")
        return None
    result.lost_runs += int(sum(lost.values()))
    return counted


def _unlink_reaped(path: str, counted: str, lost: dict[str, float], result: CompactResult) -> str | tuple[str, int]:
    """Remove a dead live file whose lost runs are in `counted` (if any): the reap's last step."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        # The live file must go before its counter file may be compacted: undo, retry next tick.
        if counted:
            try:
                os.unlink(counted)
                result.lost_runs -= int(sum(lost.values()))
            except OSError:
                pass
        result.reap_errors.append(f"{os.path.basename(path)}: not removed: {exc}")
        return "alive"
    if not counted:
        return ("", 0)
    try:
        return (os.path.basename(counted), os.stat(counted).st_ino)
    except OSError:
        return ("", 0)


def _reap_untagged(path: str, st: os.stat_result, head: bytes, by_pid: bool) -> str | int | tuple[str, int]:
    """A live file without our tag (prometheus-client's, or an old version's): by its pid, or not at all.

    Its in-progress runs are not counted: a writer without our tag is not ours, or
    is an older version of us that counted its lost runs itself.
    """
    if len(head) < 8 or not 8 <= used_size(head) <= st.st_size:
        return st.st_ino  # damaged: never removed
    pid = live_file_pid(os.path.basename(path))
    if not by_pid or pid is None:
        return st.st_ino  # nobody here can judge it
    if not dead_by_pid(pid):
        return "alive"
    try:
        os.unlink(path)
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "alive"
    return ("", 0)


_IN_PROGRESS_JSON = json.dumps(IN_PROGRESS.name)


def _lost_runs(data: bytes, used: int) -> dict[str, float]:
    """The WorkerLostError counter entries for the runs a dead writer's live file still shows in progress."""
    lost: dict[str, float] = {}
    for key, value, _ in read_entries(data, used):
        if value <= 0 or not key.startswith("[" + _IN_PROGRESS_JSON):
            continue
        metric, _sample, labels, _help = json.loads(key)
        if metric != IN_PROGRESS.name or not isinstance(labels, dict):
            continue
        failed = series_key(FAILED.name, FAILED.name + "_total", {
            "name": str(labels.get("name", "")), "queue_name": str(labels.get("queue_name", "")),
            "exception": LOST_EXCEPTION}, FAILED.help)
        lost[failed] = lost.get(failed, 0.0) + round(value)
    return {k: v for k, v in lost.items() if v > 0}


def _write_lost_runs(directory: str, path: str, lost: dict[str, float]) -> None:
    """A dead counter file holding `lost`, made whole and durable before it appears under `path`.

    If `path` exists, an earlier reaper wrote it and died before removing the
    live file: it already counts these runs, and is not written again.
    """
    if os.path.lexists(path):
        return
    tmp = os.path.join(directory, tmp_file(os.path.basename(path)))
    _write_durably(tmp, encode_entries([(k, v, 0.0) for k, v in sorted(lost.items())], MAGIC))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    _fsync_dir(directory)  # the counter file is on disk before the live file goes


def _remove_abandoned_tmp(path: str, min_age: float = 60.0) -> float | None:
    """A writer's or compactor's temporary file whose creator died before renaming it.

    Only old ones: a writer creates its file before it locks it, and a young
    unlocked file may be one being made right now. Returns None once the file
    is gone, else the seconds until it is worth looking at again.
    """
    try:
        fd = open_to_read(path)
    except FileNotFoundError:
        return None
    except OSError:
        return VERDICT_TTL
    try:
        age = time.time() - os.fstat(fd).st_mtime
        if age < min_age:
            return max(1.0, min_age - age + 1.0)
        if not claim_if_dead(fd):
            return min_age  # its maker still holds it
        os.unlink(path)
        return None
    except FileNotFoundError:
        return None
    except OSError:
        return min_age
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """``python -m celery_signal_exporter.compact DIR``: compact once and print what was done."""
    if len(argv) != 1:
        print("usage: python -m celery_signal_exporter.compact METRICS_DIR", file=sys.stderr)
        return 2
    result = compact(argv[0], max_files=1 << 30)
    print(f"absorbed={result.absorbed} live={result.live} busy={result.busy} errors={len(result.errors)}")
    for error in result.errors:
        print(error, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
