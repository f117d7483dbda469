"""The pure retention planner: which backups and which WAL a policy lets go."""

from __future__ import annotations

from datetime import timedelta

import pytest
from lifecycle_fakes import SEG, SYSID, T0, lsn

from cloudbk.errors import UsageError
from cloudbk.lifecycle.retention import Policy, parse_window, plan_retention
from cloudbk.pg.walnames import segment_name
from cloudbk.repo.catalog import KEEP_FULL, KEEP_STANDALONE
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import BackupSummary, format_time, order_backups


def backup(backup_id: str, begin: int, end: int, hours: float, timeline: int = 1) -> BackupSummary:
    """A backup from segment ``begin`` to ``end`` that ended ``hours`` after T0."""
    end_time = T0 + timedelta(hours=hours)
    return BackupSummary(
        id=backup_id,
        status="complete",
        system_identifier=SYSID,
        pg_version=150000,
        timeline=timeline,
        begin_lsn=lsn(begin),
        end_lsn=lsn(end, 0x100),
        begin_wal=segment_name(timeline, begin, SEG),
        end_wal=segment_name(timeline, end, SEG),
        begin_time=format_time(end_time - timedelta(minutes=5)),
        end_time=format_time(end_time),
        wal_segment_size=SEG,
        compression="zstd",
        data_size=1,
        stored_size=1,
    )


def index_with(segments: dict[int, list[list[int]]], other: tuple[str, ...] = ()) -> Index:
    return Index(
        server="main", system_identifier=SYSID, wal_segment_size=SEG, segments=segments, other_files=list(other)
    )


# five backups on one timeline, a day apart, WAL 2..40 archived
FIVE = [backup(f"2026010{i}T000000Z", 2 + 8 * (i - 1), 3 + 8 * (i - 1), 24.0 * (i - 1)) for i in range(1, 6)]
# begins: 2, 10, 18, 26, 34


def ids(backups: list[BackupSummary]) -> list[str]:
    return [b.id for b in backups]


def test_redundancy_keeps_the_newest_n_and_the_wal_from_the_oldest_of_them() -> None:
    index = index_with({1: [[2, 40]]})
    plan = plan_retention(FIVE, {}, index, Policy(redundancy=2), T0 + timedelta(days=10))
    assert ids(plan.retained) == ids(FIVE[3:])
    assert ids(plan.expired) == ids(FIVE[:3])
    assert plan.wal_keep_from == 26
    assert plan.wal_ranges == {1: [[2, 25]]}
    assert plan.wal_segment_count == 24
    assert not plan.wal_deletable(segment_name(1, 26, SEG))
    assert plan.wal_deletable(segment_name(1, 25, SEG))
    reasons = {d.backup.id: d.reason for d in plan.decisions}
    assert reasons[FIVE[4].id] == "within redundancy 2"
    assert "obsolete" in reasons[FIVE[0].id]


def test_order_is_by_end_lsn_never_by_id() -> None:
    # ids sort in the opposite order of the LSNs (a client clock that went backwards)
    skewed = [
        backup("20260109T000000Z", 2, 3, 1.0),
        backup("20260108T000000Z", 10, 11, 2.0),
        backup("20260107T000000Z", 18, 19, 3.0),
        backup("20260106T000000Z", 26, 27, 4.0),
    ]
    assert ids(order_backups(list(reversed(skewed)))) == ids(skewed)
    plan = plan_retention(skewed, {}, index_with({1: [[2, 30]]}), Policy(redundancy=2), T0 + timedelta(days=1))
    assert ids(plan.retained) == ["20260107T000000Z", "20260106T000000Z"]
    assert plan.wal_keep_from == 18


def test_end_lsn_wins_over_end_time_and_end_time_breaks_lsn_ties() -> None:
    # b ended later in WAL but its end time is earlier (the server clock was set back): LSN decides
    a = backup("20260101T000000Z", 2, 5, 10.0)
    b = backup("20260102T000000Z", 6, 9, 5.0)
    assert ids(order_backups([b, a])) == [a.id, b.id]
    # same end LSN: end time decides, whatever the ids say
    c = backup("20260109T000000Z", 6, 9, 1.0)
    d = backup("20260101T000001Z", 6, 9, 2.0)
    assert ids(order_backups([d, c])) == [c.id, d.id]


def test_recovery_window_keeps_the_backup_that_covers_the_window_start() -> None:
    now = T0 + timedelta(days=4, hours=12)  # backups ended at day 0, 1, 2, 3, 4
    plan = plan_retention(FIVE, {}, index_with({1: [[2, 40]]}), Policy(recovery_window=timedelta(days=2)), now)
    # window start: day 2.5 -> the backup that ended on day 2 is the one a recovery to day 2.5 starts from
    assert ids(plan.retained) == ids(FIVE[2:])
    assert ids(plan.expired) == ids(FIVE[:2])
    reasons = {d.backup.id: d.reason for d in plan.decisions}
    assert reasons[FIVE[2].id] == "needed to recover to the start of the recovery window"
    assert reasons[FIVE[3].id] == "within the recovery window"
    assert plan.wal_keep_from == 18


def test_recovery_window_edges() -> None:
    index = index_with({1: [[2, 40]]})
    # every backup inside the window: all stay, no WAL goes
    young = plan_retention(FIVE, {}, index, Policy(recovery_window=timedelta(days=30)), T0 + timedelta(days=5))
    assert not young.expired
    assert young.wal_ranges == {}
    # every backup older than the window: the newest stays (recovery to the window start needs it)
    old = plan_retention(FIVE, {}, index, Policy(recovery_window=timedelta(days=1)), T0 + timedelta(days=100))
    assert ids(old.retained) == [FIVE[-1].id]
    assert old.wal_keep_from == 34
    # a backup ending exactly at the window start is the anchor
    exact = plan_retention(FIVE, {}, index, Policy(recovery_window=timedelta(days=1)), T0 + timedelta(days=3))
    assert ids(exact.retained) == ids(FIVE[2:])


def test_minimum_redundancy_overrides_the_policy() -> None:
    index = index_with({1: [[2, 40]]})
    plan = plan_retention(
        FIVE, {}, index, Policy(recovery_window=timedelta(days=1), minimum_redundancy=3), T0 + timedelta(days=100)
    )
    assert ids(plan.retained) == ids(FIVE[2:])
    assert {d.reason for d in plan.decisions if d.retain} >= {"minimum redundancy 3"}
    plan = plan_retention(FIVE, {}, index, Policy(redundancy=1, minimum_redundancy=0), T0)
    assert ids(plan.retained) == [FIVE[-1].id]


def test_full_keep_retains_the_backup_and_all_wal_after_it_and_is_not_counted() -> None:
    index = index_with({1: [[2, 40]]})
    plan = plan_retention(FIVE, {FIVE[1].id: KEEP_FULL}, index, Policy(redundancy=2), T0)
    # the kept backup is outside the policy: the two newest others are retained as well
    assert ids(plan.retained) == [FIVE[1].id, FIVE[3].id, FIVE[4].id]
    assert ids(plan.expired) == [FIVE[0].id, FIVE[2].id]
    assert plan.wal_keep_from == 10  # from the kept backup's begin on
    assert plan.wal_ranges == {1: [[2, 9]]}
    kept = next(d for d in plan.decisions if d.backup.id == FIVE[1].id)
    assert (kept.keep, kept.reason) == (KEEP_FULL, "kept (full)")


def test_standalone_keep_retains_only_the_wal_the_backup_needs_to_be_consistent() -> None:
    index = index_with({1: [[2, 40]]}, other=(f"{segment_name(1, 10, SEG)}.00000028.backup",))
    plan = plan_retention(FIVE, {FIVE[1].id: KEEP_STANDALONE}, index, Policy(redundancy=2), T0)
    assert FIVE[1].id in ids(plan.retained)
    assert plan.wal_keep_from == 26
    assert plan.protected == {1: [[10, 11]]}
    assert plan.wal_ranges == {1: [[2, 9], [12, 25]]}
    assert not plan.wal_deletable(segment_name(1, 10, SEG))
    assert not plan.wal_deletable(segment_name(1, 11, SEG))
    assert plan.wal_deletable(segment_name(1, 12, SEG))
    assert plan.other_files == []  # its .backup label is inside the protected range


