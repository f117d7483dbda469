"""Retention policies, as a pure planner: (backups, keep marks, WAL index, policy, now) -> what goes.

No I/O here: :mod:`cloudbk.lifecycle.actions` gathers the inputs from the repository and carries the plan out.

The rules (SPEC §3 rule 6; the policies are Barman's, so DBAs know what to expect):

- Backups are ordered by where they end in WAL (end LSN), then by end time; the backup id is never used
  for ordering (ids come from a client clock that may be skewed). Only when two backups have the same end
  LSN *and* end time does anything else (begin LSN, then id) break the tie, so the plan is deterministic.
- ``REDUNDANCY N``: the N newest backups that are not kept are retained; older ones expire.
- ``RECOVERY WINDOW OF D DAYS``: every point in time in the last D days must stay recoverable, so the newest
  backup that ended at or before ``now - D`` (the one a recovery to the window's start replays from) and
  every backup after it are retained; older ones expire. If no backup ended before the window, all are
  retained.
- Kept backups (``cloudbk keep``) never expire and are not counted by the policy (as in Barman). A ``full``
  keep retains the backup with all WAL after it, so it stays usable for point-in-time recovery; a
  ``standalone`` keep retains only the WAL from its begin to its end segment, enough to restore it to the
  moment it ended.
- The newest ``minimum_redundancy`` backups (kept ones included) never expire, whatever the policy says.
- WAL: a segment goes only if its segment number is below ``keep_from``, the lowest begin segment of the
  retained backups that are not standalone-kept and of the newest backup, *on any timeline*, and it is not
  inside a standalone-kept backup's begin..end range. Segment numbers are LSN-based and timelines continue
  the LSN of their parent, so "below the oldest retained backup's begin" is a safe test whatever timeline
  a segment is on: every retained backup needs WAL from its begin onward (on its timeline and the ones that
  descend from it), and a recovery window is served by its anchor backup, which is retained. WAL newer
  than that is kept even on a timeline no retained backup reaches (a dead branch may be a server still
  running). Timeline history files are never deleted: they are tiny and recovery needs them to follow a
  switch. ``.partial`` and ``.backup`` files follow the segment rule by their segment number.
- With no backups at all, nothing is deleted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cloudbk.errors import UsageError
from cloudbk.pg.walnames import DEFAULT_SEGMENT_SIZE, HISTORY, lsn_segno, parse_wal_name
from cloudbk.repo.catalog import KEEP_MODES, KEEP_STANDALONE
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import BackupSummary, order_backups, parse_time
from cloudbk.repo.ranges import Ranges, gaps, merge

#: retention and ``delete`` never leave fewer backups than this unless told to (``--force`` for delete)
DEFAULT_MINIMUM_REDUNDANCY = 1

_WINDOW = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|sec|seconds?|h|hours?|d|days?|w|weeks?)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_window(value: object) -> timedelta:
    """A recovery window: a number of days (``7``, ``0.5``) or a number with a unit (``36h``, ``2w``, ``90s``)."""
    hint = "write the recovery window as a number of days (7) or with a unit: 36h, 7d, 2w"
    if isinstance(value, bool):
        raise UsageError(f"recovery window {value!r} is not a duration", hint=hint)
    if isinstance(value, int | float):
        amount, unit = float(value), "d"
    else:
        m = _WINDOW.match(str(value))
        if not m:
            raise UsageError(f"recovery window {value!r} is not a duration", hint=hint)
        amount, unit = float(m.group(1)), (m.group(2) or "d")[0].lower()
    if not math.isfinite(amount) or amount <= 0:
        raise UsageError(f"recovery window {value!r} must be longer than zero", hint=hint)
    return timedelta(seconds=amount * _UNIT_SECONDS[unit])


def format_window(window: timedelta) -> str:
    seconds = window.total_seconds()
    if seconds % 86400 == 0:
        days = int(seconds // 86400)
        return f"{days} DAY" + ("S" if days != 1 else "")
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)} HOURS"
    return f"{seconds:g} SECONDS"


@dataclass(frozen=True)
class Policy:
    """Exactly one of ``redundancy`` and ``recovery_window``, plus the minimum redundancy floor."""

    redundancy: int | None = None
    recovery_window: timedelta | None = None
    minimum_redundancy: int = DEFAULT_MINIMUM_REDUNDANCY

    def __post_init__(self) -> None:
        if (self.redundancy is None) == (self.recovery_window is None):
            raise UsageError(
                "a retention policy needs exactly one of --redundancy N and --recovery-window DAYS",
                hint="set one on the command line or in the [retention] table of the config file",
            )
        if self.redundancy is not None and self.redundancy < 1:
            raise UsageError(
                f"redundancy {self.redundancy} must be at least 1", hint="REDUNDANCY 0 would delete every backup"
            )
        if self.recovery_window is not None and self.recovery_window <= timedelta(0):
            raise UsageError("the recovery window must be longer than zero")
        if self.minimum_redundancy < 0:
            raise UsageError(f"minimum redundancy {self.minimum_redundancy} must not be negative")

    def describe(self) -> str:
        if self.redundancy is not None:
            text = f"REDUNDANCY {self.redundancy}"
        else:
            assert self.recovery_window is not None
            text = f"RECOVERY WINDOW OF {format_window(self.recovery_window)}"
        return f"{text}, MINIMUM REDUNDANCY {self.minimum_redundancy}"


@dataclass(frozen=True)
class Decision:
    backup: BackupSummary
    retain: bool
    reason: str
    keep: str | None = None


@dataclass
class RetentionPlan:
    policy: Policy
    now: datetime
    #: every backup considered, oldest first, with what happens to it and why
    decisions: list[Decision]
    #: segments numbered below this go (on every timeline); None: no WAL goes
    wal_keep_from: int | None
    segment_size: int
    #: timeline -> segment ranges that stay whatever ``wal_keep_from`` says (standalone-kept backups)
    protected: dict[int, Ranges] = field(default_factory=dict)
    #: timeline -> segment ranges the index lists that go
    wal_ranges: dict[int, Ranges] = field(default_factory=dict)
    #: ``.partial`` and ``.backup`` files the index lists that go
    other_files: list[str] = field(default_factory=list)

    @property
    def expired(self) -> list[BackupSummary]:
        return [d.backup for d in self.decisions if not d.retain]

    @property
    def retained(self) -> list[BackupSummary]:
        return [d.backup for d in self.decisions if d.retain]

    @property
    def wal_segment_count(self) -> int:
        return sum(b - a + 1 for ranges in self.wal_ranges.values() for a, b in ranges)

    def segment_deletable(self, timeline: int, segno: int) -> bool:
        if self.wal_keep_from is None or segno >= self.wal_keep_from:
            return False
        return not any(a <= segno <= b for a, b in self.protected.get(timeline, []))

    def segments_going(self, timeline: int, ranges: Ranges) -> Ranges:
        """The part of ``ranges`` (archived segments of ``timeline``) this plan deletes: below ``wal_keep_from``
        and outside the protected ranges."""
        if self.wal_keep_from is None:
            return []
        going: Ranges = []
        for a, b in ranges:
            if a < self.wal_keep_from:
                going.extend(gaps(self.protected.get(timeline, []), a, min(b, self.wal_keep_from - 1)))
        return going

    def wal_deletable(self, name: str) -> bool:
        """Whether the archived WAL file ``name`` goes under this plan. History files never go."""
        wal = parse_wal_name(name)
        if wal.kind == HISTORY:
            return False
        return self.segment_deletable(wal.timeline, wal.segno(self.segment_size))


def _decide(ordered: list[BackupSummary], keeps: Mapping[str, str], policy: Policy, now: datetime) -> list[Decision]:
    reasons: dict[str, str] = {}
    for b in ordered:
        if b.id in keeps:
            reasons[b.id] = f"kept ({keeps[b.id]})"
    candidates = [b for b in ordered if b.id not in keeps]
    if policy.redundancy is not None:
        for b in candidates[-policy.redundancy :]:
            reasons[b.id] = f"within redundancy {policy.redundancy}"
    else:
        assert policy.recovery_window is not None
        window_start = now - policy.recovery_window
        anchor = None
        for i, b in enumerate(candidates):
            if parse_time(b.end_time) <= window_start:
                anchor = i
        start = 0 if anchor is None else anchor
        for i, b in enumerate(candidates[start:], start):
            if i == anchor:
                reasons[b.id] = "needed to recover to the start of the recovery window"
            else:
                reasons[b.id] = "within the recovery window"
    if policy.minimum_redundancy:
        for b in ordered[-policy.minimum_redundancy :]:
            reasons.setdefault(b.id, f"minimum redundancy {policy.minimum_redundancy}")
    return [
        Decision(b, b.id in reasons, reasons.get(b.id, "obsolete under " + policy.describe()), keeps.get(b.id))
        for b in ordered
    ]


def plan_retention(
    backups: Sequence[BackupSummary],
    keeps: Mapping[str, str],
    index: Index,
    policy: Policy,
    now: datetime,
) -> RetentionPlan:
    """Decide which backups and which WAL go. ``keeps`` maps kept backup ids to their keep mode.

    ``backups`` are the complete backups that exist; ``index`` supplies the WAL archive (segment ranges and
    ``.partial``/``.backup`` files) so the plan can say which of them go. See the module docstring.
    """
    for backup_id, mode in keeps.items():
        if mode not in KEEP_MODES:
            raise UsageError(f"backup {backup_id} has an unknown keep mode {mode!r}")
    ordered = order_backups(backups)
    segment_size = index.wal_segment_size or (ordered[0].wal_segment_size if ordered else DEFAULT_SEGMENT_SIZE)
    decisions = _decide(ordered, keeps, policy, now)
    plan = RetentionPlan(policy, now, decisions, None, segment_size)
    if not ordered:
        return plan

    # The WAL every retained backup needs starts at its begin segment; the newest backup counts even when
    # it is standalone-kept, so the live end of the archive is never cut away.
    starts = [lsn_segno(d.backup.begin_lsn, segment_size) for d in decisions if d.retain and d.keep != KEEP_STANDALONE]
    starts.append(lsn_segno(ordered[-1].begin_lsn, segment_size))
    plan.wal_keep_from = min(starts)
    for d in decisions:
        if d.retain and d.keep == KEEP_STANDALONE:
            kept = d.backup
            first, last = lsn_segno(kept.begin_lsn, segment_size), lsn_segno(kept.end_lsn, segment_size)
            plan.protected[kept.timeline] = merge([*plan.protected.get(kept.timeline, []), [first, last]])

    for timeline, ranges in sorted(index.segments.items()):
        going = plan.segments_going(timeline, ranges)
        if going:
            plan.wal_ranges[timeline] = going
    plan.other_files = [name for name in index.other_files if plan.wal_deletable(name)]
    return plan
