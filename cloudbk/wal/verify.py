"""``wal-verify``: is the WAL archive complete and consistent from the oldest backup to the newest segment?

Two depths:

- **index** (default, one GET): for every timeline, the WAL a recovery needs is walked along the timeline's
  history — each ancestor from the oldest backup that lies on that path up to the segment before the switch
  point, then the timeline itself up to its newest archived segment — and every missing segment is a gap.
  Timeline histories are checked for consistency: every timeline above 1 that holds WAL or a backup has a
  history file, a history lists ancestors in increasing order with non-decreasing switch points, and it
  extends its parent's history.
- **deep** (``--deep``): additionally LISTs the WAL prefix and reads every object: its envelope header, its
  full content against the SHA-256 and size there, and for segments the long page header, whose system
  identifier must be the repository's (a different one is a *foreign* segment, from another cluster) and
  whose page address must match the name. Segments the index lists but storage does not hold are gaps;
  objects the index does not list are reported so ``cloudbk reindex`` can be run.

A timeline that no backup reaches is reported but not required to be complete: nothing can recover along it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cloudbk.errors import CloudbkError, NotFound, StorageError, UsageError
from cloudbk.pg.walnames import (
    DEFAULT_SEGMENT_SIZE,
    HISTORY,
    PARTIAL,
    SEGMENT,
    format_lsn,
    history_name,
    parse_history,
    parse_segment_header,
    parse_wal_name,
    segment_name,
)
from cloudbk.repo import layout
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import BackupSummary
from cloudbk.repo.objects import WAL, read_object
from cloudbk.repo.pitr import Target, on_path, plan_recovery, timeline_path
from cloudbk.repo.ranges import Ranges, merge, runs
from cloudbk.storage.base import Storage

GAP, FOREIGN, CORRUPT, HISTORY_PROBLEM = "gap", "foreign", "corrupt", "history"
DEEP_WORKERS = 8


@dataclass(frozen=True)
class Problem:
    kind: str  # GAP | FOREIGN | CORRUPT | HISTORY_PROBLEM
    message: str
    timeline: int | None = None
    first: int | None = None  # segment numbers, for gaps
    last: int | None = None
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TimelineReport:
    timeline: int
    #: the segments a recovery along this timeline needs, as ranges (empty: nothing required)
    required: Ranges
    #: what the index lists as archived on it
    archived: Ranges
    reachable: bool  # some backup lies on a path through this timeline
    missing: Ranges = field(default_factory=list)

    @property
    def required_count(self) -> int:
        return sum(b - a + 1 for a, b in self.required)

    def to_dict(self, segment_size: int) -> dict[str, Any]:
        return {
            "timeline": self.timeline,
            "reachable": self.reachable,
            "required": [
                [segment_name(self.timeline, a, segment_size), segment_name(self.timeline, b, segment_size)]
                for a, b in self.required
            ],
            "missing": [
                [segment_name(self.timeline, a, segment_size), segment_name(self.timeline, b, segment_size)]
                for a, b in self.missing
            ],
            "archived_segments": sum(b - a + 1 for a, b in self.archived),
        }


@dataclass
class VerifyReport:
    server: str
    system_identifier: str | None
    segment_size: int
    timelines: list[TimelineReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deep: bool = False
    objects_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, kind: str) -> int:
        return sum(1 for p in self.problems if p.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "ok": self.ok,
            "deep": self.deep,
            "system_identifier": self.system_identifier,
            "timelines": [t.to_dict(self.segment_size) for t in self.timelines],
            "problems": [p.to_dict() for p in self.problems],
            "notes": self.notes,
            "objects_checked": self.objects_checked,
        }


# -- timelines ---------------------------------------------------------------------------------------------


def check_histories(index: Index, timelines: set[int]) -> list[Problem]:
    problems: list[Problem] = []
    for tli in sorted(timelines):
        if tli > 1 and tli not in index.histories:
            problems.append(
                Problem(
                    HISTORY_PROBLEM,
                    f"timeline {tli} has WAL or backups but its history file {history_name(tli)} is not in the "
                    "archive: recovery cannot follow the switch to it",
                    timeline=tli,
                )
            )
    for tli, entries in sorted(index.histories.items()):
        name = history_name(tli)
        previous_tli, previous_lsn = 0, -1
        for e in entries:
            if e.timeline <= previous_tli or e.timeline >= tli:
                problems.append(
                    Problem(HISTORY_PROBLEM, f"{name} lists timeline {e.timeline} out of order", timeline=tli)
                )
                break
            if e.switchpoint < previous_lsn:
                problems.append(
                    Problem(
                        HISTORY_PROBLEM,
                        f"{name}: the switch point of timeline {e.timeline} ({format_lsn(e.switchpoint)}) is before "
                        f"the previous one ({format_lsn(previous_lsn)})",
                        timeline=tli,
                    )
                )
                break
            previous_tli, previous_lsn = e.timeline, e.switchpoint
        if not entries:
            problems.append(Problem(HISTORY_PROBLEM, f"{name} lists no parent timeline", timeline=tli))
            continue
        parent = entries[-1].timeline
        if parent > 1 and parent in index.histories:
            mine = [(e.timeline, e.switchpoint) for e in entries[:-1]]
            theirs = [(e.timeline, e.switchpoint) for e in index.histories[parent]]
            if mine != theirs:
                problems.append(
                    Problem(
                        HISTORY_PROBLEM,
                        f"{name} does not extend {history_name(parent)}: the two disagree about the ancestors of "
                        f"timeline {parent}",
                        timeline=tli,
                    )
                )
    return problems


def required_ranges(
    index: Index, backups: Sequence[BackupSummary], segment_size: int
) -> tuple[dict[int, Ranges], set[int]]:
    """Per timeline, the segments a recovery needs from the oldest backup on each timeline's path to the newest
    segment archived on it (the plan ``cloudbk restore`` would make); and the timelines some backup reaches."""
    required: dict[int, Ranges] = {}
    reachable: set[int] = set()
    timelines = set(index.segments) | set(index.histories) | {b.timeline for b in backups}
    for tli in sorted(timelines):
        path = timeline_path(index, tli)
        candidates = [b for b in backups if on_path(b, path)]
        if not candidates:
            continue
        oldest = min(candidates, key=lambda b: (b.begin_lsn, b.end_lsn))
        plan = plan_recovery(index, oldest, Target(), tli)
        reachable.update(span.timeline for span in plan.path)
        for stretch in plan.stretches:
            required.setdefault(stretch.timeline, []).append([stretch.first, stretch.last])
    return {t: merge(r) for t, r in required.items()}, reachable


def verify_index(index: Index, backups: Sequence[BackupSummary]) -> VerifyReport:
    """The index-only verification (see the module docstring). ``backups``: the complete backups."""
    segment_size = index.wal_segment_size or (backups[0].wal_segment_size if backups else DEFAULT_SEGMENT_SIZE)
    report = VerifyReport(index.server, index.system_identifier, segment_size)
    timelines = set(index.segments) | {b.timeline for b in backups}
    report.problems.extend(check_histories(index, timelines))
    if not backups:
        report.notes.append("there are no backups: verifying each timeline's archived WAL from its first segment")
        required = {t: [[r[0][0], r[-1][1]]] for t, r in index.segments.items() if r}
        reachable = set(required)
    else:
        required, reachable = required_ranges(index, backups, segment_size)
    for backup in backups:
        sysid = backup.system_identifier
        if sysid and index.system_identifier and sysid != index.system_identifier:
            report.problems.append(
                Problem(
                    FOREIGN,
                    f"backup {backup.id} belongs to database system {sysid}, the archive to {index.system_identifier}",
                    timeline=backup.timeline,
                )
            )
    for tli in sorted(set(required) | set(index.segments)):
        tr = TimelineReport(tli, required.get(tli, []), index.segments.get(tli, []), tli in reachable)
        for a, b in tr.required:
            tr.missing.extend(index.missing_segments(tli, a, b))
        for a, b in tr.missing:
            count = b - a + 1
            report.problems.append(
                Problem(
                    GAP,
                    f"timeline {tli}: {count} segment(s) missing, {segment_name(tli, a, segment_size)} .. "
                    f"{segment_name(tli, b, segment_size)}",
                    timeline=tli,
                    first=a,
                    last=b,
                )
            )
        if not tr.reachable and backups:
            report.notes.append(f"timeline {tli} is not reachable from any backup; its WAL was not required")
        report.timelines.append(tr)
    return report


# -- deep ------------------------------------------------------------------------------------------------


class _FirstBytes:
    """A sink keeping the first bytes of a stream (the segment's long page header)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.data = b""

    def __call__(self, chunk: bytes) -> None:
        if len(self.data) < self.limit:
            self.data += chunk[: self.limit - len(self.data)]


def _check_object(storage: Storage, key: str, index: Index, segment_size: int) -> list[Problem]:
    name = layout.wal_name_from_key(key)
    wal = parse_wal_name(name)
    first = _FirstBytes()
    chunks: list[bytes] = []  # a history file is kept whole: it is a few hundred bytes
    try:
        stored = read_object(storage, key, WAL, name, chunks.append if wal.kind == HISTORY else first)
    except NotFound:
        return [Problem(GAP, f"{name} disappeared while being verified", timeline=wal.timeline, key=key)]
    except CloudbkError as exc:
        if isinstance(exc, StorageError):  # storage failing after retries: not a verdict about the object
            raise
        return [Problem(CORRUPT, f"{name}: {exc.message}", timeline=wal.timeline, key=key)]
    problems: list[Problem] = []
    if wal.kind == HISTORY:
        try:
            entries = parse_history(b"".join(chunks).decode("utf-8", errors="replace"))
        except UsageError as exc:
            return [
                Problem(HISTORY_PROBLEM, f"{name} is not a valid history file: {exc.message}", wal.timeline, key=key)
            ]
        indexed = index.histories.get(wal.timeline)
        if indexed is not None and [(e.timeline, e.switchpoint) for e in indexed] != [
            (e.timeline, e.switchpoint) for e in entries
        ]:
            problems.append(
                Problem(
                    HISTORY_PROBLEM,
                    f"{name} differs from the index's copy; run `cloudbk reindex`",
                    wal.timeline,
                    key=key,
                )
            )
        return problems
    if wal.kind not in (SEGMENT, PARTIAL):
        return problems
    header = parse_segment_header(first.data)
    if header is None:
        return [Problem(CORRUPT, f"{name} does not start with a WAL long page header", timeline=wal.timeline, key=key)]
    sysid = str(header.system_identifier)
    if index.system_identifier is not None and sysid != index.system_identifier:
        problems.append(
            Problem(
                FOREIGN,
                f"{name} belongs to database system {sysid}, not to this archive's {index.system_identifier}: "
                "it is from another cluster and must not be replayed",
                timeline=wal.timeline,
                first=wal.segno(segment_size),
                last=wal.segno(segment_size),
                key=key,
            )
        )
    expected = wal.segno(header.segment_size) * header.segment_size
    if header.pageaddr != expected:
        problems.append(
            Problem(
                CORRUPT,
                f"{name} holds WAL from {format_lsn(header.pageaddr)}, not from {format_lsn(expected)} as its name "
                "says",
                timeline=wal.timeline,
                key=key,
            )
        )
    if wal.kind == SEGMENT and stored.size != header.segment_size:
        problems.append(
            Problem(CORRUPT, f"{name} is {stored.size} bytes, not a whole segment", timeline=wal.timeline, key=key)
        )
    return problems


def verify_deep(storage: Storage, index: Index, report: VerifyReport, workers: int = DEEP_WORKERS) -> VerifyReport:
    """Add the object-level checks to an index report (see the module docstring)."""
    report.deep = True
    server = index.server
    stored: dict[int, set[int]] = {}
    keys: list[str] = []
    unindexed = 0
    for info in storage.list(layout.wal_prefix(server)):
        name = layout.wal_name_from_key(info.key)
        try:
            wal = parse_wal_name(name)
        except UsageError:
            report.notes.append(f"{info.key} is not a WAL file name; ignored")
            continue
        if info.key != layout.wal_key(server, wal):
            report.notes.append(f"{info.key} is not where cloudbk stores {name}; ignored")
            continue
        keys.append(info.key)
        if wal.kind == SEGMENT:
            segno = wal.segno(report.segment_size)
            stored.setdefault(wal.timeline, set()).add(segno)
            if not index.has_segment(wal.timeline, segno):
                unindexed += 1
    if unindexed:
        report.notes.append(f"{unindexed} stored segment(s) are not in the index; run `cloudbk reindex`")

    # Segments the index promises (and recovery needs) but storage does not hold are gaps too.
    for tr in report.timelines:
        have = stored.get(tr.timeline, set())
        absent = runs(
            segno
            for a, b in tr.required
            for segno in range(a, b + 1)
            if segno not in have and index.has_segment(tr.timeline, segno)
        )
        for a, b in absent:
            tr.missing = merge([*tr.missing, [a, b]])
            report.problems.append(
                Problem(
                    GAP,
                    f"timeline {tr.timeline}: the index lists {segment_name(tr.timeline, a, report.segment_size)} .. "
                    f"{segment_name(tr.timeline, b, report.segment_size)} but storage does not hold them",
                    timeline=tr.timeline,
                    first=a,
                    last=b,
                )
            )

    lock = threading.Lock()

    def check(key: str) -> None:
        found = _check_object(storage, key, index, report.segment_size)
        with lock:
            report.objects_checked += 1
            report.problems.extend(found)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(check, k) for k in keys]:
            future.result()
    report.problems.sort(key=lambda p: _problem_order(p, report.segment_size))
    return report


def _problem_order(problem: Problem, segment_size: int) -> tuple[int, int, int, str]:
    """By timeline, then by position in WAL (from the key when the problem has no range), gaps first."""
    where = problem.first
    if where is None and problem.key is not None:
        wal = parse_wal_name(layout.wal_name_from_key(problem.key))
        where = wal.segno(segment_size) if wal.kind != HISTORY else -1
    kinds = (GAP, FOREIGN, CORRUPT, HISTORY_PROBLEM)
    return (problem.timeline or 0, -1 if where is None else where, kinds.index(problem.kind), problem.key or "")
