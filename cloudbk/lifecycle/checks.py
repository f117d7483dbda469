"""``cloudbk check``: is this server's backup setup healthy right now? One result per check, Barman-style.

Checks, in order (a check that cannot run because an earlier one failed is left out, not reported as OK):

- ``repository``: the index can be read (the storage answers, the index parses), and the backups prefix can be
  listed with every manifest that needs reading (:func:`cloudbk.repo.catalog.load_catalog`); a missing index while
  backups or WAL are stored fails with a hint to run ``cloudbk reindex``.
- ``repository writable``: a probe object is created (create-only) and deleted again.
- ``PostgreSQL``: a connection succeeds (``--dbname`` or the libpq environment).
- ``archive_mode``: ``on`` or ``always``. ``wal_level``: ``replica`` or ``logical``.
- ``archive_command``: no ``archive_library`` is set, and the command runs ``cloudbk-wal-push %p`` (or
  ``cloudbk wal-push %p``); if it names ``--repo`` or ``--server``, they are the ones this check uses.
- ``continuous archiving``: ``pg_stat_archiver`` shows no failure newer than the last success.
- ``last archived WAL``: something was archived, the archiver is at most ``max_wal_lag`` segments behind
  the segment being written, and the last file PostgreSQL reports archived is in *this* repository (so the
  archive_command really writes here). Segments are used rather than time: an idle server legitimately
  archives nothing for hours.
- ``system identifier``: the server's equals the repository's.
- ``WAL continuity``: no gap in the WAL from the oldest backup to the newest segment, on any timeline, and
  consistent timeline histories (:func:`cloudbk.wal.verify.verify_index`, index only).
- ``backup objects``: no backup is damaged: every manifest is sound and every data object is listed with the
  stored size its manifest gives (from the one LIST above; re-reading the bytes is ``verify``'s job). Damaged
  backups are named, and not counted by the checks below.
- ``backup maximum age``: the newest backup ended less than ``max_backup_age`` ago.
- ``minimum redundancy requirements``: at least ``minimum_redundancy`` backups exist.
- ``last successful verify``, ``last successful drill``: when ``cloudbk verify`` and ``cloudbk drill`` last
  passed, from their proofs (one LIST, :mod:`cloudbk.repo.proofs`); they fail only when ``max_verify_age`` /
  ``max_drill_age`` is set and the last success is older, or there is none.
"""

from __future__ import annotations

import os
import shlex
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudbk.errors import CloudbkError
from cloudbk.lifecycle.retention import DEFAULT_MINIMUM_REDUNDANCY
from cloudbk.pg.conn import PgConnection
from cloudbk.pg.walnames import SEGMENT, parse_wal_name
from cloudbk.repo import layout
from cloudbk.repo.catalog import Catalog, damaged_hint, load_catalog
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import parse_time
from cloudbk.repo.proofs import DRILL, VERIFY, load_proofs, newest_ok
from cloudbk.storage.base import CREATE_ONLY, Storage
from cloudbk.wal.verify import GAP, verify_index

DEFAULT_MAX_BACKUP_AGE = timedelta(hours=36)  # a daily backup, plus slack for one that runs long
DEFAULT_MAX_WAL_LAG = 16  # segments waiting to be archived before the archiver counts as stuck
CONNECT_TIMEOUT = 10  # seconds; a check must answer, not hang on an unreachable host

_PUSH_WORDS = ("cloudbk-wal-push", "wal-push")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str = ""
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.hint:
            doc["hint"] = self.hint
        return doc


@dataclass(frozen=True)
class CheckOptions:
    repo: str = ""
    server: str = "main"
    conninfo: str | None = None
    max_backup_age: timedelta = DEFAULT_MAX_BACKUP_AGE
    minimum_redundancy: int = DEFAULT_MINIMUM_REDUNDANCY
    max_wal_lag: int = DEFAULT_MAX_WAL_LAG
    max_drill_age: timedelta | None = None  # None: report the last drill, never fail on its age
    max_verify_age: timedelta | None = None
    now: datetime | None = None


@dataclass
class CheckReport:
    server: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def add(self, name: str, ok: bool, detail: str = "", hint: str | None = None) -> CheckResult:
        result = CheckResult(name, ok, detail, hint)
        self.results.append(result)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"server": self.server, "ok": self.ok, "checks": [r.to_dict() for r in self.results]}


