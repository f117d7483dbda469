"""The ``drill`` use case: restore a backup into a scratch directory, recover it, start it, check it, clean up.

1. **plan**: the backup and the WAL plan (:func:`cloudbk.backup.restore.prepare`), the PostgreSQL binaries of
   the backup's major version, a fresh scratch directory, and every check ``restore`` makes before writing
   (missing WAL, volumes, free space: :func:`cloudbk.backup.restore.preflight`); tablespaces go inside the
   scratch directory, never to their production locations.
2. **backup download + extract**: :func:`cloudbk.backup.restore.restore` (``recovery_target_action = promote``).
3. The server starts with the settings of :mod:`cloudbk.drill.settings` on its command line and fetches WAL
   through ``cloudbk-wal-fetch`` like any recovery. **WAL fetch + replay** runs from the start until the log
   says redo is done; **start-up** from the start until the promoted server accepts connections (the RTO).
4. **checks** (:mod:`cloudbk.drill.checks`), then **stop + clean up**: the server is stopped by its PID, any
   detached cloudbk worker under its ``pg_wal`` too, and the scratch directory is removed unless ``keep``.

Step 4's clean-up also runs on any error, Ctrl-C (``KeyboardInterrupt``) and SIGTERM (``Terminated``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cloudbk.backup.restore import RestoreOptions, preflight, prepare, restore
from cloudbk.backup.volumes import DEFAULT_JOBS
from cloudbk.drill import checks, settings
from cloudbk.drill.report import CHECKS, CLEANUP, EXTRACT, PLAN, REPLAY, STARTUP, Clock, DrillReport
from cloudbk.drill.server import DrillServer, OsUser, connect, find_binaries, resolve_os_user, stop_workers
from cloudbk.errors import CloudbkError, DatabaseError, ExitCode, OperationFailed
from cloudbk.progress import NoProgress, Progress
from cloudbk.repo.manifest import Manifest
from cloudbk.repo.pitr import Target
from cloudbk.storage.base import Storage

DEFAULT_TIMEOUT = 3600.0  # seconds from the server's start until it must accept connections at the target
_RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
_REDO_DONE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+) \[\d+\] LOG:  redo done at", re.M)


@dataclass
class DrillOptions:
    restore_command: str
    target: Target = field(default_factory=Target)
    backup_id: str | None = None
    check_sql: list[str] = field(default_factory=list)
    check_dbname: str = "postgres"
    check_user: str | None = None  # default: the OS user's name (initdb's default superuser)
    workdir: str | None = None
    pg_bin: str | None = None
    os_user: str | None = None
    keep_preload: bool = False
    keep: bool = False
    jobs: int = DEFAULT_JOBS
    timeout: float = DEFAULT_TIMEOUT
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _make_scratch(workdir: str | None, user: OsUser) -> str:
    """A new private directory for the drill, owned by the server's user."""
    parent = workdir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="cloudbk-drill-", dir=parent)
    for path in (scratch, os.path.join(scratch, "data"), os.path.join(scratch, "socket")):
        os.makedirs(path, mode=0o700, exist_ok=True)
        if user.owner is not None:
            os.chown(path, *user.owner)
    return scratch


