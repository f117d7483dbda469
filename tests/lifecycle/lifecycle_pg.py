"""A PostgreSQL site for the lifecycle tests: a primary archiving into a repository with cloudbk, base backups
taken with ``cloudbk backup-push``, and failovers (``cloudbk restore`` + promotion) that make new timelines.
Every cloudbk call is the installed CLI run as the ``postgres`` OS user, as cron or a sidecar would run it."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from backends import Backend
from pgcluster import PgCluster, cloudbk, new_dir

from cloudbk.pg.walnames import parse_wal_name
from cloudbk.repo import layout
from cloudbk.repo.manifest import parse_time
from cloudbk.storage.base import Storage


def backend_env(backend: Backend, **extra: str) -> dict[str, str]:
    env = dict(backend.env)
    env["CLOUDBK_REPO"] = backend.url
    env["CLOUDBK_RETRY_DEADLINE"] = "20"
    env.update(extra)
    return env


@dataclass
class Site:
    backend: Backend
    env: dict[str, str]
    primary: PgCluster
    clusters: list[PgCluster] = field(default_factory=list)
    rows: int = 0

    @classmethod
    def create(cls, backend: Backend, **env: str) -> Site:
        site_env = backend_env(backend, **env)
        primary = PgCluster.init("lc-primary", env=site_env)
        primary.enable_archiving()
        primary.start()
        site = cls(backend, site_env, primary, [primary])
        primary.sql("create table t (phase int, i int, pad text)")
        return site

    def destroy(self) -> None:
        for cluster in self.clusters:
            cluster.destroy()

    # -- cloudbk -------------------------------------------------------------------------------------------

    def cloudbk(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        return cloudbk(*args, env={**self.env, **env}, check=check)

    def backup(self) -> str:
        out = self.cloudbk("backup-push", "--dbname", self.primary.conninfo)
        return out.stdout.strip().splitlines()[-1]

    def backups(self) -> list[dict[str, Any]]:
        """The backups as `backup-list --json` lists them, oldest first."""
        listed = json.loads(self.cloudbk("backup-list", "--json").stdout)
        entries: list[dict[str, Any]] = listed if isinstance(listed, list) else listed["backups"]
        return entries

    def retention(self, *args: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cloudbk("retention", "--json", *args).stdout)
        return result

    def wal_verify(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cloudbk("wal-verify", *args, check=False)

    # -- PostgreSQL ----------------------------------------------------------------------------------------

    def churn(self, segments: int = 2, rows: int = 500) -> None:
        """Write rows and finish ``segments`` WAL segments."""
        for _ in range(segments):
            self.primary.sql(
                f"insert into t select 1, g, md5(g::text) from generate_series({self.rows + 1}, {self.rows + rows}) g; "
                "select pg_switch_wal()"
            )
            self.rows += rows

    def settle(self) -> None:
        """Finish the current segment and wait until everything is archived."""
        self.primary.sql("select pg_switch_wal()")
        self.primary.wait_archived()

    def restore(self, backup_id: str | None = None, archive: bool = False) -> PgCluster:
        """``cloudbk restore`` into a new data directory and start it: recovery replays the archive, then promotes.

        With ``archive`` the restored server archives its new timeline into the same repository (a failover);
        otherwise archiving is off (a restore test that must not touch the repository)."""
        parent = new_dir("lc-restore")
        datadir = parent / "data"
        args = ["restore", str(datadir)]
        if backup_id is not None:
            args += ["--backup", backup_id]
        self.cloudbk(*args)
        cluster = PgCluster(datadir, env=self.env)
        self.clusters.append(cluster)
        cluster.configure({"port": str(cluster.port), "unix_socket_directories": f"'{parent}'"})
        if not archive:
            cluster.configure({"archive_mode": "off"})
        cluster.start()
        cluster.wait_for("select pg_is_in_recovery()", "f")
        return cluster

    def failover(self) -> int:
        """The primary goes away after archiving everything; the newest backup is restored and promoted in its
        place, on a new timeline. Returns the new timeline."""
        self.settle()
        self.primary.stop()
        self.primary = self.restore(archive=True)
        assert self.primary.sql("select count(*) from t") == str(self.rows)
        timeline = int(self.primary.sql("select timeline_id from pg_control_checkpoint()"))
        self.settle()
        return timeline


def summary(site: Site, backup_id: str) -> dict[str, Any]:
    return next(b for b in site.backups() if b["id"] == backup_id)


def all_keys(storage: Storage, prefix: str = "") -> set[str]:
    return {info.key for info in storage.list(prefix)}


def wal_segno(key: str, segment_size: int) -> int | None:
    """The segment number of a WAL key (None for history files)."""
    wal = parse_wal_name(layout.wal_name_from_key(key))
    return None if wal.kind == "history" else wal.segno(segment_size)


def end_time(entry: dict[str, Any]) -> float:
    return parse_time(entry["end_time"]).timestamp()
