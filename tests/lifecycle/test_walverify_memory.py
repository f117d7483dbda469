"""wal-verify on the memory backend: gaps along timeline paths, history consistency, deep object checks."""

from __future__ import annotations

from datetime import timedelta

from lifecycle_fakes import (
    OTHER_SYSID,
    SEG,
    SERVER,
    T0,
    drop_from_index,
    lsn,
    make_backup,
    put_history,
    put_segments,
    segment_bytes,
    wal_object,
)

from cloudbk.pg.walnames import HistoryEntry, segment_name
from cloudbk.repo import layout
from cloudbk.repo.catalog import load_catalog
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.storage.memory import MemoryStorage
from cloudbk.wal.verify import CORRUPT, FOREIGN, GAP, HISTORY_PROBLEM, verify_deep, verify_index


def verify(storage: MemoryStorage, deep: bool = False):  # type: ignore[no-untyped-def]
    catalog = load_catalog(storage, SERVER)
    report = verify_index(catalog.index, catalog.backups)
    if deep:
        verify_deep(storage, catalog.index, report, workers=4)
    return report


def two_timelines(storage: MemoryStorage) -> None:
    """tl 1: segments 2..9, switch to tl 2 inside segment 8; tl 2: segments 8..12. Backups on both."""
    put_segments(storage, 1, 2, 9)  # tl 1 went on after the switch point (its 9 is not on tl 2's path)
    put_history(storage, 2, [(1, lsn(8, 0x5000))])
    put_segments(storage, 2, 8, 12)
    make_backup(storage, "20260101T000000Z", 1, 3, 4, T0)
    make_backup(storage, "20260102T000000Z", 2, 10, 10, T0 + timedelta(days=1))


def test_complete_archive_along_a_timeline_switch_is_ok() -> None:
    storage = MemoryStorage()
    two_timelines(storage)
    report = verify(storage, deep=True)
    assert report.ok, report.problems
    required = {t.timeline: t.required for t in report.timelines}
    # tl 1 from the oldest backup's begin (3) to its newest segment; tl 2 from its switch segment (8) on
    assert required == {1: [[3, 9]], 2: [[8, 12]]}
    assert report.objects_checked == 8 + 5 + 1


def test_a_gap_in_the_index_is_reported_with_its_segments() -> None:
    storage = MemoryStorage()
    two_timelines(storage)
    drop_from_index(storage, 1, 5)
    drop_from_index(storage, 1, 6)
    report = verify(storage)
    assert not report.ok
    gaps = [(p.timeline, p.first, p.last) for p in report.problems if p.kind == GAP]
    assert gaps == [(1, 5, 6)]
    assert segment_name(1, 5, SEG) in report.problems[0].message


def test_a_gap_before_the_switch_point_breaks_the_path_to_the_new_timeline() -> None:
    storage = MemoryStorage()
    put_segments(storage, 1, 2, 6)  # tl 1 stops at 6, but tl 2 only starts at 8: 7 is missing on tl 1
    put_history(storage, 2, [(1, lsn(8, 0x5000))])
    put_segments(storage, 2, 8, 10)
    make_backup(storage, "20260101T000000Z", 1, 3, 4, T0)
    report = verify(storage)
    assert [(p.timeline, p.first, p.last) for p in report.problems if p.kind == GAP] == [(1, 7, 7)]


def test_deep_finds_segments_the_index_lists_but_storage_lost() -> None:
    storage = MemoryStorage()
    two_timelines(storage)
    storage.delete(layout.wal_key(SERVER, segment_name(2, 11, SEG)))
    assert verify(storage).ok  # the index alone cannot know
    report = verify(storage, deep=True)
    assert [(p.kind, p.timeline, p.first) for p in report.problems] == [(GAP, 2, 11)]


def test_deep_finds_a_foreign_segment_and_a_corrupt_one() -> None:
    storage = MemoryStorage()
    two_timelines(storage)
    foreign = segment_name(2, 11, SEG)
    key = layout.wal_key(SERVER, foreign)
    storage.put_bytes(key, wal_object(foreign, segment_bytes(2, 11, OTHER_SYSID)))
    corrupt = layout.wal_key(SERVER, segment_name(1, 4, SEG))
    data = bytearray(storage.get_bytes(corrupt))
    data[-20] ^= 0xFF
    storage.put_bytes(corrupt, bytes(data))
    report = verify(storage, deep=True)
    kinds = {(p.kind, p.key) for p in report.problems}
    assert (FOREIGN, key) in kinds
    assert (CORRUPT, corrupt) in kinds
    assert OTHER_SYSID in next(p.message for p in report.problems if p.kind == FOREIGN)


def test_history_problems() -> None:
    storage = MemoryStorage()
    two_timelines(storage)
    put_segments(storage, 3, 12, 13)  # tl 3 has WAL but no history file
    report = verify(storage)
    assert [p.timeline for p in report.problems if p.kind == HISTORY_PROBLEM] == [3]

    # tl 4's history claims tl 2 switched at another point than tl 3's history says it did
    def mutate(index: Index) -> bool:
        index.add_history(3, [HistoryEntry(1, lsn(8, 0x5000)), HistoryEntry(2, lsn(12, 0x100))])
        index.add_history(4, [HistoryEntry(1, lsn(7)), HistoryEntry(2, lsn(12, 0x100)), HistoryEntry(3, lsn(13))])
        index.add_history(5, [HistoryEntry(2, lsn(9)), HistoryEntry(1, lsn(10))])
        return True

    update_index(storage, SERVER, mutate)
    problems = [p.message for p in verify(storage).problems if p.kind == HISTORY_PROBLEM]
    assert any("00000004.history does not extend 00000003.history" in m for m in problems), problems
    assert any("00000005.history lists timeline 1 out of order" in m for m in problems), problems


def test_deep_compares_history_objects_with_the_index() -> None:
    storage = MemoryStorage()
    two_timelines(storage)

    def mutate(index: Index) -> bool:
        index.histories[2] = [HistoryEntry(1, lsn(7))]
        return True

    update_index(storage, SERVER, mutate)
    report = verify(storage, deep=True)
    assert any(p.kind == HISTORY_PROBLEM and "differs from the index" in p.message for p in report.problems)


def test_without_backups_each_timeline_is_checked_for_holes() -> None:
    storage = MemoryStorage()
    put_segments(storage, 1, 2, 9)
    drop_from_index(storage, 1, 4)
    report = verify(storage)
    assert [(p.first, p.last) for p in report.problems] == [(4, 4)]
    assert any("no backups" in n for n in report.notes)
    assert load_index(storage, SERVER).segments == {1: [[2, 3], [5, 9]]}
