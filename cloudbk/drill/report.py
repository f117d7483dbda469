"""What a drill reports: the phases on one clock, the checks, the target reached, the bytes fetched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

PLAN, EXTRACT, REPLAY, STARTUP, CHECKS, CLEANUP = (
    "plan",
    "backup download + extract",
    "WAL fetch + replay",
    "start-up",
    "checks",
    "stop + clean up",
)


@dataclass
class Phase:
    name: str
    start: float  # seconds since the drill began
    end: float
    overlaps: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "start": round(self.start, 3), "end": round(self.end, 3),
                               "seconds": round(self.seconds, 3)}  # fmt: skip
        if self.overlaps:
            doc["overlaps"] = self.overlaps
        return doc


@dataclass
class CheckOutcome:
    name: str
    ok: bool
    sql: str | None = None
    result: Any = None
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "seconds"} | {
            "seconds": round(self.seconds, 3)
        }


class Clock:
    """One monotonic clock for every phase of a drill."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.wall_began = time.time()
        self.phases: list[Phase] = []

    def now(self) -> float:
        return time.monotonic() - self.began

    def from_wall(self, wall: float) -> float:
        """A wall-clock time (a log line's) on this clock."""
        return wall - self.wall_began

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.phases.append(Phase(name, start, self.now()))

    def add(self, name: str, start: float, end: float, overlaps: list[str] | None = None) -> None:
        self.phases.append(Phase(name, start, max(start, end), overlaps or []))


@dataclass
class DrillReport:
    server: str
    backup_id: str | None = None
    target: str = ""
    ok: bool = False
    error: str | None = None
    exit_code: int = 0
    phases: list[Phase] = field(default_factory=list)
    checks: list[CheckOutcome] = field(default_factory=list)
    rto_seconds: float | None = None  # from the start until the server accepted connections at the target
    total_seconds: float = 0.0
    backup_bytes: int = 0  # stored bytes of the backup's volumes, downloaded
    restored_bytes: int = 0  # bytes of files written
    wal_segments_fetched: int = 0  # from the server log's "restored log file" lines
    wal_bytes_fetched: int = 0  # their plain size (segments x segment size)
    reached_lsn: str | None = None
    reached_time: str | None = None  # the last replayed transaction's commit time
    timeline: int | None = None
    pg_bin: str | None = None
    port: int | None = None
    scratch: str | None = None
    kept: bool = False
    workers_stopped: list[int] = field(default_factory=list)
    proof: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.__dict__.items() if k not in ("phases", "checks", "exit_code")}
        doc["phases"] = [p.to_dict() for p in self.phases]
        doc["checks"] = [c.to_dict() for c in self.checks]
        doc["rto_seconds"] = None if self.rto_seconds is None else round(self.rto_seconds, 3)
        doc["total_seconds"] = round(self.total_seconds, 3)
        return doc
