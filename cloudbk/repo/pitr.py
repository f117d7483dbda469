"""Point-in-time recovery planning, pure: (index, target) -> which backup, which WAL, what is missing. No I/O.

Timelines. A timeline's history file lists its ancestors and the LSN where each one ended (its switch
point). Recovery towards timeline T replays, from the backup's begin, segment S from the newest timeline on
T's path that had begun by S (PostgreSQL's ``XLogFileReadAnyTLI``): timeline ``t_i`` serves the segments from
the one holding its begin LSN up to the one before the segment holding its switch point. A backup can reach
T only if its timeline is on T's path and it ended before that timeline switched away.

Where the plan ends. A target LSN ends it at the segment holding that LSN; ``immediate`` at the backup's
end segment. A time, transaction id, restore point name or no target at all cannot be placed in WAL from the
index, so the plan runs to the newest segment archived on the path, and every segment up to there must be
present: a gap is reported even if the target might lie before it (``restore --force`` accepts that risk).

Choosing a backup: the newest (by end LSN, then end time; never by id) complete backup on T's path that
ended before the target: end time <= target time, end LSN <= target LSN, or for a transaction id, the
server's next transaction id when the backup ended <= the target (the transaction began after the backup).
A restore point name cannot be placed, so the newest backup is chosen (pass ``--backup`` for an older one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cloudbk.errors import OperationFailed, UsageError
from cloudbk.pg.walnames import format_lsn, history_name, lsn_segno, parse_lsn, segment_name
from cloudbk.repo.catalog import find_backup
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import BackupSummary, complete_backups, parse_time

END, TIME, LSN, XID, NAME, IMMEDIATE = "end", "time", "lsn", "xid", "name", "immediate"
ACTIONS = ("promote", "pause", "shutdown")


@dataclass(frozen=True)
class Target:
    kind: str = END
    time: datetime | None = None
    lsn: int | None = None
    xid: int | None = None
    name: str | None = None

    @classmethod
    def parse(
        cls,
        time: str | None = None,
        lsn: str | None = None,
        xid: str | None = None,
        name: str | None = None,
        immediate: bool = False,
    ) -> Target:
        given = [k for k, v in ((TIME, time), (LSN, lsn), (XID, xid), (NAME, name)) if v is not None]
        if immediate:
            given.append(IMMEDIATE)
        if len(given) > 1:
            raise UsageError(f"give at most one recovery target, not {', '.join(given)}")
        if time is not None:
            return cls(TIME, time=parse_target_time(time))
        if lsn is not None:
            return cls(LSN, lsn=parse_lsn(lsn))
        if xid is not None:
            if not xid.strip().isdigit():
                raise UsageError(f"transaction id {xid!r} is not a number")
            return cls(XID, xid=int(xid))
        if name is not None:
            if not name or len(name) > 63:
                raise UsageError(f"restore point name {name!r} must have 1 to 63 characters")
            return cls(NAME, name=name)
        return cls(IMMEDIATE if immediate else END)

    def describe(self) -> str:
        if self.kind == TIME and self.time is not None:
            return f"time {format_target_time(self.time)}"
        if self.kind == LSN and self.lsn is not None:
            return f"LSN {format_lsn(self.lsn)}"
        if self.kind == XID:
            return f"transaction {self.xid}"
        if self.kind == NAME:
            return f"restore point {self.name!r}"
        if self.kind == IMMEDIATE:
            return "immediate (the end of the backup)"
        return "the end of the archived WAL"

    def settings(self) -> dict[str, str]:
        """The recovery_target_* settings for postgresql.conf."""
        if self.kind == TIME and self.time is not None:
            return {"recovery_target_time": format_target_time(self.time)}
        if self.kind == LSN and self.lsn is not None:
            return {"recovery_target_lsn": format_lsn(self.lsn)}
        if self.kind == XID:
            return {"recovery_target_xid": str(self.xid)}
        if self.kind == NAME and self.name is not None:
            return {"recovery_target_name": self.name}
        if self.kind == IMMEDIATE:
            return {"recovery_target": "immediate"}
        return {}


def parse_target_time(text: str) -> datetime:
    """ISO 8601 (``2026-11-21 09:30:00+00``, ``...T09:30:00Z``); without an offset, this machine's local time."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"target time {text!r} is not a timestamp", hint="write it as 2026-11-21 09:30:00+00 (ISO 8601)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, made explicit so PostgreSQL reads the same instant
    return moment


