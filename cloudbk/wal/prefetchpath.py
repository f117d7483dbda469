"""Which segments the prefetcher downloads: the target timeline's history, and the recovery settings that name
it. Pure, except :func:`target_timeline_setting`, which reads the server's configuration files.

PostgreSQL (14 and later, ``XLogFileReadAnyTLI``) reads segment S from the newest timeline of the target's
history that had begun by S: timeline ``t`` serves from the segment holding its begin (its parent's switch
point) on. The prefetcher follows exactly that path, so the names it spools are the names PostgreSQL asks for
(:func:`ahead`); it never guesses a timeline the history does not name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cloudbk.pg.walnames import HistoryEntry, lsn_segno, segment_name

LATEST, CURRENT = "latest", "current"
_SETTING = re.compile(r"^\s*recovery_target_timeline\s*=?\s*('(?:[^']|'')*'|[^\s#]+)")


def target_timeline_setting(datadir: str) -> str:
    """``recovery_target_timeline`` from ``postgresql.conf`` then ``postgresql.auto.conf`` (the last setting
    wins, as in PostgreSQL); ``latest`` (the default since PostgreSQL 12) when neither sets it. Included files are
    not followed: a setting there is missed, and the prefetcher then follows ``latest`` (at worst it downloads
    segments PostgreSQL does not ask for; it never serves a name PostgreSQL did not ask for)."""
    value = LATEST
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            with open(os.path.join(datadir, name), encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = _SETTING.match(line)
            if m:
                raw = m.group(1)
                value = raw[1:-1].replace("''", "'") if raw.startswith("'") else raw
    return value.strip().lower() or LATEST


@dataclass(frozen=True)
class TimelinePath:
    """The timelines recovery towards ``target`` reads, oldest first: (timeline, first segment it serves)."""

    target: int
    spans: tuple[tuple[int, int], ...]

    def timeline_for(self, segno: int) -> int:
        chosen = self.spans[0][0]
        for timeline, first in self.spans:
            if first <= segno:
                chosen = timeline
        return chosen


def timeline_path(target: int, history: Sequence[HistoryEntry], segment_size: int) -> TimelinePath:
    """The path to ``target`` from its history file's entries (ancestors and their switch points)."""
    spans: list[tuple[int, int]] = []
    begin = 0
    for entry in sorted(history, key=lambda e: e.timeline):
        if entry.timeline >= target:
            break
        spans.append((entry.timeline, lsn_segno(begin, segment_size)))
        begin = entry.switchpoint
    spans.append((target, lsn_segno(begin, segment_size)))
    return TimelinePath(target, tuple(spans))


def ahead(path: TimelinePath, after: int, count: int, segment_size: int, stop: int | None = None) -> list[str]:
    """The ``count`` segment names after segment number ``after`` along ``path``, short of ``stop``."""
    last = after + count if stop is None else min(after + count, stop - 1)
    return [segment_name(path.timeline_for(n), n, segment_size) for n in range(after + 1, last + 1)]
