"""``cloudbk verify`` on every backend a PostgreSQL server can archive to (issue 14).

One cluster per backend, one backup in 1 MiB volumes. Healthy, ``verify --all`` reads every volume and every WAL
object (exit 0) and leaves a proof that backup-list shows. Then the backup is damaged five ways at once, each to
another object: a byte flipped inside a volume, a volume cut short, a volume deleted, a manifest whose checksum of
one file disagrees with the tar, a WAL segment of the backup's range deleted. Verify exits 4 with exactly one
line per problem, each naming its object, and the proofs record the failed verify after the successful one.
"""

from __future__ import annotations

import json

from backends import Backend
from bkhelpers import Clusters, archive_all, replace_object, repo_env
from pgcluster import cloudbk

from cloudbk.errors import ExitCode
from cloudbk.repo import layout
from cloudbk.repo.manifest import Manifest
from cloudbk.repo.proofs import VERIFY, load_proofs
from cloudbk.storage.base import Storage


def _verify(backend: Backend, *args: str) -> tuple[int, str]:
    proc = cloudbk("verify", *args, env=repo_env(backend), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


def _damage(backend: Backend, storage: Storage, manifest: Manifest) -> dict[str, str]:
    """Five kinds of damage at once, each to another object; returns key -> a word its problem line holds."""
    volumes = sorted(manifest.volumes, key=lambda item: -item[1].stored_size)
    keys = [layout.backup_object_key("main", manifest.id, v.name) for _, v in volumes[:3]]
    flipped = bytearray(storage.get_bytes(keys[0]))
    flipped[len(flipped) // 2] ^= 0x40
    replace_object(backend, storage, keys[0], bytes(flipped))
    replace_object(backend, storage, keys[1], storage.get_bytes(keys[1])[:-100])
    replace_object(backend, storage, keys[2], None)

    # the manifest's checksum of one file disagrees with the bytes in the tar (same length: the index agrees)
    mkey = layout.backup_manifest_key("main", manifest.id)
    original = storage.get_bytes(mkey)
    unique = ((v, f) for _, v in volumes[3:] for f in v.files if f.size and original.count(f.sha256.encode()) == 1)
    volume, row = next(unique)  # a checksum found once: a file only this cluster has (not a template's copy)
    keys.append(layout.backup_object_key("main", manifest.id, volume.name))
    wrong = "0" * 64 if row.sha256 != "0" * 64 else "1" * 64
    replace_object(backend, storage, mkey, original.replace(row.sha256.encode(), wrong.encode(), 1))

    wal_key = layout.wal_key("main", manifest.begin_wal)
    replace_object(backend, storage, wal_key, None)
    return {keys[0]: "unreadable", keys[1]: "truncated", keys[2]: "missing", keys[3]: row.path,
            wal_key: "not in the archive"}  # fmt: skip


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
    shown = json.loads(cloudbk("backup-show", backup_id, "--json", env=repo_env(pg_backend)).stdout)
    assert shown["verify"]["last_success"] == shown["verify"]["last"], shown["verify"]

    storage = pg_backend.open()
    try:
        key = layout.backup_manifest_key("main", backup_id)
        manifest = Manifest.from_json(storage.get_bytes(key), key)
        assert len(manifest.volumes) >= 4
        damaged = _damage(pg_backend, storage, manifest)
    finally:
        storage.close()
    code, out = _verify(pg_backend, backup_id)
    assert code == ExitCode.OTHER and out.rstrip().endswith("verify: FAILED"), out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM ")]
    for key, word in damaged.items():  # one line per problem, naming the object
        assert [p for p in problems if p.startswith(f"PROBLEM {key}: ") and word in p], (key, word, out)
    assert len(problems) == len(damaged), out

    storage = pg_backend.open()
    try:  # backup-show refuses a damaged backup; the proofs say what happened
        state = load_proofs(storage, "main")[(VERIFY, backup_id)]
    finally:
        storage.close()
    assert state.last is not None and not state.last.ok and state.last_ok is not None
