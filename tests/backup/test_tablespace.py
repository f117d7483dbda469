"""A cluster with an extra tablespace and links in PGDATA round-trips: the tablespace with
--tablespace-mapping; `log` (a directory elsewhere), a configuration file elsewhere and a dangling link as
the link policy says (docs/backup.md): plain directories and files in DEST unless --link-map asks for the link."""

from __future__ import annotations

import json
import os

from backends import Backend
from bkhelpers import Clusters, archive_all, backup_push, new_dest, repo_env, restore, scratch_dir, start_and_promote
from pgcluster import cloudbk, run_as_pg

from cloudbk.errors import ExitCode


def test_tablespace_and_links_round_trip(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend)
    location = scratch_dir("tblspc")
    pg.sql(f"CREATE TABLESPACE extra LOCATION '{location}'")
    pg.sql("CREATE TABLE moved (n int) TABLESPACE extra; INSERT INTO moved SELECT generate_series(1, 20000)")
    logs, etc = scratch_dir("pglog"), scratch_dir("etc")
    script = (
        f"cd '{pg.datadir}'; echo 'LOG: before' > '{logs}/server.log'; ln -s '{logs}' log; "
        f"echo \"work_mem = '7MB'\" > '{etc}/extra.conf'; ln -s '{etc}/extra.conf' extra.conf; "
        "ln -s /nonexistent/cloudbk dangling; echo \"include_if_exists = 'extra.conf'\" >> postgresql.conf"
    )
    run_as_pg(["sh", "-ec", script])
    # a link to a directory the server's user cannot read: the backup says which, and what to do
    locked = scratch_dir("locked")
    locked.chmod(0)
    os.symlink(locked, pg.datadir / "locked")
    proc = backup_push(pg, file_backend, check=False)
    assert proc.returncode == ExitCode.FAILED and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot read directory {pg.datadir}/locked: permission denied" in proc.stderr and "HINT" in proc.stderr
    os.unlink(pg.datadir / "locked")
    locked.chmod(0o700)
    backup_id = backup_push(pg, file_backend, "--compression", "lz4").stdout.strip().splitlines()[-1]
    pg.sql("INSERT INTO moved SELECT generate_series(20001, 20500)")
    archive_all(pg)

    shown = json.loads(cloudbk("backup-show", backup_id, "--json", env=repo_env(file_backend)).stdout)
    assert [t["location"] for t in shown["tablespaces"]] == [str(location)]
    oid = shown["tablespaces"][0]["oid"]
    assert sorted(t["name"] for t in shown["tars"]) == sorted(["base", str(oid)])
    volumes = sorted(v["name"] for t in shown["tars"] for v in t["volumes"])
    assert volumes == [f"{oid}.00001.tar.lz4", "base.00001.tar.lz4", "base.00002.tar.lz4"]  # the label volume last
    assert sorted((lk["path"], lk["target"], lk["type"]) for lk in shown["links"]) == [
        ("dangling", "/nonexistent/cloudbk", "dangling"), ("extra.conf", f"{etc}/extra.conf", "file"),
        ("log", str(logs), "dir"),
    ]  # fmt: skip

    # the original tablespace directory is in use: restoring onto it is refused before anything is written
    dest = new_dest()
    proc = restore(file_backend, dest, check=False)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert str(location) in proc.stderr and "not empty" in proc.stderr
    assert not dest.exists()

    mapped = scratch_dir("tblspc-new") / "ts"
    restore(file_backend, dest, "--tablespace-mapping", f"{location}={mapped}")
    # the links come back as what they pointed at, inside DEST
    assert not (dest / "log").is_symlink() and (dest / "log" / "server.log").read_text() == "LOG: before\n"
    assert not (dest / "extra.conf").is_symlink() and "7MB" in (dest / "extra.conf").read_text()
    assert not os.path.lexists(dest / "dangling")
    restored = clusters.restored(dest, file_backend, archive=False)
    start_and_promote(restored)
    assert restored.sql("SELECT count(*), max(n) FROM moved") == "20500|20500"
    assert restored.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'extra'") == str(mapped)
    assert restored.sql("SHOW work_mem") == "7MB"
    oid = restored.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
    assert os.readlink(dest / "pg_tblspc" / oid) == str(mapped)
    assert any(p.name.startswith("PG_15_") for p in mapped.iterdir())

    # asked for, a link is made, its content at its target; a target in use is refused before writing
    dest2, mapped2 = new_dest(), scratch_dir("tblspc-2") / "ts"
    proc = restore(file_backend, dest2, "--tablespace-mapping", f"{location}={mapped2}", "--link-all", check=False)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert f"link extra.conf -> {etc}/extra.conf: {etc}/extra.conf exists" in proc.stderr
    assert "--link-map extra.conf=PATH" in proc.stderr
    assert not dest2.exists()
    new_logs = scratch_dir("pglog-new") / "log"
    restore(file_backend, dest2, "--tablespace-mapping", f"{location}={mapped2}", "--link-map", f"log={new_logs}")
    assert os.readlink(dest2 / "log") == str(new_logs) and (new_logs / "server.log").read_text() == "LOG: before\n"
    assert not (dest2 / "extra.conf").is_symlink()
