"""A real PostgreSQL 15 server archiving with ``archive_command = 'cloudbk-wal-push %p'`` on every backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backends import Backend
from pgcluster import PgCluster, run_as_pg
from walhelpers import cloudbk_env

from cloudbk.pg.walnames import parse_wal_name
from cloudbk.repo import layout
from cloudbk.repo.index import load_index
from cloudbk.wal.fetch import fetch_wal

SWITCHES = 20


def test_archive_command_archives_every_segment_byte_for_byte(
    pg_backend: Backend, pg_dirs: Callable[[str], Path]
) -> None:
    env = cloudbk_env(pg_backend)
    cluster = PgCluster.init("arch", env=env, initdb_args=("--no-sync",))
    # keep every segment in pg_wal so the archived copies can be compared with the originals
    cluster.configure({"wal_keep_size": "'1GB'", "checkpoint_timeout": "'1h'"})
    cluster.enable_archiving("cloudbk-wal-push %p")
    cluster.start()
    try:
        cluster.sql("create table t (i int, pad text)")
        for n in range(SWITCHES):
            rows = f"generate_series({n * 1000}, {n * 1000 + 999})"
            cluster.sql(f"insert into t select g, repeat(md5(g::text), 8) from {rows} g")
            cluster.sql("select pg_switch_wal()")
        cluster.wait_archived()
        stats = cluster.sql("select archived_count, failed_count from pg_stat_archiver")
        archived_count, failed_count = (int(x) for x in stats.split("|"))
        assert failed_count == 0, cluster.log_tail()
        assert archived_count >= SWITCHES

        status = cluster.datadir / "pg_wal" / "archive_status"
        done = sorted(p.name.removesuffix(".done") for p in status.iterdir() if p.name.endswith(".done"))
        assert len(done) == archived_count
        segments = [name for name in done if parse_wal_name(name).kind == "segment"]
        assert len(segments) >= SWITCHES

        # every archived file fetched back is identical: a few through the restore_command as PostgreSQL runs
        # it (a process per file, as the postgres user), all of them through the same fetch in this process
        out = pg_dirs("fetched")
        for name in (done[0], done[len(done) // 2], done[-1]):
            run_as_pg(["cloudbk-wal-fetch", name, str(out / f"cli-{name}")], env=env, cwd=str(cluster.datadir))
            original = (cluster.datadir / "pg_wal" / name).read_bytes()
            assert (out / f"cli-{name}").read_bytes() == original, f"{name} differs after a round trip"
        storage = pg_backend.open()
        for name in done:
            fetch_wal(storage, "main", name, str(out / name))
            original = (cluster.datadir / "pg_wal" / name).read_bytes()
            assert (out / name).read_bytes() == original, f"{name} differs after a round trip"

        stored = {layout.wal_name_from_key(i.key) for i in storage.list(layout.wal_prefix("main"))}
        assert stored == set(done)
        index = load_index(storage, "main")
        sysid = cluster.sql("select system_identifier from pg_control_system()")
        assert index.system_identifier == sysid
        assert index.wal_segment_size == 16 * 1024 * 1024
        segnos = sorted(parse_wal_name(n).segno() for n in segments)
        assert index.segments == {1: [[segnos[0], segnos[-1]]]}
    finally:
        cluster.destroy()