def _age(seconds: float) -> str:
    def unit(amount: float, name: str) -> str:
        text = f"{amount:.1f}".removesuffix(".0")
        return f"{text} {name}" + ("" if text == "1" else "s")

    if seconds < 120:
        return unit(round(seconds), "second")
    if seconds < 7200:
        return unit(round(seconds / 60), "minute")
    if seconds < 172800:
        return unit(seconds / 3600, "hour")
    return unit(seconds / 86400, "day")


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CloudbkError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


# -- PostgreSQL -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiverStats:
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None


class CheckConnection(PgConnection):
    """The few queries ``check`` needs beyond the base backup's."""

    def __init__(self, conninfo: str | None) -> None:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        text = conninfo or ""
        if "connect_timeout" not in conninfo_to_dict(text) and not os.environ.get("PGCONNECT_TIMEOUT"):
            text = make_conninfo(text, connect_timeout=str(CONNECT_TIMEOUT))
        super().__init__(text, application_name="cloudbk check")

    def archiver(self) -> ArchiverStats:
        rows = self._query(
            "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, "
            "last_failed_time FROM pg_stat_archiver"
        )
        archived, last_wal, last_time, failed, failed_wal, failed_time = rows[0]
        return ArchiverStats(int(archived), last_wal, last_time, int(failed), failed_wal, failed_time)

    def current_walfile(self) -> str | None:
        """The segment being written, or None on a standby (where it cannot be asked)."""
        if self.in_recovery():
            return None
        return str(self._one("SELECT pg_walfile_name(pg_current_wal_insert_lsn())"))

    def server_now(self) -> datetime:
        moment: datetime = self._one("SELECT now()")
        return moment


Connect = Callable[[str | None], CheckConnection]


def _archive_command_problem(command: str, repo: str, server: str) -> str | None:
    """Why ``command`` does not archive into this repository with cloudbk, or None if it does."""
    if not command.strip() or command.strip() == "(disabled)":
        return "archive_command is empty"
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    runs_push = any(w.endswith("cloudbk-wal-push") for w in words) or (
        any(w.endswith("cloudbk") for w in words) and "wal-push" in words
    )
    if not runs_push:
        return f"archive_command is {command!r}, which does not run cloudbk-wal-push"
    if "%p" not in words:
        return f"archive_command is {command!r}: it must pass %p (the WAL file's path) to cloudbk-wal-push"
    for flag, expected in (("--repo", repo), ("--server", server)):
        for i, w in enumerate(words):
            value = None
            if w == flag and i + 1 < len(words):
                value = words[i + 1]
            elif w.startswith(flag + "="):
                value = w.split("=", 1)[1]
            if value is not None and expected and value.rstrip("/") != expected.rstrip("/"):
                return f"archive_command archives with {flag} {value}, but this check uses {expected}"
    return None


def _check_postgres(
    report: CheckReport, options: CheckOptions, index: Index | None, storage: Storage | None, connect: Connect
) -> None:
    try:
        conn = connect(options.conninfo)
    except CloudbkError as exc:
        report.add(
            "PostgreSQL",
            False,
            exc.message,
            "pass --dbname 'host=... port=... user=...' or set PGHOST/PGPORT/PGUSER",
        )
        return
    with conn:
        try:
            _postgres_checks(report, options, index, storage, conn)
        except CloudbkError as exc:
            report.add("PostgreSQL", False, f"query failed: {exc.message}")


def _setting_check(report: CheckReport, conn: CheckConnection, name: str, allowed: tuple[str, ...], fix: str) -> None:
    """A server setting that must have one of the ``allowed`` values; ``fix`` says how (a restart follows)."""
    value = conn.setting(name)
    ok = value in allowed
    report.add(name, ok, "" if ok else f"{name} is {value!r}", None if ok else f"{fix} and restart PostgreSQL")