def format_target_time(moment: datetime) -> str:
    """A timestamp PostgreSQL parses unambiguously (UTC, explicit offset, microseconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


@dataclass(frozen=True)
class TimelineSpan:
    """Where one timeline of a path is the one recovery reads: from ``begin`` to ``end`` (None: no end)."""

    timeline: int
    begin: int
    end: int | None


@dataclass(frozen=True)
class Stretch:
    """Segments ``first..last`` (inclusive) of one timeline, in replay order."""

    timeline: int
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass
class RecoveryPlan:
    backup: BackupSummary
    target: Target
    target_timeline: int
    path: list[TimelineSpan]
    stretches: list[Stretch]
    segment_size: int
    open_ended: bool  # the plan runs to the newest archived segment (the target cannot be placed in WAL)
    missing: list[Stretch] = field(default_factory=list)
    missing_histories: list[int] = field(default_factory=list)
    #: the latest time recovery along the plan can reach at most (when its newest segment was pushed);
    #: None when the index does not record it for every timeline of the plan (see :func:`check_reach`)
    reach_time: datetime | None = None

    @property
    def segment_count(self) -> int:
        return sum(s.count for s in self.stretches)

    @property
    def wal_bytes(self) -> int:
        """Upper bound of the WAL recovery fetches (uncompressed segments)."""
        return self.segment_count * self.segment_size

    @property
    def complete(self) -> bool:
        return not self.missing and not self.missing_histories

    def describe_missing(self) -> list[str]:
        lines = [
            f"timeline {m.timeline}: "
            + (
                segment_name(m.timeline, m.first, self.segment_size)
                if m.count == 1
                else f"{segment_name(m.timeline, m.first, self.segment_size)} .. "
                f"{segment_name(m.timeline, m.last, self.segment_size)} ({m.count} segments)"
            )
            for m in self.missing
        ]
        lines += [f"history file {history_name(t)}" for t in self.missing_histories]
        return lines


# -- timelines ----------------------------------------------------------------------------------------------


def latest_timeline(index: Index) -> int:
    timelines = set(index.segments) | set(index.histories)
    timelines |= {BackupSummary.from_dict(b).timeline for b in index.backups.values()}
    return max(timelines, default=1)


def timeline_path(index: Index, target_timeline: int) -> list[TimelineSpan]:
    """The timelines recovery towards ``target_timeline`` passes through, oldest first."""
    entries = sorted(index.histories.get(target_timeline, []), key=lambda e: e.timeline)
    path: list[TimelineSpan] = []
    begin = 0
    for entry in entries:
        if entry.timeline >= target_timeline:
            break
        path.append(TimelineSpan(entry.timeline, begin, entry.switchpoint))
        begin = entry.switchpoint
    path.append(TimelineSpan(target_timeline, begin, None))
    return path


def _span_of(path: list[TimelineSpan], timeline: int) -> TimelineSpan | None:
    return next((s for s in path if s.timeline == timeline), None)


def on_path(backup: BackupSummary, path: list[TimelineSpan]) -> bool:
    span = _span_of(path, backup.timeline)
    return span is not None and (span.end is None or backup.end_lsn <= span.end)


def reaches(backup: BackupSummary, target: Target) -> bool:
    """Whether recovery from ``backup`` can stop at ``target`` (it is consistent before the target)."""
    if target.kind == TIME and target.time is not None:
        return parse_time(backup.end_time) <= target.time
    if target.kind == LSN and target.lsn is not None:
        return backup.end_lsn <= target.lsn
    if target.kind == XID and target.xid is not None:
        return backup.next_xid is None or backup.next_xid <= target.xid
    return True


# -- the plan -----------------------------------------------------------------------------------------------


def choose_backup(
    index: Index,
    target: Target,
    target_timeline: int | None = None,
    backup_id: str | None = None,
    backups: Sequence[BackupSummary] | None = None,
) -> BackupSummary:
    """The backup to restore: ``backup_id`` ('latest' or an id) checked against the target, or the newest
    backup that can reach it. ``backups`` are the ones to choose from, oldest first (restore passes those
    :func:`cloudbk.repo.catalog.load_catalog` found sound); by default the index's complete ones."""
    tli = target_timeline or latest_timeline(index)
    path = timeline_path(index, tli)
    backups = complete_backups(index.backups) if backups is None else list(backups)
    if not backups:
        raise OperationFailed(
            f"server {index.server!r} has no complete backup in this repository",
            hint="take one with `cloudbk backup-push`; check --repo and --server",
        )
    candidates = [b for b in backups if on_path(b, path)]
    if backup_id is not None:
        if backup_id == "latest":
            if not candidates:
                raise OperationFailed(
                    f"no backup is on the history of timeline {tli}", hint="see `cloudbk backup-list`"
                )
            chosen = candidates[-1]
        else:
            chosen = find_backup(backups, backup_id, index.server)
        if not on_path(chosen, path):
            raise OperationFailed(
                f"backup {chosen.id} (timeline {chosen.timeline}, ended at {format_lsn(chosen.end_lsn)}) is not on "
                f"the history of timeline {tli}",
                hint="choose another backup or --target-timeline",
            )
        if not reaches(chosen, target):
            raise OperationFailed(
                f"backup {chosen.id} ended at {chosen.end_time} ({format_lsn(chosen.end_lsn)}), after the target "
                f"{target.describe()}: recovery cannot stop before the backup is consistent",
                hint="choose an older backup, or leave out --backup to let cloudbk choose",
            )
        return chosen
    if target.kind in (END, NAME, IMMEDIATE):
        if not candidates:
            raise OperationFailed(f"no backup is on the history of timeline {tli}", hint="see `cloudbk backup-list`")
        return candidates[-1]
    reaching = [b for b in candidates if reaches(b, target)]
    if not reaching:
        oldest = candidates[0] if candidates else backups[0]
        raise OperationFailed(
            f"no backup ended before the target {target.describe()} (the oldest usable one ended at "
            f"{oldest.end_time}, {format_lsn(oldest.end_lsn)})",
            hint="a recovery can only stop after the end of the backup it starts from",
        )
    return reaching[-1]