def test_when_every_backup_is_standalone_kept_the_wal_after_the_newest_stays() -> None:
    keeps = {b.id: KEEP_STANDALONE for b in FIVE}
    plan = plan_retention(FIVE, keeps, index_with({1: [[2, 40]]}), Policy(redundancy=1), T0)
    assert not plan.expired
    assert plan.wal_keep_from == 34
    assert plan.wal_ranges == {1: [[4, 9], [12, 17], [20, 25], [28, 33]]}


def test_wal_on_every_timeline_goes_only_below_the_oldest_retained_begin() -> None:
    # tl 1: 2..20; tl 2 branched at segment 12 (2..?), tl 3 a dead branch from tl 1 at segment 6
    backups = [
        backup("20260101T000000Z", 2, 3, 0.0, timeline=1),
        backup("20260102T000000Z", 8, 9, 1.0, timeline=1),
        backup("20260103T000000Z", 14, 15, 2.0, timeline=2),
        backup("20260104T000000Z", 18, 19, 3.0, timeline=2),
    ]
    index = index_with(
        {1: [[2, 12]], 2: [[12, 25]], 3: [[6, 16]]},
        other=(
            f"{segment_name(1, 12, SEG)}.partial",
            f"{segment_name(1, 2, SEG)}.00000028.backup",
            f"{segment_name(2, 14, SEG)}.00000028.backup",
        ),
    )
    plan = plan_retention(backups, {}, index, Policy(redundancy=2), T0)
    assert ids(plan.expired) == ["20260101T000000Z", "20260102T000000Z"]
    assert plan.wal_keep_from == 14
    assert plan.wal_ranges == {1: [[2, 12]], 2: [[12, 13]], 3: [[6, 13]]}
    assert plan.other_files == [f"{segment_name(1, 12, SEG)}.partial", f"{segment_name(1, 2, SEG)}.00000028.backup"]
    assert not plan.wal_deletable("00000002.history")
    assert not plan.wal_deletable(segment_name(3, 14, SEG))  # a dead branch keeps what is newer


def test_nothing_goes_without_backups() -> None:
    plan = plan_retention([], {}, index_with({1: [[1, 30]]}), Policy(redundancy=1), T0)
    assert plan.decisions == []
    assert plan.wal_keep_from is None
    assert plan.wal_ranges == {}
    assert not plan.wal_deletable(segment_name(1, 1, SEG))


def test_policy_validation_and_window_parsing() -> None:
    for bad in (
        lambda: Policy(),
        lambda: Policy(redundancy=2, recovery_window=timedelta(days=1)),
        lambda: Policy(redundancy=0),
        lambda: Policy(redundancy=1, minimum_redundancy=-1),
    ):
        with pytest.raises(UsageError):
            bad()
    assert Policy(redundancy=4).describe() == "REDUNDANCY 4, MINIMUM REDUNDANCY 1"
    assert Policy(recovery_window=timedelta(days=7)).describe() == "RECOVERY WINDOW OF 7 DAYS, MINIMUM REDUNDANCY 1"
    assert parse_window("7") == timedelta(days=7)
    assert parse_window(7) == timedelta(days=7)
    assert parse_window("0.5") == timedelta(hours=12)
    assert parse_window("36h") == timedelta(hours=36)
    assert parse_window("2w") == timedelta(days=14)
    assert parse_window("90s") == timedelta(seconds=90)
    assert parse_window("7 days") == timedelta(days=7)
    for bad_window in ("0", "-1", "seven", "7m", "", True):
        with pytest.raises(UsageError):
            parse_window(bad_window)
    with pytest.raises(UsageError):
        plan_retention(FIVE, {FIVE[0].id: "forever"}, index_with({}), Policy(redundancy=1), T0)