def _postgres_checks(
    report: CheckReport, options: CheckOptions, index: Index | None, storage: Storage | None, conn: CheckConnection
) -> None:
    report.add("PostgreSQL", True, f"version {conn.version}")
    _setting_check(report, conn, "archive_mode", ("on", "always"), "set archive_mode = on in postgresql.conf")
    _setting_check(report, conn, "wal_level", ("replica", "logical"), "set wal_level = replica")
    library = conn.setting("archive_library") if conn.version >= 150000 else ""
    command = conn.setting("archive_command")
    problem = (
        f"archive_library is {library!r}: it replaces archive_command, so cloudbk is not called"
        if library
        else _archive_command_problem(command, options.repo, options.server)
    )
    report.add(
        "archive_command",
        problem is None,
        problem or "",
        None if problem is None else "set archive_command = 'cloudbk-wal-push %p' and reload PostgreSQL",
    )

    stats = conn.archiver()
    failing = stats.last_failed_time is not None and (
        stats.last_archived_time is None or stats.last_failed_time > stats.last_archived_time
    )
    if failing:
        assert stats.last_failed_time is not None
        report.add(
            "continuous archiving",
            False,
            f"archiving {stats.last_failed_wal} failed at {stats.last_failed_time.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z "
            f"and nothing has been archived since ({stats.failed_count} failures since the statistics were reset)",
            "the PostgreSQL log shows the archive_command's error; WAL piles up in pg_wal until it is fixed",
        )
    else:
        report.add("continuous archiving", True, f"{stats.archived_count} archived, {stats.failed_count} failed")
    _check_last_archived(report, options, index, storage, conn, stats)

    if index is not None:
        sysid = conn.system_identifier()
        if index.system_identifier is None:
            report.add("system identifier", True, f"{sysid} (the repository holds no WAL yet)")
        else:
            same = index.system_identifier == sysid
            report.add(
                "system identifier",
                same,
                sysid
                if same
                else f"PostgreSQL is system {sysid}, the repository's server archives {index.system_identifier}",
                None if same else "each cluster needs its own --server name in a repository",
            )


def _check_last_archived(
    report: CheckReport,
    options: CheckOptions,
    index: Index | None,
    storage: Storage | None,
    conn: CheckConnection,
    stats: ArchiverStats,
) -> None:
    name = "last archived WAL"
    last = stats.last_archived_wal
    if last is None or stats.last_archived_time is None:
        report.add(name, False, "PostgreSQL has archived nothing yet", "run SELECT pg_switch_wal(); then check again")
        return
    age = (conn.server_now() - stats.last_archived_time).total_seconds()
    detail = f"{last}, {_age(max(age, 0.0))} ago"
    current = conn.current_walfile()
    try:
        wal = parse_wal_name(last)
    except CloudbkError:
        report.add(name, False, f"PostgreSQL reports {last!r} as archived, which is not a WAL file name")
        return
    if current is not None and wal.kind == SEGMENT:
        behind = parse_wal_name(current).segno() - wal.segno() - 1
        if behind > options.max_wal_lag:
            report.add(
                name,
                False,
                f"{detail}; {behind} segments are waiting to be archived (limit {options.max_wal_lag})",
                "the archiver is not keeping up or is stuck; see the PostgreSQL log",
            )
            return
    if storage is not None and index is not None:
        try:
            present = storage.exists(layout.wal_key(options.server, wal))
        except CloudbkError as exc:
            report.add(name, False, f"{detail}; cannot look it up in the repository: {exc.message}")
            return
        if not present:
            report.add(
                name,
                False,
                f"PostgreSQL reports {last} archived, but it is not in this repository",
                "archive_command writes somewhere else: compare its --repo/--server (or CLOUDBK_REPO/CLOUDBK_SERVER "
                "in the server's environment) with this check's",
            )
            return
    report.add(name, True, detail)


# -- the repository -----------------------------------------------------------------------------------------


def _check_repository(report: CheckReport, storage: Storage, options: CheckOptions) -> Catalog | None:
    """The ``repository`` and ``repository writable`` checks; the catalog when the repository can be read."""

    try:
        catalog = load_catalog(storage, options.server)
    except CloudbkError as exc:
        report.add("repository", False, _error_text(exc), exc.hint)
        return None
    if not catalog.index_found:
        report.add(
            "repository",
            False,
            f"{options.repo} holds no archive for server {options.server!r} (no {layout.index_key(options.server)})",
            "nothing was archived here yet, or --repo/--server (CLOUDBK_REPO/CLOUDBK_SERVER) name the wrong "
            "place; once archive_command works, run SELECT pg_switch_wal() and check again",
        )
        return None
    report.add("repository", True, options.repo)
    probe = layout.check_probe_key(options.server, uuid.uuid4().hex)
    try:
        storage.put_bytes(probe, b"cloudbk check\n", CREATE_ONLY)
        storage.delete(probe)
        report.add("repository writable", True)
    except CloudbkError as exc:
        report.add("repository writable", False, _error_text(exc), exc.hint)
    return catalog