def _last_archived(index: Index, path: list[TimelineSpan], start: int, segment_size: int) -> int:
    """The newest segment archived anywhere on the path (serving its span), at or after ``start``."""
    last = start
    for span in path:
        lo = lsn_segno(span.begin, segment_size)
        hi = None if span.end is None else lsn_segno(span.end, segment_size) - 1
        for _, b in index.segments.get(span.timeline, []):
            top = b if hi is None else min(b, hi)
            if top >= lo:
                last = max(last, top)
    return last


def plan_recovery(
    index: Index, backup: BackupSummary, target: Target, target_timeline: int | None = None
) -> RecoveryPlan:
    """The WAL recovery from ``backup`` to ``target`` needs, timeline by timeline, with the gaps."""
    tli = target_timeline or latest_timeline(index)
    path = timeline_path(index, tli)
    segment_size = backup.wal_segment_size
    start = lsn_segno(backup.begin_lsn, segment_size)
    backup_end = lsn_segno(backup.end_lsn - 1, segment_size)
    open_ended = target.kind not in (LSN, IMMEDIATE)
    if target.kind == LSN and target.lsn is not None:
        end = max(backup_end, lsn_segno(target.lsn, segment_size))
    elif target.kind == IMMEDIATE:
        end = backup_end
    else:
        end = max(backup_end, _last_archived(index, path, start, segment_size))

    stretches: list[Stretch] = []
    for span in path:
        if span.timeline < backup.timeline:
            continue
        lo = max(start, lsn_segno(span.begin, segment_size))
        hi = end if span.end is None else min(end, lsn_segno(span.end, segment_size) - 1)
        if lo <= hi:
            stretches.append(Stretch(span.timeline, lo, hi))
    missing = [
        Stretch(s.timeline, a, b) for s in stretches for a, b in index.missing_segments(s.timeline, s.first, s.last)
    ]
    reach_time = _reach_time(index, stretches)
    needed_histories = [t for t in sorted({s.timeline for s in stretches} | {tli}) if t > 1]
    missing_histories = [t for t in needed_histories if t not in index.histories]
    return RecoveryPlan(
        backup=backup,
        target=target,
        target_timeline=tli,
        path=[s for s in path if s.timeline >= backup.timeline],
        stretches=stretches,
        segment_size=segment_size,
        open_ended=open_ended,
        missing=missing,
        missing_histories=missing_histories,
        reach_time=reach_time,
    )


