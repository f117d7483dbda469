"""Helpers for the backup/restore tests: archiving clusters, backups and restores through the real CLI."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from backends import Backend
from pgcluster import BIN_DIR, PG_USER, PgCluster, cloudbk, new_dir

from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.storage.base import CREATE_ONLY, OVERWRITE, Storage


def repo_env(backend: Backend) -> dict[str, str]:
    """What a cloudbk process, or a PostgreSQL server running one, needs for ``backend``."""
    env = dict(backend.env)
    env["CLOUDBK_REPO"] = backend.url
    env["CLOUDBK_RETRY_DEADLINE"] = "30"
    return env


class Clusters:
    """Every cluster a test starts, destroyed at teardown even when the test fails."""

    def __init__(self) -> None:
        self.all: list[PgCluster] = []

    def archiving(
        self, backend: Backend, tag: str = "src", archive_command: str | None = None, initdb_args: tuple[str, ...] = ()
    ) -> PgCluster:
        env = repo_env(backend)
        pg = PgCluster.init(tag, env=env, initdb_args=initdb_args)
        self.all.append(pg)
        pg.enable_archiving(archive_command or f"{BIN_DIR / 'cloudbk-wal-push'} %p")
        pg.configure({"checkpoint_timeout": "'30min'", "max_wal_size": "'1GB'"})
        pg.start()
        return pg

    def restored(self, datadir: Path, backend: Backend, archive: bool = True) -> PgCluster:
        """A cluster over a restored data directory (not started)."""
        pg = PgCluster(datadir, env=repo_env(backend))
        pg.logfile = datadir.parent / f"{datadir.name}.log"
        settings = {"unix_socket_directories": f"'{datadir.parent}'"}
        if not archive:  # keep test restores from publishing timelines other restores would follow
            settings["archive_mode"] = "off"
        pg.configure(settings)
        self.all.append(pg)
        return pg

    def destroy_all(self) -> None:
        for pg in self.all:
            pg.destroy()


def backup_push(pg: PgCluster, backend: Backend, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cloudbk(
        "backup-push", "--dbname", pg.conninfo, "--pgdata", str(pg.datadir), *extra, env=repo_env(backend), check=check
    )


def take_backup(pg: PgCluster, backend: Backend) -> str:
    """A base backup; returns its id (the last line of stdout)."""
    return backup_push(pg, backend).stdout.strip().splitlines()[-1]


def restore(backend: Backend, dest: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cloudbk("restore", str(dest), *args, env=repo_env(backend), check=check)


def archive_all(pg: PgCluster) -> None:
    """Close the current segment and wait until everything is archived."""
    pg.sql("SELECT pg_switch_wal()")
    pg.wait_archived()


_SCRATCH: list[Path] = []


def scratch_dir(tag: str) -> Path:
    """A fresh directory owned by the PostgreSQL user, removed when the test ends (see conftest)."""
    path = new_dir(tag)
    _SCRATCH.append(path)
    return path


def remove_scratch_dirs() -> None:
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


def new_dest() -> Path:
    return scratch_dir("restore") / "data"


def start_and_promote(pg: PgCluster) -> None:
    pg.start()
    pg.wait_for("SELECT pg_is_in_recovery()", "f", timeout=180)


def current_timeline(pg: PgCluster) -> int:
    return int(pg.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)


def index_of(backend: Backend) -> Index:
    storage = backend.open()
    try:
        return load_index(storage, "main")
    finally:
        storage.close()


def phases(pg: PgCluster) -> list[str]:
    return pg.sql("SELECT string_agg(phase, ',' ORDER BY phase) FROM t").split(",")


def replace_object(backend: Backend, storage: Storage, key: str, data: bytes | None, create: bool = False) -> None:
    """Store ``data`` at ``key`` (None: delete it), as the PostgreSQL user would own it on the file backend."""
    if data is None:
        storage.delete_many([key])
        return
    storage.put_bytes(key, data, CREATE_ONLY if create else OVERWRITE)
    if backend.name == "file":
        pw = pwd.getpwnam(PG_USER)
        os.chown(backend.url.removeprefix("file://") + "/" + key, pw.pw_uid, pw.pw_gid)


def forget_segment(backend: Backend, segno: int) -> None:
    """Drop segment ``segno`` of timeline 1 from the index (as if its index update had been lost)."""

    def mutate(index: Index) -> bool:
        index.remove_segments(1, segno, segno)
        return True

    storage = backend.open()
    try:
        update_index(storage, "main", mutate)
    finally:
        storage.close()
