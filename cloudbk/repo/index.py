"""The per-server index: one JSON object listing the backups and the WAL archive per timeline.

A point-in-time lookup reads this one object instead of listing thousands of keys. The index is a cache of
what the objects themselves say: data objects are made durable first, then the index is updated by
compare-and-swap (read with its version, change, write ``IfVersion``; on conflict read again and re-apply),
so concurrent writers never lose an entry. ``cloudbk reindex`` rebuilds it from the objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloudbk.errors import (
    AlreadyExists,
    IntegrityError,
    NotFound,
    PreconditionFailed,
    StorageError,
    UnreadableIndex,
    refuse_newer_format,
)
from cloudbk.pg.walnames import HistoryEntry, format_lsn, parse_lsn
from cloudbk.repo import layout, ranges
from cloudbk.repo.ranges import Ranges
from cloudbk.storage.backoff import RetryPolicy
from cloudbk.storage.base import CREATE_ONLY, IfVersion, Storage

INDEX_FORMAT_VERSION = 1
CAS_DEADLINE = 120.0  # seconds of conflicts before giving up; each round trip is one read + one write
CAS_FIRST_DELAY, CAS_MAX_DELAY = 0.01, 0.5  # backoff after a lost race: short, the winner is already done


def format_index_time(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds and a Z: sortable as text (``updated_at``, ``last_push``)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Index:
    server: str
    system_identifier: str | None = None
    wal_segment_size: int | None = None
    #: timeline -> ranges of segment numbers archived
    segments: dict[int, Ranges] = field(default_factory=dict)
    #: timeline -> the entries of its history file (the switch points of its ancestors)
    histories: dict[int, list[HistoryEntry]] = field(default_factory=dict)
    #: other archived files by name: .partial, .backup labels (history files are in ``histories``)
    other_files: list[str] = field(default_factory=list)
    #: backup id -> summary of its manifest (see cloudbk.repo.manifest)
    backups: dict[str, dict[str, Any]] = field(default_factory=dict)
    updated_at: str = ""
    format_version: int = INDEX_FORMAT_VERSION
    #: timeline -> when its newest segment was pushed (UTC, as ``updated_at``): an upper bound of the times a
    #: recovery along it can reach. Missing for timelines last pushed by a cloudbk that did not record it.
    last_push: dict[int, str] = field(default_factory=dict)

    # -- WAL ----------------------------------------------------------------------------------------------

    def add_segments(self, timeline: int, first: int, last: int | None = None) -> bool:
        return ranges.add(self.segments.setdefault(timeline, []), first, first if last is None else last)

    def remove_segments(self, timeline: int, first: int, last: int) -> None:
        present = self.segments.get(timeline)
        if present is not None:
            ranges.remove(present, first, last)
            if not present:
                del self.segments[timeline]

    def record_push(self, timeline: int, moment: datetime) -> bool:
        """Note that a new segment of ``timeline`` was pushed at ``moment``; the bound only moves forward."""
        text = format_index_time(moment)
        if self.last_push.get(timeline, "") >= text:
            return False
        self.last_push[timeline] = text
        return True

    def has_segment(self, timeline: int, segno: int) -> bool:
        return any(a <= segno <= b for a, b in self.segments.get(timeline, []))

    def missing_segments(self, timeline: int, first: int, last: int) -> Ranges:
        return ranges.gaps(self.segments.get(timeline, []), first, last)

    def add_other_file(self, name: str) -> bool:
        if name in self.other_files:
            return False
        self.other_files.append(name)
        self.other_files.sort()
        return True

    def add_history(self, timeline: int, entries: list[HistoryEntry]) -> bool:
        if self.histories.get(timeline) == entries:
            return False
        self.histories[timeline] = list(entries)
        return True

    # -- serialisation ------------------------------------------------------------------------------------

    def to_json(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "server": self.server,
            "system_identifier": self.system_identifier,
            "wal_segment_size": self.wal_segment_size,
            "updated_at": self.updated_at,
            "wal": {f"{tli:08X}": self._wal_entry(tli, segs) for tli, segs in sorted(self.segments.items())},
            "histories": {
                f"{tli:08X}": [
                    {"timeline": e.timeline, "switchpoint": format_lsn(e.switchpoint), "reason": e.reason}
                    for e in entries
                ]
                for tli, entries in sorted(self.histories.items())
            },
            "other_files": self.other_files,
            "backups": dict(sorted(self.backups.items())),
        }
        return json.dumps(doc, indent=1, sort_keys=False).encode()

    def _wal_entry(self, timeline: int, segs: Ranges) -> dict[str, Any]:
        entry: dict[str, Any] = {"segments": segs}
        if timeline in self.last_push:
            entry["last_push"] = self.last_push[timeline]
        return entry

    @classmethod
    def from_json(cls, data: bytes, key: str) -> Index:
        try:
            doc = json.loads(data)
            version = int(doc.get("format_version", 0))
            refuse_newer_format("index", key, version, INDEX_FORMAT_VERSION)
            return cls(
                server=str(doc["server"]),
                system_identifier=doc.get("system_identifier"),
                wal_segment_size=doc.get("wal_segment_size"),
                segments={int(t, 16): [[int(a), int(b)] for a, b in v["segments"]] for t, v in doc["wal"].items()},
                histories={
                    int(t, 16): [
                        HistoryEntry(int(e["timeline"]), parse_lsn(e["switchpoint"]), e.get("reason", "")) for e in v
                    ]
                    for t, v in doc.get("histories", {}).items()
                },
                other_files=list(doc.get("other_files", [])),
                backups=dict(doc.get("backups", {})),
                updated_at=str(doc.get("updated_at", "")),
                format_version=version,
                last_push={int(t, 16): str(v["last_push"]) for t, v in doc["wal"].items() if v.get("last_push")},
            )
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnreadableIndex(
                f"index {key} is unreadable: {exc}",
                key=key,
                hint="run `cloudbk reindex` to rebuild it from the objects",
            ) from exc


def load_index(storage: Storage, server: str) -> Index:
    """The current index, or an empty one if none has been written yet."""
    key = layout.index_key(server)
    try:
        data = storage.get_bytes(key)
    except NotFound:
        return Index(server=server)
    return Index.from_json(data, key)


def update_index(
    storage: Storage,
    server: str,
    mutate: Callable[[Index], bool],
    deadline: float = CAS_DEADLINE,
    replace_unreadable: bool = False,
) -> Index:
    """Apply ``mutate`` to the index with compare-and-swap, retrying lost races (the one retry mechanism,
    :meth:`cloudbk.storage.backoff.RetryPolicy.retry`, for ``deadline`` seconds or a whole call's deadline).

    ``mutate`` changes the index in place and returns True if it changed anything (False skips the write).
    It may run several times, each time on a freshly read index, so it must be idempotent.
    ``replace_unreadable`` (for ``cloudbk reindex`` only) gives ``mutate`` an empty index in place of one that
    does not parse, and the write replaces the damaged object only if it is still that version.
    """
    key = layout.index_key(server)

    def attempt() -> Index:
        try:
            data, version = storage.get_bytes_versioned(key)
            current: str | None = version
            try:
                index: Index = Index.from_json(data, key)
            except UnreadableIndex:
                if not replace_unreadable:
                    raise
                index = Index(server=server)
        except NotFound:
            index, current = Index(server=server), None
        if not mutate(index):
            return index
        index.updated_at = format_index_time(datetime.now(UTC))
        storage.put_bytes(key, index.to_json(), CREATE_ONLY if current is None else IfVersion(current))
        return index

    def give_up(exc: StorageError, attempts: int, seconds: float) -> Exception:
        return StorageError(
            f"could not update index {key}: {attempts} conflicting updates in {seconds:.0f}s",
            key=key,
            hint="too many concurrent writers; the data is stored, run `cloudbk reindex` later",
        )

    policy = RetryPolicy(deadline=deadline, initial_delay=CAS_FIRST_DELAY, max_delay=CAS_MAX_DELAY)
    return policy.retry(attempt, (PreconditionFailed, AlreadyExists), give_up)
