"""The drill's PostgreSQL server: the binaries of the backup's major version, started as the server's OS user
on the scratch directory, waited for, queried, and stopped by its PID; and any detached cloudbk worker
(prefetch, push-ahead) found under its ``pg_wal`` stopped by the PID in its lock file."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloudbk import background
from cloudbk.errors import DatabaseError, OperationFailed, UsageError

STOP_WAIT = 60.0  # seconds for a fast shutdown before an immediate one
WORKER_WAIT = 5.0
_DEBIAN_BIN = "/usr/lib/postgresql/{major}/bin"
_RPM_BIN = "/usr/pgsql-{major}/bin"


@dataclass(frozen=True)
class OsUser:
    name: str
    uid: int
    gid: int

    @property
    def owner(self) -> tuple[int, int] | None:
        """For chown, when we are root; None when we already are this user."""
        return (self.uid, self.gid) if os.geteuid() == 0 else None


def resolve_os_user(name: str | None) -> OsUser:
    """The user the server runs as: ``name``, else ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        if name is not None and name != me.pw_name:
            raise UsageError(f"--os-user {name}: only root can run the drill's server as another user")
        return OsUser(me.pw_name, me.pw_uid, me.pw_gid)
    wanted = name or "postgres"
    try:
        pw = pwd.getpwnam(wanted)
    except KeyError:
        raise UsageError(
            f"there is no OS user {wanted!r} to run the drill's server as",
            hint="PostgreSQL does not run as root: pass --os-user NAME",
        ) from None
    if pw.pw_uid == 0:
        raise UsageError("--os-user must not be root: PostgreSQL refuses to run as root")
    return OsUser(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _major_of(postgres: str) -> int | None:
    try:
        out = subprocess.run([postgres, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return None
    found = re.search(r"PostgreSQL\)?\s+(\d+)", out)  # "postgres (PostgreSQL) 15.18 (Debian 15.18-1)"
    return int(found.group(1)) if found else None


def _pg_config_bindir() -> str | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        proc = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    return proc.stdout.strip() or None


def find_binaries(major: int, pg_bin: str | None) -> str:
    """The directory holding ``postgres`` of PostgreSQL ``major``: ``--pg-bin``, else ``pg_config --bindir``,
    else ``postgres`` on PATH, else the Debian and RPM layouts."""
    if pg_bin is not None:
        candidates = [pg_bin]
    else:
        on_path = shutil.which("postgres")
        found = [_pg_config_bindir(), os.path.dirname(on_path) if on_path else None]
        candidates = [c for c in found if c] + [_DEBIAN_BIN.format(major=major), _RPM_BIN.format(major=major)]
    seen = []
    for bindir in candidates:
        postgres = os.path.join(bindir, "postgres")
        if not os.access(postgres, os.X_OK):
            continue
        version = _major_of(postgres)
        if version == major:
            return bindir
        seen.append(f"{postgres} is PostgreSQL {version}")
    raise OperationFailed(
        f"no PostgreSQL {major} server binaries found (the backup is of PostgreSQL {major})"
        + (f": {'; '.join(seen)}" if seen else ""),
        hint=f"install PostgreSQL {major}'s server package, or pass --pg-bin DIR (the directory holding postgres)",
    )


class DrillServer:
    """One ``postgres`` process over the scratch data directory, in a session of its own."""

    def __init__(self, bindir: str, datadir: str, args: Sequence[str], logfile: str, user: OsUser,
                 env: Mapping[str, str]) -> None:  # fmt: skip
        self.argv = [os.path.join(bindir, "postgres"), "-D", datadir, *args]
        self.datadir, self.logfile, self.user, self.env = datadir, logfile, user, dict(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.logfile, "ab") as log:
            root = os.geteuid() == 0
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.datadir,
                env=self.env, start_new_session=True,  # Ctrl-C reaches us, not the server: we stop it ourselves
                user=self.user.uid if root else None, group=self.user.gid if root else None,
                extra_groups=[] if root else None,
            )  # fmt: skip

    def exited(self) -> int | None:
        """The server's exit status once it has exited, else None."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID; immediate (SIGQUIT), then SIGKILL, if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, STOP_WAIT), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.kill(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def connect(socket_dir: str, port: int, user: str, dbname: str, timeout: int = 5) -> Any:
    """An autocommit psycopg connection over the drill's private socket; ``DatabaseError`` when refused."""
    import psycopg

    try:
        return psycopg.connect(host=socket_dir, port=port, user=user, dbname=dbname, connect_timeout=timeout,
                               autocommit=True, application_name="cloudbk drill")  # fmt: skip
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to the drill's server: {str(exc).strip()}") from exc


def _lock_held(lock: str) -> bool:
    return background.is_running(os.path.dirname(lock))


def stop_workers(datadir: str) -> list[int]:
    """SIGTERM (then SIGKILL) each detached cloudbk worker whose lock under ``pg_wal/cloudbk-*/`` is held,
    by the PID its lock file records (docs/wal.md); returns their PIDs."""
    stopped = []
    for lock in glob.glob(os.path.join(datadir, "pg_wal", "cloudbk-*", "**", "worker.lock"), recursive=True):
        if not _lock_held(lock):
            continue
        try:
            with open(lock, "rb") as f:
                pid = int(f.read().strip() or b"0")
        except (OSError, ValueError):
            continue
        if pid <= 1:
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + WORKER_WAIT
            while _lock_held(lock) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _lock_held(lock):
                break
        stopped.append(pid)
    return stopped
