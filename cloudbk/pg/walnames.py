"""Pure WAL vocabulary: file names, timelines, segment numbers and LSN arithmetic. No I/O.

A segment name is TTTTTTTTXXXXXXXXYYYYYYYY: timeline, then the segment number split into a "log" part and a
"seg" part, where one log holds 0x100000000 / wal_segment_size segments (256 for the default 16 MiB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cloudbk.errors import UsageError

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_XLOGID_BYTES = 0x100000000

_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_PARTIAL = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.partial$")
_BACKUP = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.([0-9A-F]{8})\.backup$")
_HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")

SEGMENT, PARTIAL, BACKUP_LABEL, HISTORY = "segment", "partial", "backup", "history"


@dataclass(frozen=True)
class WalName:
    """A parsed WAL archive file name."""

    name: str
    kind: str  # SEGMENT | PARTIAL | BACKUP_LABEL | HISTORY
    timeline: int
    log: int = 0  # high part of the segment number (not for history files)
    seg: int = 0  # low part

    def segno(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return self.log * segments_per_log(segment_size) + self.seg


def parse_wal_name(name: str) -> WalName:
    """Parse a name PostgreSQL hands to archive_command / restore_command; ``UsageError`` if it is none."""
    for pattern, kind in ((_SEGMENT, SEGMENT), (_PARTIAL, PARTIAL), (_BACKUP, BACKUP_LABEL)):
        m = pattern.match(name)
        if m:
            return WalName(name, kind, int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16))
    m = _HISTORY.match(name)
    if m:
        return WalName(name, HISTORY, int(m.group(1), 16))
    raise UsageError(
        f"{name!r} is not a WAL file name",
        hint="expected a segment (24 hex digits), NAME.partial, NAME.XXXXXXXX.backup or TTTTTTTT.history",
    )


def segments_per_log(segment_size: int) -> int:
    return _XLOGID_BYTES // segment_size


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per = segments_per_log(segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer LSN."""
    m = re.fullmatch(r"\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*", text)
    if not m:
        raise UsageError(f"{text!r} is not an LSN", hint="write an LSN as two hex numbers, e.g. 0/3000028")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_segno(lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment holding ``lsn``."""
    return lsn // segment_size


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a TTTTTTTT.history file: ``timeline`` ended (switched away) at ``switchpoint``."""

    timeline: int
    switchpoint: int
    reason: str = ""


def parse_history(text: str) -> list[HistoryEntry]:
    """Parse a timeline history file (PostgreSQL's readTimeLineHistory format); comments and blanks skipped."""
    entries: list[HistoryEntry] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2:
            raise UsageError(f"malformed timeline history line {raw!r}")
        try:
            tli = int(fields[0])
        except ValueError as exc:
            raise UsageError(f"malformed timeline history line {raw!r}") from exc
        entries.append(HistoryEntry(tli, parse_lsn(fields[1]), fields[2] if len(fields) > 2 else ""))
    return entries


@dataclass(frozen=True)
class SegmentHeader:
    """The long page header at the start of every WAL segment (XLogLongPageHeaderData, xlog_internal.h)."""

    magic: int
    timeline: int
    pageaddr: int
    system_identifier: int
    segment_size: int
    block_size: int


_LONG_HEADER_SIZE = 40


def parse_segment_header(data: bytes) -> SegmentHeader | None:
    """Decode the first 40 bytes of a segment; None if they do not look like a long page header."""
    import struct

    if len(data) < _LONG_HEADER_SIZE:
        return None
    # xlp_magic u16, xlp_info u16, xlp_tli u32, xlp_pageaddr u64, xlp_rem_len u32, (pad 4),
    # xlp_sysid u64, xlp_seg_size u32, xlp_xlog_blcksz u32 — little-endian on every platform we support
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = struct.unpack_from("<HHIQI4xQII", data)
    XLP_LONG_HEADER = 0x0002
    if not info & XLP_LONG_HEADER or seg_size == 0 or seg_size & (seg_size - 1):
        return None
    return SegmentHeader(magic, tli, pageaddr, sysid, seg_size, blcksz)
