"""Throwaway PostgreSQL 15 clusters for tests, run as the non-root ``postgres`` OS user.

PostgreSQL refuses to run as root, and archive_command / restore_command run as the server's user, so every
command that touches a cluster (and every cloudbk CLI call a test makes on its behalf) runs as that user.
Directories live under a world-accessible base directory (``/tmp/cloudbk-tests`` unless
``CLOUDBK_TEST_DIR`` says otherwise) because pytest's own tmp directories are private to root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.proc import free_port

PG_BIN = Path(os.environ.get("CLOUDBK_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = os.environ.get("CLOUDBK_PG_USER", "postgres")
BIN_DIR = Path(sys.executable).parent  # the virtualenv holding cloudbk's console scripts


def base_dir() -> Path:
    base = Path(os.environ.get("CLOUDBK_TEST_DIR", "/tmp/cloudbk-tests"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o777)
    return base


def new_dir(tag: str) -> Path:
    """A fresh directory owned by the PostgreSQL user."""
    path = base_dir() / f"{tag}-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    chown_to_pg(path)
    return path


def _as_pg_user() -> bool:
    return os.geteuid() == 0


def chown_to_pg(path: Path) -> None:
    if _as_pg_user():
        pw = pwd.getpwnam(PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def pg_command(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the PostgreSQL OS user (via runuser when we are root)."""
    if _as_pg_user():
        return ["runuser", "-u", PG_USER, "--", *argv]
    return list(argv)


def run_as_pg(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
    cwd: str | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PATH"] = f"{BIN_DIR}:{PG_BIN}:{full_env.get('PATH', '/usr/bin:/bin')}"
    proc = subprocess.run(
        pg_command(argv),
        env=full_env,
        capture_output=True,
        text=input is None,
        timeout=timeout,
        cwd=cwd or "/",
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def cloudbk(
    *args: str, env: Mapping[str, str] | None = None, check: bool = True, cwd: str | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``cloudbk`` console script as the PostgreSQL user."""
    return run_as_pg([str(BIN_DIR / "cloudbk"), *args], env=env, check=check, cwd=cwd, timeout=timeout)


class PgCluster:
    """One PostgreSQL 15 data directory and server on a free loopback port."""

    def __init__(self, datadir: Path, port: int | None = None, env: Mapping[str, str] | None = None) -> None:
        self.datadir = datadir
        self.port = port or free_port()
        self.env = dict(env or {})  # environment of the server: archive/restore commands inherit it
        self.logfile = datadir.parent / f"{datadir.name}.log"

    # -- lifecycle --------------------------------------------------------------------------------------

    @classmethod
    def init(cls, tag: str = "pg", env: Mapping[str, str] | None = None, initdb_args: Sequence[str] = ()) -> PgCluster:
        parent = new_dir(tag)
        cluster = cls(parent / "data", env=env)
        run_as_pg(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(cluster.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                *initdb_args,
            ]
        )
        cluster.configure(
            {
                "listen_addresses": "'127.0.0.1'",
                "port": str(cluster.port),
                "unix_socket_directories": f"'{parent}'",
                "fsync": "off",  # test speed; cloudbk's own fsyncs are what matter here
                "max_wal_senders": "4",
                "wal_level": "replica",
                "log_line_prefix": "'%m [%p] '",
            }
        )
        return cluster

    @property
    def socket_dir(self) -> str:
        return str(self.datadir.parent)

    def configure(self, settings: Mapping[str, str]) -> None:
        """Append settings to postgresql.conf (later lines win)."""
        lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
        run_as_pg(["sh", "-c", f"cat >> '{self.datadir}/postgresql.conf'"], input=lines.encode())

    def enable_archiving(self, command: str | None = None, timeout: int = 60) -> None:
        cmd = command or f"{BIN_DIR / 'cloudbk-wal-push'} %p"
        self.configure({"archive_mode": "on", "archive_command": f"'{cmd}'", "archive_timeout": str(timeout)})

    def start(self, wait: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-o", f"-p {self.port}"]
        argv += ["-w", "-t", "120"] if wait else ["-W"]
        return run_as_pg([*argv, "start"], env=self.env, check=check)

    def stop(self, mode: str = "fast", check: bool = False) -> None:
        run_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "120", "stop"], check=check)

    def is_running(self) -> bool:
        proc = run_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "status"], check=False)
        return proc.returncode == 0

    def destroy(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.datadir.parent, ignore_errors=True)

    # -- SQL --------------------------------------------------------------------------------------------

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def sql(self, query: str, dbname: str = "postgres", check: bool = True) -> str:
        """Run SQL through psql; returns unaligned tuples-only output, stripped."""
        proc = run_as_pg(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                dbname,
                "-c",
                query,
            ],
            check=check,
        )
        return proc.stdout.strip()

    def wait_for(self, query: str, expected: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                last = self.sql(query)
            except AssertionError as exc:
                last = str(exc)
            if last == expected:
                return
            time.sleep(0.3)
        raise AssertionError(
            f"waited {timeout}s for {query!r} to return {expected!r}; last: {last!r}\n{self.log_tail()}"
        )

    def wait_archived(self, timeout: float = 120) -> None:
        """Wait until the archiver has caught up with everything PostgreSQL has marked ready."""
        deadline = time.monotonic() + timeout
        status = self.datadir / "pg_wal" / "archive_status"
        while time.monotonic() < deadline:
            ready = run_as_pg(["sh", "-c", f"ls '{status}' | grep -c '\\.ready$' || true"]).stdout.strip()
            if ready == "0":
                return
            time.sleep(0.2)
        raise AssertionError(f"WAL not archived within {timeout}s\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = run_as_pg(["cat", str(self.logfile)], check=False).stdout
        except Exception:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
