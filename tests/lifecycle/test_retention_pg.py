"""Retention, keep and delete against real PostgreSQL 15 servers and real repositories.

- Five backups over three timelines (two failovers made with ``cloudbk restore`` + promotion), WAL between
  them: each policy keeps exactly what it should; the WAL before the oldest retained backup is gone on every
  timeline and everything from it on is still there; a restore from the oldest retained backup recovers
  every row afterwards.
- A kept backup survives retention with its WAL (it still restores); released, retention expires it.
  This one runs on an S3 service (SeaweedFS), so retention's batched deletes meet a network backend.
- Backups whose ids sort against their LSNs (a skewed client clock) are expired by LSN.
"""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from backends import Backend, selected, unique_prefix
from lifecycle_pg import Site, all_keys, end_time, summary, wal_segno
from pgcluster import PG_USER, new_dir

from cloudbk.pg.walnames import parse_lsn
from cloudbk.repo import layout
from cloudbk.repo.manifest import Manifest, format_time, parse_time

SERVER = "main"


def file_backend() -> Backend:
    return Backend("file", f"file://{new_dir('lc-repo')}")


def expected_after(before: set[str], plan: dict[str, Any], segment_size: int) -> set[str]:
    """What must remain of ``before`` after ``plan``: everything except the expired backups' objects and WAL
    (never a history file) numbered below the plan's cut."""
    keep_from = plan["wal_keep_from"]
    gone_backups = {b["id"] for b in plan["backups"] if b["status"] == "expired"}
    remain = set()
    for key in before:
        backup_id = layout.backup_id_from_key(SERVER, key)
        if backup_id in gone_backups:
            continue
        if key.startswith(layout.wal_prefix(SERVER)):
            segno = wal_segno(key, segment_size)
            if segno is not None and segno < keep_from:
                continue
        remain.add(key)
    return remain


def assert_restores(site: Site, backup_id: str) -> None:
    """Restore ``backup_id`` (without archiving) and check every row came back."""
    restored = site.restore(backup_id)
    assert restored.sql("select count(*) from t") == str(site.rows)
    restored.destroy()


def test_policies_over_five_backups_on_three_timelines() -> None:
    backend = file_backend()
    site = Site.create(backend)
    storage = backend.open()
    try:
        site.churn(1)
        b1 = site.backup()
        site.churn(2)
        b2 = site.backup()
        site.churn(2)
        assert site.failover() == 2
        b3 = site.backup()
        site.churn(2)
        assert site.failover() == 3
        b4 = site.backup()
        site.churn(2)
        time.sleep(3)  # room for a recovery window that starts between the last two backups
        b5 = site.backup()
        site.churn(2)
        site.settle()
        listed = site.backups()
        assert [b["id"] for b in listed] == [b1, b2, b3, b4, b5]
        assert [b["timeline"] for b in listed] == [1, 1, 2, 3, 3]
        segment_size = listed[0]["wal_segment_size"]
        assert site.wal_verify("--deep").returncode == 0

        # -- REDUNDANCY 3, first as a dry run: it lists exactly what the real run then deletes -------------
        before = all_keys(storage, f"{SERVER}/")
        dry = site.retention("--redundancy", "3", "--dry-run")
        assert all_keys(storage, f"{SERVER}/") == before
        assert [b["id"] for b in dry["backups"] if b["status"] == "expired"] == [b1, b2]
        plan = site.retention("--redundancy", "3")
        assert [b["id"] for b in plan["backups"] if b["status"] == "retained"] == [b3, b4, b5]
        assert plan["wal_keys"] == dry["wal_keys"]
        b3_begin = parse_lsn(summary(site, b3)["begin_lsn"]) // segment_size
        assert plan["wal_keep_from"] == b3_begin
        after = all_keys(storage, f"{SERVER}/")
        assert after == expected_after(before, plan, segment_size)
        gone_wal = {k for k in before - after if k.startswith(layout.wal_prefix(SERVER))}
        assert gone_wal == set(plan["wal_keys"])
        assert any(k.startswith(layout.timeline_prefix(SERVER, 1)) for k in gone_wal)
        assert not any(k.startswith(layout.timeline_prefix(SERVER, 1)) for k in after)  # tl 1 ended before b3
        assert {f"{SERVER}/wal/history/00000002.history", f"{SERVER}/wal/history/00000003.history"} <= after
        assert [b["id"] for b in site.backups()] == [b3, b4, b5]
        assert site.wal_verify().returncode == 0
        assert_restores(site, b3)

        # -- RECOVERY WINDOW whose start falls between b4 and b5: b4 is needed to recover to that start ----
        entries = {b["id"]: b for b in site.backups()}
        start = end_time(entries[b4]) + 0.05
        window = datetime.now(UTC).timestamp() - start
        before = all_keys(storage, f"{SERVER}/")
        plan = site.retention("--recovery-window", f"{window:.3f}s")
        decisions = {b["id"]: b for b in plan["backups"]}
        assert decisions[b3]["status"] == "expired"
        assert decisions[b4]["reason"] == "needed to recover to the start of the recovery window"
        assert decisions[b5]["reason"] == "within the recovery window"
        after = all_keys(storage, f"{SERVER}/")
        assert after == expected_after(before, plan, segment_size)
        assert plan["wal_keep_from"] == parse_lsn(entries[b4]["begin_lsn"]) // segment_size
        assert not any(k.startswith(layout.timeline_prefix(SERVER, 2)) for k in after)  # tl 2 ended before b4
        assert [b["id"] for b in site.backups()] == [b4, b5]
        assert site.wal_verify("--deep").returncode == 0
        assert_restores(site, b4)
        check = site.cloudbk("check", "--dbname", site.primary.conninfo, "--minimum-redundancy", "2", check=False)
        assert check.returncode == 0, check.stdout
    finally:
        storage.close()
        site.destroy()


