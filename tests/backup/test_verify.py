"""``cloudbk verify`` on every backend a PostgreSQL server can archive to (issue 14).

One cluster per backend, one backup in 1 MiB volumes. Healthy, it verifies (exit 0) and leaves a proof that
backup-list shows. Then the backup is damaged five ways, each undone before the next: a byte flipped inside a
volume, a volume cut short, a volume deleted, a manifest whose checksum of one file disagrees with the tar, a WAL
segment of the backup's range deleted. Each makes verify exit 4 with a line naming the object; ``--all`` also
reads the whole WAL archive.
"""

from __future__ import annotations

import json

from backends import Backend
from bkhelpers import Clusters, archive_all, replace_object, repo_env
from pgcluster import cloudbk

from cloudbk.errors import ExitCode
from cloudbk.repo import layout
from cloudbk.repo.manifest import Manifest
from cloudbk.storage.base import Storage


def _verify(backend: Backend, *args: str) -> tuple[int, str]:
    proc = cloudbk("verify", *args, env=repo_env(backend), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


def _expect_problem(backend: Backend, backup_id: str, key: str, word: str) -> None:
    code, out = _verify(backend, backup_id)
    assert code == ExitCode.OTHER, out
    lines = [line for line in out.splitlines() if line.startswith("PROBLEM ")]
    assert any(line.startswith(f"PROBLEM {key}: ") and word in line for line in lines), out
    assert out.rstrip().endswith("verify: FAILED"), out


def _damage_and_repair(backend: Backend, storage: Storage, manifest: Manifest) -> None:
    _, volume = max(manifest.volumes, key=lambda item: item[1].stored_size)
    key = layout.backup_object_key("main", manifest.id, volume.name)
    data = storage.get_bytes(key)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    for damaged, word, create in ((bytes(flipped), "unreadable", False), (data[:-100], "truncated", False),
                                  (None, "missing", True)):  # fmt: skip
        replace_object(backend, storage, key, damaged)
        _expect_problem(backend, manifest.id, key, word)
        replace_object(backend, storage, key, data, create=create)

    # the manifest's checksum of one file disagrees with the bytes in the tar (same length: the index agrees)
    mkey = layout.backup_manifest_key("main", manifest.id)
    original = storage.get_bytes(mkey)
    row = next(f for f in volume.files if f.size > 0)
    wrong = "0" * 64 if row.sha256 != "0" * 64 else "1" * 64
    assert original.count(row.sha256.encode()) >= 1
    replace_object(backend, storage, mkey, original.replace(row.sha256.encode(), wrong.encode(), 1))
    _expect_problem(backend, manifest.id, key, row.path)
    replace_object(backend, storage, mkey, original)

    wal_key = layout.wal_key("main", manifest.begin_wal)
    segment = storage.get_bytes(wal_key)
    replace_object(backend, storage, wal_key, None)
    _expect_problem(backend, manifest.id, wal_key, "not in the archive")
    code, out = _verify(backend, "--all")
    assert code == ExitCode.OTHER and f"PROBLEM {wal_key}: " in out, out
    replace_object(backend, storage, wal_key, segment, create=True)


def test_verify_finds_each_damage(pg_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(pg_backend)
    pg.sql("CREATE TABLE t AS SELECT g AS n, md5(g::text) AS h FROM generate_series(1, 40000) g")
    env = {**repo_env(pg_backend), "CLOUDBK_VOLUME_SIZE": "1MiB"}
    proc = cloudbk("backup-push", "--dbname", pg.conninfo, "--pgdata", str(pg.datadir), env=env)
    backup_id = proc.stdout.strip().splitlines()[-1]
    archive_all(pg)

    code, out = _verify(pg_backend, "--all", "--json")  # healthy: every backup and every WAL object
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["wal"]["objects_checked"] > 0, doc
    assert [b["backup"] for b in doc["backups"]] == [backup_id] and doc["backups"][0]["volumes_read"] >= 3, doc
    listed = json.loads(cloudbk("backup-list", "--json", env=repo_env(pg_backend)).stdout)
    assert listed[0]["verify"]["last_ok"] is True and listed[0]["drill"] is None, listed

    storage = pg_backend.open()
    try:
        key = layout.backup_manifest_key("main", backup_id)
        manifest = Manifest.from_json(storage.get_bytes(key), key)
        assert len(manifest.volumes) >= 3
        _damage_and_repair(pg_backend, storage, manifest)
    finally:
        storage.close()

    shown = json.loads(cloudbk("backup-show", backup_id, "--json", env=repo_env(pg_backend)).stdout)
    assert shown["verify"]["last_ok"] is False and shown["verify"]["last_success"] is not None, shown["verify"]