def _reach_time(index: Index, stretches: list[Stretch]) -> datetime | None:
    """The newest ``last_push`` of the plan's timelines; None if one of them has none (an older index)."""
    times = [index.last_push.get(s.timeline) for s in stretches]
    if not times or any(t is None for t in times):
        return None
    return max(parse_time(t) for t in times if t is not None)


def beyond_reach(plan: RecoveryPlan) -> str | None:
    """Why the plan's target time lies beyond anything the archive can reach, or None (also when unknown)."""
    target, reach = plan.target.time, plan.reach_time
    if plan.target.kind != TIME or target is None or reach is None or target <= reach:
        return None
    timelines = ", ".join(str(t) for t in sorted({s.timeline for s in plan.stretches}))
    return (
        f"the target time {format_target_time(target)} is later than anything the archive can reach: the newest "
        f"WAL on the recovery path (timeline {timelines}) was archived at {format_target_time(reach)}"
    )


def check_reach(plan: RecoveryPlan) -> None:
    """Refuse a target time later than anything the archive can reach: recovery would replay every archived
    segment and end without reaching it (PostgreSQL: "recovery ended before configured recovery target was
    reached"). Nothing is refused when the bound is unknown."""
    reason = beyond_reach(plan)
    if reason is None:
        return
    reach = format_target_time(plan.reach_time) if plan.reach_time else ""
    raise OperationFailed(
        f"refusing to restore: {reason}, so recovery would end before the target",
        hint=f"nothing was written. Choose a --target-time up to {reach}, or wait until the source server has "
        "archived the WAL up to the target (SELECT pg_switch_wal() there), or pass --force to restore anyway",
    )


def check_complete(plan: RecoveryPlan) -> None:
    """Refuse a plan that lacks WAL segments or history files (SPEC §3 rule 5): recovery would stop at the gap."""
    if plan.complete:
        return
    raise OperationFailed(
        "refusing to restore: the archive lacks WAL this recovery needs: " + "; ".join(plan.describe_missing()),
        hint="nothing was written. Choose an earlier target or another backup; check archive_command on the source "
        "server; or pass --force to restore anyway (recovery stops at the gap)",
    )


@dataclass(frozen=True)
class WalReach:
    """How far the archive reaches from a backup without a gap, along the latest timeline's path."""

    segments: int  # contiguous segments from the backup's begin segment
    last: str | None  # the last of them (None: not even the begin segment is archived)
    gap: str | None  # the first missing segment after them, when newer segments exist beyond it
    consistent: bool  # the WAL up to the backup's end segment is all there


def wal_after(index: Index, backup: BackupSummary) -> WalReach:
    plan = plan_recovery(index, backup, Target())
    size = plan.segment_size
    first_missing = plan.missing[0] if plan.missing else None
    count = 0
    last: str | None = None
    for stretch in plan.stretches:
        hi = stretch.last
        if first_missing is not None and first_missing.timeline == stretch.timeline:
            hi = first_missing.first - 1
        if hi >= stretch.first:
            count += hi - stretch.first + 1
            last = segment_name(stretch.timeline, hi, size)
        if first_missing is not None and first_missing.timeline == stretch.timeline:
            break
    gap = None if first_missing is None else segment_name(first_missing.timeline, first_missing.first, size)
    backup_end = lsn_segno(backup.end_lsn - 1, size)
    consistent = count >= backup_end - lsn_segno(backup.begin_lsn, size) + 1
    return WalReach(count, last, gap, consistent)