@pytest.mark.parametrize("service", selected(("s3-seaweedfs",)))
def test_kept_backup_survives_retention_with_its_wal_until_released(
    request: pytest.FixtureRequest, service: str
) -> None:
    backend: Backend = request.getfixturevalue(f"{service.replace('-', '_')}_service").make(unique_prefix("lc"))
    site = Site.create(backend)
    storage = backend.open()
    try:
        site.churn(1)
        b1 = site.backup()
        site.churn(2)
        b2 = site.backup()
        site.churn(2)
        b3 = site.backup()
        site.churn(2)
        site.settle()
        segment_size = site.backups()[0]["wal_segment_size"]
        b1_begin = parse_lsn(summary(site, b1)["begin_lsn"]) // segment_size

        assert "is kept (full)" in site.cloudbk("keep", b1).stdout
        assert site.cloudbk("keep", "--status", b1).stdout.strip() == "full"
        refused = site.cloudbk("delete", b1, "--force", check=False)
        assert refused.returncode == 1 and "kept" in refused.stderr

        before = all_keys(storage, f"{SERVER}/")
        plan = site.retention("--redundancy", "1")
        assert [(b["id"], b["status"]) for b in plan["backups"]] == [
            (b1, "retained"),
            (b2, "expired"),
            (b3, "retained"),
        ]
        assert plan["wal_keep_from"] == b1_begin  # the kept backup needs all WAL from its begin on
        after = all_keys(storage, f"{SERVER}/")
        assert after == expected_after(before, plan, segment_size)
        assert layout.backup_keep_key(SERVER, b1) in after
        assert site.wal_verify().returncode == 0
        assert_restores(site, b1)  # with its WAL: it recovers all the way to the newest row

        assert "released backup" in site.cloudbk("keep", "--release", b1).stdout
        before = all_keys(storage, f"{SERVER}/")
        plan = site.retention("--redundancy", "1")
        assert [(b["id"], b["status"]) for b in plan["backups"]] == [(b1, "expired"), (b3, "retained")]
        after = all_keys(storage, f"{SERVER}/")
        assert after == expected_after(before, plan, segment_size)
        assert not any(key.startswith(layout.backup_prefix(SERVER, b1)) for key in after)
        assert [b["id"] for b in site.backups()] == [b3]
        assert site.wal_verify("--deep").returncode == 0
    finally:
        storage.close()
        site.destroy()


def _rename(site: Site, old: str, new: str, end: datetime) -> None:
    """Move a backup to another id (and end time), as a backup-push on a skewed clock would have named it."""
    storage = site.backend.open()
    try:
        keys = sorted(info.key for info in storage.list(layout.backup_prefix(SERVER, old)))
        for key in keys:
            name = key.rsplit("/", 1)[1]
            if name == layout.MANIFEST_NAME:
                continue
            storage.put_bytes(layout.backup_object_key(SERVER, new, name), storage.get_bytes(key))
        manifest_key = layout.backup_manifest_key(SERVER, old)
        manifest = Manifest.from_json(storage.get_bytes(manifest_key), manifest_key)
        manifest.id = new
        manifest.end_time = format_time(end)
        storage.put_bytes(layout.backup_manifest_key(SERVER, new), manifest.to_json())
        storage.delete_many([manifest_key, *keys])
    finally:
        storage.close()
    if site.backend.url.startswith("file://"):  # written as root here; the CLI runs as postgres
        subprocess.run(["chown", "-R", PG_USER, site.backend.url.removeprefix("file://")], check=True)


def test_retention_orders_by_lsn_when_ids_and_times_are_skewed() -> None:
    site = Site.create(file_backend())
    try:
        site.churn(1)
        b1 = site.backup()
        site.churn(2)
        b2 = site.backup()
        site.churn(2)
        b3 = site.backup()
        site.churn(1)
        site.settle()
        # ids sort in the reverse order of the LSNs, and the end times disagree with the LSNs as well
        renamed = {b1: "20300103T000000Z", b2: "20300101T000000Z", b3: "20300102T000000Z"}
        ends = {b1: "2030-01-03T00:00:00Z", b2: "2030-01-01T00:00:00Z", b3: "2030-01-02T00:00:00Z"}
        for old, new in renamed.items():
            _rename(site, old, new, parse_time(ends[old]))
        site.cloudbk("reindex")
        assert sorted(b["id"] for b in site.backups()) == sorted(renamed.values())

        plan = site.retention("--redundancy", "2")
        fate = {b["id"]: b["status"] for b in plan["backups"]}
        # b1 (now the largest id and the latest end time) has the lowest LSN: it is the one that goes
        assert fate == {renamed[b1]: "expired", renamed[b2]: "retained", renamed[b3]: "retained"}
        assert [b["id"] for b in plan["backups"]] == [renamed[b1], renamed[b2], renamed[b3]]
        assert sorted(b["id"] for b in site.backups()) == sorted([renamed[b2], renamed[b3]])
        assert site.wal_verify().returncode == 0
        assert_restores(site, renamed[b2])
    finally:
        site.destroy()
