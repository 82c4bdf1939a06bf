"""The metrics directory's name grammar: every name one rule builds, the others parse as meant."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from celery_signal_exporter import directory as d
from celery_signal_exporter.recording.store import Store

KINDS = [*d.ARCHIVED_KINDS, "gauge_livesum", "gauge_livemostrecent", "gauge_all"]


@pytest.mark.parametrize("prefix", KINDS)
@pytest.mark.parametrize("n", [0, 1, 7])
def test_a_writer_s_file_name_parses_back(prefix: str, n: int) -> None:
    name = d.writer_file(prefix, 4242, n)
    kind, mode, file_id = d.parse_name(name) or ("", "", "")
    assert (f"{kind}_{mode}" if mode else kind) == prefix
    assert file_id == ("4242" if n == 0 else f"4242-{n}")
    assert d.kind_of(name) == (prefix if prefix in d.ARCHIVED_KINDS else None)
    assert d.live_file_id(name) == (file_id if d.is_live_kind(prefix) else None)
    assert d.live_file_pid(name) == (4242 if d.is_live_kind(prefix) else None)
    assert d.needs_a_look(name) == (prefix in d.ARCHIVED_KINDS or d.is_live_kind(prefix))
    assert not d.is_lost_runs(name) and not d.is_tmp(name) and d.archive_kind(name) is None


def test_the_compactor_s_names_are_never_taken_for_a_writer_s() -> None:
    lost = d.lost_runs_file("12-1", 99, 123456789)
    assert d.is_lost_runs(lost) and d.kind_of(lost) == "counter", "folded into the counter archive"
    assert not any(d.is_lost_runs(d.writer_file("counter", 12, n)) for n in range(5))
    for kind in d.ARCHIVED_KINDS:
        archive = d.archive_name(kind)
        assert d.archive_kind(archive) == kind and d.kind_of(archive) is None and not d.needs_a_look(archive)
    tmp = d.tmp_file(d.archive_name("counter"))
    assert d.is_tmp(tmp) and d.needs_a_look(tmp) and d.parse_name(tmp) is None and d.kind_of(tmp) is None
    assert d.staging_dirs([d.staging_name(3), d.staging_name(12), d.LOCK_NAME, "junk"]) == \
        {3: ".compact-3", 12: ".compact-12"}
    assert not d.needs_a_look(d.staging_name(3)) and not d.needs_a_look(d.LOCK_NAME)


def test_a_file_s_used_part_is_read_as_its_writer_left_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    f = store.file("counter")
    f.add(f.slot("k"), 2.0)
    data, used = d.read_used(f.path)
    assert d.is_ours(data) and used == d.used_size(data) and used < os.path.getsize(f.path)
    assert list(d.read_entries(data, used)) == [("k", 2.0, 0.0)]
    fd = d.open_to_read(f.path)
    try:
        assert d.held_by_a_live_writer(fd) and not d.claim_if_dead(fd), "our own writer holds it"
    finally:
        os.close(fd)
    store.close()
    fd = d.open_to_read(f.path)
    try:
        assert not d.held_by_a_live_writer(fd) and d.claim_if_dead(fd), "its writer closed it"
    finally:
        os.close(fd)