class Drill:
    """One drill run; :meth:`run` never raises a :class:`CloudbkError`: it is in the report."""

    def __init__(self, storage: Storage, server: str, options: DrillOptions, progress: Progress | None = None):
        self.storage, self.server, self.options = storage, server, options
        self.progress = progress or NoProgress()
        self.clock = Clock()
        self.report = DrillReport(server=server, target=options.target.describe())
        self.scratch: str | None = None
        self.pg: DrillServer | None = None
        self.segment_size = 0

    def run(self) -> DrillReport:
        try:
            self._drill()
        except CloudbkError as exc:
            self.report.error = str(exc)
            self.report.exit_code = exc.exit_code
        except Exception as exc:  # a bug must not leave a server running: the clean-up below still runs
            self.report.error = f"unexpected error: {exc!r}"
            self.report.exit_code = ExitCode.OTHER
        finally:
            self._clean_up()
        failed = [c for c in self.report.checks if not c.ok]
        self.report.ok = self.report.error is None and bool(self.report.checks) and not failed
        if not self.report.ok and self.report.exit_code == 0:
            self.report.exit_code = ExitCode.FAILED
        return self.report

    def _drill(self) -> None:
        options, report = self.options, self.report
        with self.clock.phase(PLAN):
            user = resolve_os_user(options.os_user)
            restore_options = RestoreOptions(
                dest="", restore_command=options.restore_command, target=options.target, backup_id=options.backup_id,
                target_action="promote", jobs=options.jobs,
            )  # fmt: skip
            _index, plan, manifest = prepare(self.storage, self.server, restore_options)
            report.backup_id, report.backup_bytes = manifest.id, manifest.stored_size
            self.segment_size = manifest.wal_segment_size
            report.pg_bin = find_binaries(manifest.pg_version // 10000, options.pg_bin)
            self.scratch = report.scratch = _make_scratch(options.workdir, user)
            restore_options.dest = os.path.join(self.scratch, "data")
            restore_options.tablespace_mapping = {
                ts.location: os.path.join(self.scratch, "tablespaces", str(ts.oid)) for ts in manifest.tablespaces
            }
            preflight(self.storage, self.server, plan, manifest, restore_options)  # before a byte is written
        with self.clock.phase(EXTRACT):
            result = restore(self.storage, self.server, plan, manifest, restore_options, self.progress)
            report.restored_bytes = result.bytes
        launched = self._start(result.dest, manifest, user)
        accepted = self._wait_promoted(user)
        report.rto_seconds = accepted
        self.clock.add(STARTUP, launched, accepted, [REPLAY])
        self.clock.add(REPLAY, launched, self._redo_done() or accepted, [STARTUP])
        with self.clock.phase(CHECKS):
            report.checks = checks.run_checks(self._connector(user), options.check_dbname, options.check_sql)

    def _start(self, datadir: str, manifest: Manifest, user: OsUser) -> float:
        assert self.scratch is not None and self.report.pg_bin is not None
        settings.ensure_postgresql_conf(datadir, user.owner)
        with contextlib.suppress(FileNotFoundError):  # a backup of a standby: the drill recovers and promotes
            os.unlink(os.path.join(datadir, "standby.signal"))
        settings.write_auth_files(self.scratch, user.owner)
        self.report.port = _free_port()
        chosen = settings.safety_settings(datadir, self.scratch, self.report.port, os.path.join(self.scratch, "socket"),
                                          self.options.keep_preload, manifest.pg_version // 10000)  # fmt: skip
        chosen["lc_messages"] = "C"  # the log lines the drill reads are English
        chosen["log_line_prefix"] = "%m [%p] "
        env = dict(self.options.environ)
        logfile = os.path.join(self.scratch, "server.log")
        self.pg = DrillServer(self.report.pg_bin, datadir, settings.command_line(chosen), logfile, user, env)
        launched = self.clock.now()
        self.pg.start()
        return launched

    def _connector(self, user: OsUser) -> checks.Connect:
        assert self.scratch is not None and self.report.port is not None
        socket_dir, port = os.path.join(self.scratch, "socket"), self.report.port
        name = self.options.check_user or user.name
        return lambda dbname: connect(socket_dir, port, name, dbname)

    def _wait_promoted(self, user: OsUser) -> float:
        """Seconds on the drill's clock when the promoted server first accepted a connection; raises when the
        server stops first (recovery failed: storage gone, WAL missing, target not reached) or in time."""
        assert self.pg is not None
        open_connection = self._connector(user)
        deadline = time.monotonic() + self.options.timeout
        while True:
            status = self.pg.exited()
            if status is not None:
                raise OperationFailed(
                    f"the drill's server stopped during recovery (exit status {status}); the end of its log:\n"
                    + self.pg.log_tail(),
                    key=self.pg.logfile,
                    hint="the backup or the WAL it needs could not be recovered; --keep keeps the scratch directory",
                )
            try:
                with open_connection(self.options.check_dbname) as conn:
                    row = conn.execute(
                        "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
                        "pg_last_xact_replay_timestamp(), substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
                    ).fetchone()
                if row is not None and not row[0]:
                    at = self.clock.now()
                    self.report.reached_lsn = row[1]
                    self.report.reached_time = None if row[2] is None else row[2].isoformat()
                    self.report.timeline = int(row[3], 16)
                    return at
            except DatabaseError:
                pass  # starting up or recovering (no hot standby): try again
            if time.monotonic() > deadline:
                raise OperationFailed(
                    f"the drill's server did not accept connections within {self.options.timeout:.0f}s"
                )
            time.sleep(0.2)

    def _log(self) -> str:
        if self.pg is None:
            return ""
        try:
            with open(self.pg.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _redo_done(self) -> float | None:
        """When the log says redo ended, on the drill's clock."""
        found = _REDO_DONE.search(self._log())
        if found is None:
            return None
        stamp, zone = found.group(1).rsplit(" ", 1)
        try:
            moment = datetime.strptime(f"{stamp} {'+0000' if zone == 'UTC' else zone}", "%Y-%m-%d %H:%M:%S.%f %z")
        except ValueError:
            return None
        return self.clock.from_wall(moment.timestamp())

    def _clean_up(self) -> None:
        start = self.clock.now()
        report = self.report
        try:
            if self.pg is not None:
                self.pg.stop()
                segments = set(_RESTORED.findall(self._log()))
                report.wal_segments_fetched = len(segments)
                report.wal_bytes_fetched = len(segments) * self.segment_size
            if self.scratch is not None:
                report.workers_stopped = stop_workers(os.path.join(self.scratch, "data"))
                if self.options.keep:
                    report.kept = True
                else:
                    shutil.rmtree(self.scratch, ignore_errors=True)
        finally:
            report.total_seconds = self.clock.now()
            self.clock.add(CLEANUP, start, report.total_seconds)
            report.phases = sorted(self.clock.phases, key=lambda p: (p.start, p.end))


def run_drill(storage: Storage, server: str, options: DrillOptions, progress: Progress | None = None) -> DrillReport:
    return Drill(storage, server, options, progress).run()
