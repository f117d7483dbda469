"""A cluster with an extra tablespace round-trips with --tablespace-mapping."""

from __future__ import annotations

import json
import os

from backends import Backend
from bkhelpers import Clusters, archive_all, backup_push, new_dest, repo_env, restore, scratch_dir, start_and_promote
from pgcluster import cloudbk

from cloudbk.errors import ExitCode


def test_tablespace_round_trip_with_mapping(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend)
    location = scratch_dir("tblspc")
    pg.sql(f"CREATE TABLESPACE extra LOCATION '{location}'")
    pg.sql("CREATE TABLE moved (n int) TABLESPACE extra; INSERT INTO moved SELECT generate_series(1, 20000)")
    backup_id = backup_push(pg, file_backend, "--compression", "lz4").stdout.strip().splitlines()[-1]
    pg.sql("INSERT INTO moved SELECT generate_series(20001, 20500)")
    archive_all(pg)

    shown = json.loads(cloudbk("backup-show", backup_id, "--json", env=repo_env(file_backend)).stdout)
    assert [t["location"] for t in shown["tablespaces"]] == [str(location)]
    assert sorted(t["name"] for t in shown["tars"]) == sorted(
        ["base.tar.lz4", f"{shown['tablespaces'][0]['oid']}.tar.lz4"]
    )

    # the original tablespace directory is in use: restoring onto it is refused before anything is written
    dest = new_dest()
    proc = restore(file_backend, dest, check=False)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert str(location) in proc.stderr and "not empty" in proc.stderr
    assert not dest.exists()

    mapped = scratch_dir("tblspc-new") / "ts"
    restore(file_backend, dest, "--tablespace-mapping", f"{location}={mapped}")
    restored = clusters.restored(dest, file_backend, archive=False)
    start_and_promote(restored)
    assert restored.sql("SELECT count(*), max(n) FROM moved") == "20500|20500"
    assert restored.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'extra'") == str(mapped)
    oid = restored.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
    assert os.readlink(dest / "pg_tblspc" / oid) == str(mapped)
    assert any(p.name.startswith("PG_15_") for p in mapped.iterdir())