def _check_backup_objects(report: CheckReport, catalog: Catalog) -> None:
    """Damaged backups (corrupt manifest, data object missing or not the size the manifest gives), by name."""

    damaged = sorted(catalog.damaged.items())
    if not damaged:
        report.add(
            "backup objects",
            True,
            f"{len(catalog.backups)} backups: manifests readable, data objects the size their manifests give",
        )
        return
    detail = "; ".join(f"backup {b} is damaged: {problem}" for b, problem in damaged)
    report.add("backup objects", False, detail + " (damaged backups are not counted)", damaged_hint(damaged[0][0]))


def run_checks(
    storage: Storage | None, options: CheckOptions, connect: Connect = CheckConnection, postgres: bool = True
) -> CheckReport:
    """Run every check; ``storage`` None means it could not even be opened (reported as unreachable)."""

    now = options.now or datetime.now(UTC)
    report = CheckReport(options.server)
    catalog: Catalog | None = None
    if storage is None:
        report.add("repository", False, f"cannot open {options.repo}")
    else:
        catalog = _check_repository(report, storage, options)
    index = None if catalog is None else catalog.index

    if postgres:
        _check_postgres(report, options, index, storage if index is not None else None, connect)

    if index is None or catalog is None:
        return report
    _check_backup_objects(report, catalog)
    backups = catalog.backups
    verify = verify_index(index, backups)
    if verify.ok:
        required = sum(t.required_count for t in verify.timelines)
        report.add("WAL continuity", True, f"{required} segments from the oldest backup, no gaps")
    else:
        first = verify.problems[:3]
        more = len(verify.problems) - len(first)
        detail = "; ".join(p.message for p in first) + (f"; and {more} more" if more > 0 else "")
        report.add(
            "WAL continuity",
            False,
            detail,
            "run `cloudbk wal-verify` for the full report"
            + ("; a gap means recovery stops there: take a new backup now" if verify.count(GAP) else ""),
        )

    limit = options.max_backup_age
    if not backups:
        report.add("backup maximum age", False, "there are no backups", "take one with `cloudbk backup-push`")
    else:
        newest = backups[-1]
        age = (now - parse_time(newest.end_time)).total_seconds()
        report.add(
            "backup maximum age",
            age <= limit.total_seconds(),
            f"newest backup {newest.id} is {_age(max(age, 0.0))} old (limit {_age(limit.total_seconds())})",
            None if age <= limit.total_seconds() else "backup-push is not running or failing; check its schedule",
        )
    have, want = len(backups), options.minimum_redundancy
    report.add(
        "minimum redundancy requirements",
        have >= want,
        f"have {have} backups, expected at least {want}",
        None if have >= want else "take more backups with `cloudbk backup-push`",
    )
    if storage is not None:
        _check_proofs(report, storage, options, now)
    return report


def _check_proofs(report: CheckReport, storage: Storage, options: CheckOptions, now: datetime) -> None:
    """``last successful verify`` and ``last successful drill``, failing only past a configured age."""
    try:
        states = load_proofs(storage, options.server)
    except CloudbkError as exc:
        report.add("last successful verify", False, f"cannot list the proofs: {_error_text(exc)}")
        return
    for kind, limit, command in ((VERIFY, options.max_verify_age, "verify"), (DRILL, options.max_drill_age, "drill")):
        proof = newest_ok(states, kind)
        allowed = "" if limit is None else f" (limit {_age(limit.total_seconds())})"
        name = f"last successful {kind}"
        hint = f"run `cloudbk {command}` (and schedule it: see the README)"
        if proof is None:
            report.add(name, limit is None, "never" + allowed, None if limit is None else hint)
            continue
        age = (now - proof.time).total_seconds()
        ok = limit is None or age <= limit.total_seconds()
        detail = f"backup {proof.backup_id}, {_age(max(age, 0.0))} ago{allowed}"
        report.add(name, ok, detail, None if ok else hint)
