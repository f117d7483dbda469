"""Backups in volumes, on every backend a PostgreSQL server can archive to (issue 12).

One cluster per backend, with two tablespaces and a table file larger than two volumes (volume size 1 MiB),
is backed up with ``--jobs 4``; restores with ``--jobs 1`` and ``--jobs 4`` are byte-identical to each other
and, for the files the server does not touch after ``VACUUM FREEZE`` and a checkpoint, to the source; the
restored server starts and holds the data. Then the same backup is damaged three ways: a volume removed and
a volume cut short are refused before anything is written; a byte flipped inside a volume is caught while
extracting, and DEST is left without recovery.signal and without global/pg_control. Finally a format-1
repository written by the code before volumes (tests/fixtures/format1-repo.tar.gz) restores and starts.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
from pathlib import Path

from backends import Backend
from bkhelpers import (
    Clusters,
    archive_all,
    new_dest,
    replace_object,
    repo_env,
    restore,
    scratch_dir,
    start_and_promote,
)
from pgcluster import PG_USER, cloudbk

from cloudbk.errors import ExitCode
from cloudbk.repo import layout
from cloudbk.repo.manifest import Manifest
from cloudbk.storage.base import Storage

VOLUME = "1MiB"
FIXTURE = Path(__file__).parent.parent / "fixtures" / "format1-repo.tar.gz"
FIXTURE_TABLESPACE = "/tmp/cloudbk-format1-tblspc"  # tests/fixtures/make_format1.py


def _tree(root: Path) -> dict[str, Path]:
    files = {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    return {rel: p for rel, p in files.items() if not rel.startswith("pg_wal/cloudbk-fetch/")}  # WAL prefetch


def _assert_same(a: Path, b: Path, skip: tuple[str, ...] = ()) -> int:
    left, right = _tree(a), _tree(b)
    assert sorted(left) == sorted(right)
    differ = [rel for rel in left if rel not in skip and not filecmp.cmp(left[rel], right[rel], shallow=False)]
    assert not differ, differ
    return len(left)


def test_volumes_round_trip_and_damage(pg_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(pg_backend)
    pg.sql("ALTER SYSTEM SET autovacuum = off")
    pg.sql("SELECT pg_reload_conf()")
    one, two = scratch_dir("ts-one"), scratch_dir("ts-two")
    pg.sql(f"CREATE TABLESPACE one LOCATION '{one}'")
    pg.sql(f"CREATE TABLESPACE two LOCATION '{two}'")
    # about 3 MiB of heap in tablespace one: one file split into three volumes
    pg.sql("CREATE TABLE big TABLESPACE one AS SELECT g AS n, md5(g::text) || repeat('x', 60) AS pad "
           "FROM generate_series(1, 25000) g")  # fmt: skip
    pg.sql("CREATE TABLE small TABLESPACE two AS SELECT generate_series(1, 1000) AS n")
    pg.sql("CREATE TABLE here AS SELECT g AS n, md5(g::text) AS h FROM generate_series(1, 30000) g")
    pg.sql("VACUUM FREEZE")
    pg.sql("CHECKPOINT")  # the tables' files stay as they are from here on
    big_path = pg.sql("SELECT pg_relation_filepath('big')")  # pg_tblspc/OID/PG_15_.../DB/RELFILENODE
    big_size = (pg.datadir / big_path).stat().st_size
    assert big_size > 2 * 1024 * 1024
    big_rel = big_path.split("/", 2)[2]  # relative to the tablespace directory, as the manifest has it

    env = {**repo_env(pg_backend), "CLOUDBK_VOLUME_SIZE": VOLUME}
    proc = cloudbk("backup-push", "--dbname", pg.conninfo, "--pgdata", str(pg.datadir), "--jobs", "4", env=env)
    backup_id = proc.stdout.strip().splitlines()[-1]
    pg.sql("CREATE TABLE later AS SELECT 1 AS n")  # after the backup: not in a --target-immediate restore
    archive_all(pg)

    storage = pg_backend.open()
    try:
        key = layout.backup_manifest_key("main", backup_id)
        manifest = Manifest.from_json(storage.get_bytes(key), key)
        assert manifest.format_version == 2
        by_oid = {t.tablespace_oid: t for t in manifest.tars}
        assert len(by_oid) == 3 and all(len(t.volumes) >= 1 for t in manifest.tars)
        pieces = [f.offset for v in by_oid[int(big_path.split("/")[1])].volumes for f in v.files if f.path == big_rel]
        assert pieces == list(range(0, big_size, 1024 * 1024)), pieces  # one piece per volume, in order

        dests = {}
        for jobs in ("1", "4"):
            dest = new_dest()
            mapping = [f"--tablespace-mapping={one}={scratch_dir('one') / 'ts'}",
                       f"--tablespace-mapping={two}={scratch_dir('two') / 'ts'}"]  # fmt: skip
            restore(pg_backend, dest, "--backup", backup_id, "--target-immediate", "--jobs", jobs, *mapping)
            dests[jobs] = dest
        shown = json.loads(cloudbk("backup-show", backup_id, "--json", env=repo_env(pg_backend)).stdout)
        assert sum(len(t["volumes"]) for t in shown["tars"]) == len(manifest.volumes)
        _damage(pg_backend, storage, manifest)
    finally:
        storage.close()

    # the time of the restore, the mapped directories, the restore's id (docs/wal.md, "Prefetch")
    skip = ("postgresql.auto.conf", "tablespace_map", "cloudbk_restore_id")
    count = _assert_same(dests["1"], dests["4"], skip)
    assert count > 900
    for oid_dir in (dests["4"] / "pg_tblspc").iterdir():  # the tablespaces, byte for byte as the source
        source = one if oid_dir.resolve().parent.name.startswith("one-") else two
        _assert_same(source, oid_dir.resolve())
    here = pg.sql("SELECT pg_relation_filepath('here')")
    assert filecmp.cmp(pg.datadir / here, dests["4"] / here, shallow=False)

    restored = clusters.restored(dests["4"], pg_backend, archive=False)
    start_and_promote(restored)
    assert restored.sql("SELECT count(*), sum(n) FROM big") == "25000|312512500"
    assert restored.sql("SELECT count(*) FROM small") == "1000"
    assert restored.sql("SELECT count(*) FROM here") == "30000"
    assert restored.sql("SELECT count(*) FROM pg_class WHERE relname = 'later'") == "0"


def _damage(backend: Backend, storage: Storage, manifest: Manifest) -> None:
    """A missing and a truncated volume are refused before writing; a flipped byte stops the restore."""
    _, volume = max(manifest.volumes, key=lambda item: item[1].stored_size)
    key = layout.backup_object_key("main", manifest.id, volume.name)
    data = storage.get_bytes(key)
    assert len(data) == volume.stored_size
    mapping = [f"--tablespace-mapping={ts.location}={scratch_dir('bad') / 'ts'}" for ts in manifest.tablespaces]
    for damaged, word in ((None, "missing"), (data[: len(data) // 2], "bytes")):
        replace_object(backend, storage, key, damaged)
        dest = new_dest()
        proc = restore(backend, dest, "--backup", manifest.id, "--target-immediate", *mapping, check=False)
        assert proc.returncode == ExitCode.OTHER, proc.stderr
        assert volume.name in proc.stderr and word in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not dest.exists()
        replace_object(backend, storage, key, data, create=damaged is None)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    replace_object(backend, storage, key, bytes(flipped))
    dest = new_dest()
    proc = restore(backend, dest, "--backup", manifest.id, "--target-immediate", *mapping, check=False)
    assert proc.returncode == ExitCode.OTHER, proc.stderr
    assert key in proc.stderr and "corrupt" in proc.stderr and "cannot start" in proc.stderr, proc.stderr
    assert dest.is_dir() and not (dest / "recovery.signal").exists()
    assert not (dest / "global" / "pg_control").exists()
    replace_object(backend, storage, key, data)


def test_format1_repository_restores(clusters: Clusters) -> None:
    """A repository written before volumes (manifest format 1, one object per tablespace) restores and starts."""
    root = scratch_dir("format1")
    subprocess.run(["tar", "-C", str(root), "-xzf", str(FIXTURE)], check=True)
    subprocess.run(["chown", "-R", f"{PG_USER}:", str(root)], check=True)
    backend = Backend("file", f"file://{root}/repo")
    shown = json.loads(cloudbk("backup-show", "latest", "--json", env=repo_env(backend)).stdout)
    assert sorted(v["name"] for t in shown["tars"] for v in t["volumes"]) == ["16384.tar.zst", "base.tar.zst"]
    dest, mapped = new_dest(), scratch_dir("format1-ts") / "ts"
    restore(backend, dest, "--jobs", "4", f"--tablespace-mapping={FIXTURE_TABLESPACE}={mapped}")
    restored = clusters.restored(dest, backend, archive=False)
    start_and_promote(restored)
    assert restored.sql("SELECT (SELECT count(*) FROM moved) || ',' || (SELECT count(*) FROM kept)") == "1000,500"
