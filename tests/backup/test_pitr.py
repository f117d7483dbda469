"""Recovery planning (pure) and the manifest format, with the in-memory backend for the stat double-check."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from cloudbk.backup.restore import confirm_missing
from cloudbk.errors import IntegrityError, OperationFailed, UsageError
from cloudbk.pg.datadir import Tablespace
from cloudbk.pg.walnames import HistoryEntry, segment_name
from cloudbk.repo import layout
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import FileEntry, Manifest, TarEntry, complete_backups, format_time
from cloudbk.repo.pitr import IMMEDIATE, Target, choose_backup, latest_timeline, plan_recovery, wal_after
from cloudbk.storage.memory import MemoryStorage

SEG = 16 * 1024 * 1024
T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def lsn(segno: int, offset: int = 0x28) -> int:
    return segno * SEG + offset


def manifest(
    backup_id: str, begin_seg: int, end_seg: int, minutes: int, timeline: int = 1, next_xid: int = 0
) -> Manifest:
    return Manifest(
        id=backup_id,
        server="main",
        system_identifier="7300000000000000001",
        pg_version=150004,
        timeline=timeline,
        begin_lsn=lsn(begin_seg),
        end_lsn=lsn(end_seg, 0x100),
        begin_wal=segment_name(timeline, begin_seg),
        end_wal=segment_name(timeline, end_seg),
        begin_time=format_time(T0 + timedelta(minutes=minutes)),
        end_time=format_time(T0 + timedelta(minutes=minutes, seconds=30)),
        wal_segment_size=SEG,
        compression="zstd",
        tablespaces=[Tablespace(16385, "ts", "/srv/ts")],
        tars=[
            TarEntry.single("base.tar.zst", None, 3072, "ab" * 32, 900, [FileEntry("PG_VERSION", 3, "cd" * 32)]),
            TarEntry.single("16385.tar.zst", 16385, 2048, "ef" * 32, 400, [FileEntry("PG_15_1/1/2", 8192, "01" * 32)]),
        ],
        next_xid=next_xid or None,
    )


def index_with(*manifests: Manifest, segments: dict[int, list[list[int]]] | None = None) -> Index:
    idx = Index(server="main", system_identifier="7300000000000000001", wal_segment_size=SEG)
    for m in manifests:
        idx.backups[m.id] = m.summary()
    idx.segments = segments or {1: [[1, 100]]}
    return idx


def at(minutes: float) -> Target:
    return Target.parse(time=(T0 + timedelta(minutes=minutes)).isoformat())


# -- manifest -----------------------------------------------------------------------------------------------


def test_manifest_json_round_trip_and_summary() -> None:
    m = manifest("20261121T090000Z", 2, 3, 0, next_xid=745)
    again = Manifest.from_json(m.to_json(), "k")
    assert again == m
    doc = json.loads(m.to_json())
    assert doc["begin_lsn"] == "0/2000028" and doc["end_lsn"] == "0/3000100"
    assert doc["data_size"] == 3 + 8192 and doc["stored_size"] == 1300
    assert doc["format_version"] == 2 and doc["tars"][0]["volumes"][0]["files"] == [["PG_VERSION", 3, "cd" * 32]]
    summary = m.summary()
    assert summary["data_size"] == 8195 and summary["file_count"] == 2 and summary["tablespaces"] == 1
    assert summary["next_xid"] == 745 and "tars" not in summary


def test_unreadable_or_newer_manifest_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="not valid JSON"):
        Manifest.from_json(b"{not json", "k")
    doc = json.loads(manifest("20261121T090000Z", 2, 3, 0).to_json())
    del doc["end_lsn"]
    with pytest.raises(IntegrityError, match="unreadable"):
        Manifest.from_json(json.dumps(doc).encode(), "k")
    doc = json.loads(manifest("20261121T090000Z", 2, 3, 0).to_json())
    doc["format_version"] = 99
    with pytest.raises(IntegrityError, match="newer"):
        Manifest.from_json(json.dumps(doc).encode(), "k")


def test_backups_are_ordered_by_end_lsn_not_by_id() -> None:
    # a skewed clock gave the newer backup the smaller id
    newer = manifest("20200101T000000Z", 10, 11, 20)
    older = manifest("20991231T000000Z", 2, 3, 0)
    ordered = complete_backups(index_with(newer, older).backups)
    assert [b.id for b in ordered] == [older.id, newer.id]


# -- choosing the backup ------------------------------------------------------------------------------------


def test_target_between_two_backups_picks_the_older_one() -> None:
    first, second = manifest("20261121T090000Z", 2, 3, 0), manifest("20261121T091000Z", 10, 11, 10)
    idx = index_with(first, second)
    assert choose_backup(idx, at(5)).id == first.id
    assert choose_backup(idx, at(15)).id == second.id
    assert choose_backup(idx, Target()).id == second.id
    assert choose_backup(idx, Target.parse(lsn="0/5000000")).id == first.id
    assert choose_backup(idx, Target.parse(lsn="0/C000000")).id == second.id
    with pytest.raises(OperationFailed, match="no backup ended before the target"):
        choose_backup(idx, at(0.1))
    with pytest.raises(OperationFailed, match="after the target"):
        choose_backup(idx, at(5), backup_id=second.id)
    assert choose_backup(idx, at(15), backup_id=first.id).id == first.id
    assert choose_backup(idx, at(15), backup_id="latest").id == second.id
    with pytest.raises(OperationFailed, match="after the target"):
        choose_backup(idx, at(5), backup_id="latest")


def test_xid_target_uses_the_next_xid_at_the_backup_end() -> None:
    first = manifest("20261121T090000Z", 2, 3, 0, next_xid=700)
    second = manifest("20261121T091000Z", 10, 11, 10, next_xid=900)
    idx = index_with(first, second)
    assert choose_backup(idx, Target.parse(xid="800")).id == first.id
    assert choose_backup(idx, Target.parse(xid="900")).id == second.id


def test_one_target_at_most() -> None:
    with pytest.raises(UsageError):
        Target.parse(time="2026-11-21 09:00:00+00", lsn="0/1")
    with pytest.raises(UsageError):
        Target.parse(lsn="not-an-lsn")
    assert Target.parse(time="2026-11-21 09:00:00Z").settings() == {
        "recovery_target_time": "2026-11-21 09:00:00.000000+00"
    }
    assert Target.parse(immediate=True).settings() == {"recovery_target": "immediate"}


# -- planning WAL -------------------------------------------------------------------------------------------


def test_plan_on_one_timeline_runs_to_the_newest_segment() -> None:
    b = manifest("20261121T090000Z", 5, 6, 0)
    idx = index_with(b, segments={1: [[1, 40]]})
    plan = plan_recovery(idx, choose_backup(idx, Target()), Target())
    assert [(s.timeline, s.first, s.last) for s in plan.stretches] == [(1, 5, 40)]
    assert plan.complete and plan.open_ended
    assert plan.wal_bytes == 36 * SEG


def test_plan_to_an_lsn_or_immediate_stops_there() -> None:
    b = manifest("20261121T090000Z", 5, 6, 0)
    idx = index_with(b, segments={1: [[1, 40]]})
    summary = choose_backup(idx, Target())
    plan = plan_recovery(idx, summary, Target.parse(lsn="0/9000010"))
    assert [(s.first, s.last) for s in plan.stretches] == [(5, 9)] and not plan.open_ended
    plan = plan_recovery(idx, summary, Target(IMMEDIATE))
    assert [(s.first, s.last) for s in plan.stretches] == [(5, 6)]


def test_gap_is_reported_and_double_checked_with_stat() -> None:
    b = manifest("20261121T090000Z", 5, 6, 0)
    idx = index_with(b, segments={1: [[1, 20], [23, 40]]})
    plan = plan_recovery(idx, choose_backup(idx, Target()), Target())
    assert not plan.complete
    assert [(m.timeline, m.first, m.last) for m in plan.missing] == [(1, 21, 22)]
    assert plan.describe_missing() == [f"timeline 1: {segment_name(1, 21)} .. {segment_name(1, 22)} (2 segments)"]
    storage = MemoryStorage()
    # segment 21 was archived but its index update was lost; 22 really is missing
    storage.put_bytes(layout.wal_key("main", segment_name(1, 21)), b"segment")
    confirm_missing(storage, "main", plan)
    assert [(m.first, m.last) for m in plan.missing] == [(22, 22)]
    storage.put_bytes(layout.wal_key("main", segment_name(1, 22)), b"segment")
    assert confirm_missing(storage, "main", plan).complete


def test_gap_after_an_lsn_target_does_not_matter() -> None:
    b = manifest("20261121T090000Z", 5, 6, 0)
    idx = index_with(b, segments={1: [[1, 20], [23, 40]]})
    plan = plan_recovery(idx, choose_backup(idx, Target()), Target.parse(lsn="0/10000000"))
    assert plan.complete


def test_plan_follows_timeline_switches() -> None:
    # timeline 2 branched from 1 at 0/A000100 (segment 10), timeline 3 from 2 at 0/F000000 (segment boundary)
    b = manifest("20261121T090000Z", 5, 6, 0)
    late_on_1 = manifest("20261121T095000Z", 12, 13, 50)  # on timeline 1 after timeline 2 left it
    idx = index_with(b, late_on_1, segments={1: [[1, 14]], 2: [[10, 15]], 3: [[15, 18]]})
    idx.histories[2] = [HistoryEntry(1, lsn(10, 0x100))]
    idx.histories[3] = [HistoryEntry(1, lsn(10, 0x100)), HistoryEntry(2, lsn(15, 0))]
    assert latest_timeline(idx) == 3
    chosen = choose_backup(idx, Target())
    assert chosen.id == b.id, "a backup on timeline 1 after the switch point cannot reach timeline 3"
    plan = plan_recovery(idx, chosen, Target())
    assert [(s.timeline, s.first, s.last) for s in plan.stretches] == [(1, 5, 9), (2, 10, 14), (3, 15, 18)]
    assert plan.complete
    # recovery along timeline 1 only (--target-timeline 1) can use the later backup
    assert choose_backup(idx, Target(), target_timeline=1).id == late_on_1.id
    del idx.histories[3]
    plan = plan_recovery(idx, chosen, Target(), target_timeline=3)
    assert plan.missing_histories == [3]


def test_wal_after_a_backup() -> None:
    b = manifest("20261121T090000Z", 5, 6, 0)
    idx = index_with(b, segments={1: [[1, 20], [23, 40]]})
    reach = wal_after(idx, choose_backup(idx, Target()))
    assert reach.segments == 16 and reach.last == segment_name(1, 20) and reach.gap == segment_name(1, 21)
    assert reach.consistent
    idx = index_with(b, segments={1: [[1, 5]]})
    reach = wal_after(idx, choose_backup(idx, Target()))
    assert not reach.consistent and reach.gap == segment_name(1, 6)
