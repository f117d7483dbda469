"""The PostgreSQL side of a base backup, over psycopg: imported only by commands that talk to a server.

A non-exclusive base backup lives in one session: ``pg_backup_start`` and ``pg_backup_stop`` (PostgreSQL
15+; ``pg_start_backup`` / ``pg_stop_backup`` with ``exclusive => false`` before) must run on the same
connection, and closing that connection aborts the backup on the server side.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from cloudbk.errors import DatabaseError, OperationFailed, UsageError
from cloudbk.pg.datadir import Tablespace
from cloudbk.pg.walnames import parse_lsn

MIN_VERSION = 130000  # pg_current_snapshot(), pg_backup_* low-level API without exclusive mode quirks


@dataclass(frozen=True)
class BackupStop:
    lsn: int
    backup_label: str
    tablespace_map: str


def pg_control_system_identifier(path: str) -> str:
    """The system identifier stored in a data directory's ``global/pg_control`` (its first 8 bytes)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise OperationFailed(f"{path} is too short to be a pg_control file", key=path)
    (sysid,) = struct.unpack("<Q", head)
    return str(sysid)


class PgConnection:
    """One autocommit session with the server being backed up."""

    def __init__(self, conninfo: str | None, application_name: str = "cloudbk") -> None:
        import psycopg

        try:
            self._conn: Any = psycopg.connect(conninfo or "", autocommit=True, application_name=application_name)
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot connect to PostgreSQL: {str(exc).strip()}",
                hint="pass --dbname 'host=... port=... user=...' or set PGHOST/PGPORT/PGUSER; "
                "the user needs the REPLICATION attribute or superuser (pg_backup_start)",
            ) from exc
        self.version: int = int(self._conn.info.server_version)
        if self.version < MIN_VERSION:
            self.close()
            raise UsageError(f"PostgreSQL {self.version} is not supported; cloudbk needs 13 or newer")

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            with self._conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        except psycopg.Error as exc:
            raise DatabaseError(f"PostgreSQL refused `{sql.split('(')[0].strip()}`: {str(exc).strip()}") from exc

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self._query(sql, params)
        return rows[0][0]

    # -- facts ----------------------------------------------------------------------------------------------

    def system_identifier(self) -> str:
        return str(self._one("SELECT system_identifier FROM pg_control_system()"))

    def setting(self, name: str) -> str:
        return str(self._one("SELECT setting FROM pg_settings WHERE name = %s", (name,)))

    def data_directory(self) -> str:
        return str(self._one("SELECT current_setting('data_directory')"))

    def in_recovery(self) -> bool:
        return bool(self._one("SELECT pg_is_in_recovery()"))

    def clock(self) -> datetime:
        """The server's clock: commit timestamps, and so recovery_target_time, are on this clock."""
        moment: datetime = self._one("SELECT clock_timestamp()")
        return moment

    def next_xid(self) -> int:
        """Every transaction id at or above this one has not started yet."""
        return int(self._one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"))

    def tablespaces(self) -> list[Tablespace]:
        rows = self._query(
            "SELECT oid, spcname, pg_tablespace_location(oid) FROM pg_tablespace "
            "WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid"
        )
        return [Tablespace(int(oid), str(name), str(location)) for oid, name, location in rows]

    def archiver_status(self) -> str:
        """pg_stat_archiver in one line, for error messages; never raises."""
        try:
            rows = self._query(
                "SELECT last_archived_wal, last_failed_wal, last_failed_time::text, failed_count FROM pg_stat_archiver"
            )
        except DatabaseError:
            return ""
        archived, failed, failed_at, count = rows[0]
        text = f"pg_stat_archiver: last archived {archived or 'none'}"
        if failed:
            text += f", last failed {failed} at {failed_at} ({count} failures)"
        return text

    # -- the backup -----------------------------------------------------------------------------------------

    def backup_start(self, label: str, fast: bool = True) -> int:
        if self.version >= 150000:
            lsn = self._one("SELECT pg_backup_start(%s, %s)::text", (label, fast))
        else:
            lsn = self._one("SELECT pg_start_backup(%s, %s, false)::text", (label, fast))
        return parse_lsn(str(lsn))

    def backup_stop(self) -> BackupStop:
        """End the backup without PostgreSQL's own unbounded wait for archiving (cloudbk waits, bounded)."""
        if self.version >= 150000:
            rows = self._query("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)")
        else:
            rows = self._query("SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)")
        lsn, label, spcmap = rows[0]
        return BackupStop(parse_lsn(str(lsn)), str(label or ""), str(spcmap or ""))


def parse_backup_label(text: str) -> dict[str, str]:
    """The ``KEY: value`` lines of a backup_label (START WAL LOCATION, START TIMELINE, ...)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields
