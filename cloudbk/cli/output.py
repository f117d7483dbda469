"""Output shared by the commands: sizes, tables, a backup's description (backup-list, backup-show), and progress
(a bar on a terminal, a few log lines otherwise, so cron mail and container logs stay readable)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the WAL commands import this module for human_size: keep it light
    from cloudbk.repo.index import Index
    from cloudbk.repo.manifest import BackupSummary

log = logging.getLogger("cloudbk")

LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal
BAR_INTERVAL = 0.2


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def describe_backup(index: Index, backup: BackupSummary) -> dict[str, Any]:
    """A backup's summary plus how far the archive reaches from it without a gap."""
    from cloudbk.repo.pitr import wal_after

    reach = wal_after(index, backup)
    doc = backup.to_dict()
    doc["compression_ratio"] = round(backup.ratio, 2)
    doc["wal_after"] = {
        "segments": reach.segments,
        "last_segment": reach.last,
        "first_gap": reach.gap,
        "restorable": reach.consistent,
    }
    return doc


def proof_text(proof: dict[str, Any] | None) -> str:
    """A backup's last verify or drill (``cloudbk.repo.proofs.describe``) in a few words."""
    if proof is None:
        return "never"
    when = str(proof["last"])[:16].replace("T", " ")
    if proof["last_ok"]:
        return when
    since = proof["last_success"]
    return f"{when} FAILED" + (f" (ok {str(since)[:10]})" if since else "")


def wal_text(doc: dict[str, Any]) -> str:
    wal = doc["wal_after"]
    if not wal["restorable"]:
        return f"MISSING {wal['first_gap']}"
    text = f"to {wal['last_segment']}"
    if wal["first_gap"]:
        text += f" (gap at {wal['first_gap']})"
    return text


class ConsoleProgress:
    """Implements :class:`cloudbk.progress.Progress`; thread-safe."""

    def __init__(self, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._bar = self._stream.isatty() if bar is None else bar
        self._lock = threading.Lock()
        self._what = ""
        self._total = 0
        self._done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def start(self, what: str, total: int) -> None:
        with self._lock:
            self._what, self._total, self._done = what, total, 0
            self._start = self._last = time.monotonic()
        if not self._bar:
            log.info("%s: %s to copy", what, human_size(total))

    def advance(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = time.monotonic()
            interval = BAR_INTERVAL if self._bar else LOG_INTERVAL
            if now - self._last < interval:
                return
            self._last = now
            self._report(now)

    def _rate(self, now: float) -> float:
        return self._done / max(now - self._start, 1e-6)

    def _report(self, now: float) -> None:
        rate = self._rate(now)
        pct = 100.0 * self._done / self._total if self._total else 0.0
        if self._bar:
            width = 30
            filled = min(width, int(width * pct / 100))
            eta = (self._total - self._done) / rate if rate > 0 and self._total > self._done else 0
            line = (
                f"\r{self._what} [{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}% "
                f"{human_size(self._done)} / {human_size(self._total)}  {human_size(rate)}/s  ETA {human_duration(eta)}"
            )
            self._stream.write(line.ljust(100)[:160])
            self._stream.flush()
            self._drawn = True
        else:
            log.info("%s: %s of %s (%.0f%%), %s/s", self._what, human_size(self._done), human_size(self._total), pct,
                     human_size(rate))  # fmt: skip

    def note(self, text: str) -> None:
        with self._lock:
            self._clear()
        log.info("%s", text)

    def _clear(self) -> None:
        if self._drawn:
            self._stream.write("\r" + " " * 100 + "\r")
            self._stream.flush()
            self._drawn = False

    def finish(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self._bar:
                self._report(now)
                self._stream.write("\n")
                self._stream.flush()
                self._drawn = False
            seconds = now - self._start
            log.info("%s: %s in %s (%s/s)", self._what, human_size(self._done), human_duration(seconds),
                     human_size(self._rate(now)))  # fmt: skip
