"""Volumes without a server: planning, split files written as pieces and reassembled in any order, the
manifest's checks on pieces, the stored-size check before a restore, the worker pool, the settings."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from synthetic import SEG, SYSID, publish_backup

from cloudbk.backup.extract import check_volumes
from cloudbk.backup.tarextract import SafeExtractor
from cloudbk.backup.volumes import (
    Counter,
    VolumeJob,
    check_volume_size,
    plan_stream,
    write_volumes,
)
from cloudbk.backup.workers import Cancelled, checked, run_parallel
from cloudbk.config import resolve
from cloudbk.errors import IntegrityError, UsageError
from cloudbk.lifecycle.actions import delete_backup
from cloudbk.lifecycle.reindex import reindex
from cloudbk.pg.datadir import Entry
from cloudbk.pg.walnames import segment_name
from cloudbk.progress import NoProgress
from cloudbk.repo import layout
from cloudbk.repo.catalog import load_catalog
from cloudbk.repo.manifest import FileEntry, Manifest, TarEntry, VolumeEntry, check_pieces, format_time
from cloudbk.repo.objects import TAR, create_object, open_object
from cloudbk.storage.memory import MemoryStorage

MiB = 1024 * 1024
BID = "20261201T120000Z"


def _manifest(volumes: list[VolumeEntry]) -> Manifest:
    """A backup of segment 2 whose PGDATA stream is ``volumes``."""
    end = format_time(datetime.now(UTC))
    return Manifest(BID, "main", str(SYSID), 150004, 1, 2 * SEG + 0x28, 2 * SEG + 0x100, segment_name(1, 2),
                    segment_name(1, 2), end, end, SEG, "zstd", tars=[TarEntry("base", None, volumes)])  # fmt: skip


def _file(root: Path, rel: str, size: int) -> Entry:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return Entry(rel, str(path), "f", size, 0o600, 1_700_000_000.0)


def test_plan_cuts_streams_and_splits_large_files_at_volume_multiples(tmp_path: Path) -> None:
    entries = [Entry("base", str(tmp_path), "d"), _file(tmp_path, "a", MiB // 2), _file(tmp_path, "b", MiB // 2)]
    entries += [_file(tmp_path, "big", 2 * MiB + 8192), _file(tmp_path, "c", 100), Entry("e", "", "f", 0)]
    plans = plan_stream("16385", entries, MiB)
    layout_ = [[(p.entry.rel, p.offset, p.length) for p in plan.items] for plan in plans]
    assert layout_ == [
        [("base", None, 0), ("a", None, 0), ("b", None, 0)],
        [("big", 0, MiB)],
        [("big", MiB, MiB)],
        [("big", 2 * MiB, 8192), ("c", None, 0), ("e", None, 0)],
    ]
    assert [p.object_name("zstd") for p in plans][:2] == ["16385.00001.tar.zst", "16385.00002.tar.zst"]
    assert [len(p.items) for p in plan_stream("base", [], MiB)] == [0]  # an empty stream is one empty volume


def test_split_file_reassembles_from_volumes_extracted_in_any_order(tmp_path: Path) -> None:
    src = tmp_path / "src"
    entries = [Entry("d", str(src / "d"), "d"), _file(src, "d/big", 3 * MiB + 100), _file(src, "d/small", 10)]
    storage = MemoryStorage()
    job = VolumeJob(storage, "main", BID, "zstd", 0, Counter(NoProgress()))
    plans = plan_stream("base", entries, MiB)
    written = write_volumes(job, plans, jobs=3)
    volumes = [written[("base", p.number)][0] for p in plans]
    tar = TarEntry("base", None, volumes)
    assert [f.offset for f in tar.files if f.path == "d/big"] == [0, MiB, 2 * MiB, 3 * MiB]
    dest = tmp_path / "dest"
    dest.mkdir()
    for volume in reversed(volumes):  # the last piece first: the file is created by whichever comes first
        key = layout.backup_object_key("main", BID, volume.name)
        with open_object(storage, key, TAR, volume.name, volume.size, volume.sha256) as source:
            result, _, _ = SafeExtractor(str(dest), {f.path: f for f in volume.files}).extract(source)
            source.finish()
        assert set(result.files) == {f.path for f in volume.files}
    for rel in ("d/big", "d/small"):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()


def test_manifest_refuses_pieces_that_do_not_cover_a_file() -> None:
    def doc(rows: list[list[object]]) -> dict[str, object]:
        volumes = [{"name": f"base.{i:05d}.tar.zst", "size": 1, "sha256": "00", "stored_size": 1, "files": [r]}
                   for i, r in enumerate(rows, 1)]  # fmt: skip
        return {"name": "base", "tablespace_oid": None, "volumes": volumes}

    good = TarEntry.from_dict(doc([["f", 8192, "aa", 0], ["f", 10, "bb", 8192]]), 2)
    assert [(f.offset, f.size) for f in good.files] == [(0, 8192), (8192, 10)] and good.paths == {"f"}
    for rows in (
        [["f", 8192, "aa", 0], ["f", 10, "bb", 8000]],
        [["f", 8192, "aa", 8192]],
        [["f", 1, "a"], ["f", 1, "a"]],
    ):
        with pytest.raises(ValueError, match="pieces"):
            TarEntry.from_dict(doc(rows), 2)


def test_format1_manifest_reads_as_one_volume_per_stream_and_writes_back_alike() -> None:
    single = TarEntry.single("base.tar.zst", None, 3072, "ab" * 32, 900, [FileEntry("PG_VERSION", 3, "cd" * 32)])
    old = single.to_dict(1)
    assert old["name"] == "base.tar.zst" and old["sha256"] == "ab" * 32 and "volumes" not in old
    again = TarEntry.from_dict(old, 1)
    assert again == single and again.volumes[0].name == "base.tar.zst" and again.stored_size == 900


def test_check_volumes_names_a_missing_or_short_volume() -> None:
    storage = MemoryStorage()
    job = VolumeJob(storage, "main", BID, "zstd", 0, Counter(NoProgress()))
    plans = plan_stream("base", [], MiB)
    volume = write_volumes(job, plans, jobs=1)[("base", 1)][0]
    manifest = _manifest([volume])
    check_volumes(storage, "main", manifest)
    key = layout.backup_object_key("main", BID, volume.name)
    data = storage.get_bytes(key)
    storage.put_bytes(key, data[:-1])
    with pytest.raises(IntegrityError, match=f"{key} is {len(data) - 1} bytes, the manifest says {len(data)}"):
        check_volumes(storage, "main", manifest)
    storage.delete_many([key])
    with pytest.raises(IntegrityError, match=f"{key} is missing") as caught:
        check_volumes(storage, "main", manifest)
    assert caught.value.key == key and "nothing was written" in (caught.value.hint or "")


def test_first_failure_cancels_the_others_and_is_the_error_raised() -> None:
    cancel = threading.Event()
    started: list[int] = []

    def work(n: int) -> int:
        started.append(n)
        if n == 1:
            time.sleep(0.05)
            raise IntegrityError("volume 1 is corrupt")
        advance = checked(cancel, lambda _: None)
        for _ in range(200):
            advance(1)
            time.sleep(0.005)
        return n

    with pytest.raises(IntegrityError, match="volume 1"):
        run_parallel(work, list(range(8)), 2, cancel, "t")
    assert cancel.is_set() and len(started) < 8  # the volumes not started were dropped
    with pytest.raises(Cancelled):
        checked(cancel, lambda _: None)(1)


def test_jobs_and_volume_size_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('jobs = 3\nvolume_size = "64MiB"\n')
    assert resolve({}, {"CLOUDBK_CONFIG": str(cfg)}).jobs == 3
    assert resolve({}, {"CLOUDBK_CONFIG": str(cfg), "CLOUDBK_JOBS": "5"}).jobs == 5
    assert resolve({"jobs": "7"}, {"CLOUDBK_CONFIG": str(cfg), "CLOUDBK_JOBS": "5"}).jobs == 7
    assert resolve({}, {"CLOUDBK_CONFIG": str(cfg)}).volume_size == 64 * MiB
    assert resolve({}, {}).jobs is None and resolve({}, {"CLOUDBK_VOLUME_SIZE": "1048576"}).volume_size == MiB
    for bad in ({"jobs": "0"}, {"jobs": "two"}, {"volume_size": "12 parsecs"}):
        with pytest.raises(UsageError):
            resolve(bad, {})
    assert check_volume_size(MiB) == MiB
    for bad_size in (MiB + 1, 8192):
        with pytest.raises(UsageError, match="volume size"):
            check_volume_size(bad_size)


def test_lifecycle_sees_every_volume(tmp_path: Path) -> None:
    """The catalog judges each volume by its stored size, reindex indexes them all, delete removes them all."""
    storage = MemoryStorage()
    job = VolumeJob(storage, "main", BID, "zstd", 0, Counter(NoProgress()))
    plans = plan_stream("base", [_file(tmp_path, "big", 2 * MiB + 1), _file(tmp_path, "global/pg_control", 8192)], MiB)
    written = write_volumes(job, plans, jobs=2)
    volumes = [written[("base", p.number)][0] for p in plans]
    publish_backup(storage, _manifest(volumes), 4)
    assert [b.id for b in load_catalog(storage, "main").backups] == [BID]
    reindex(storage, "main")
    catalog = load_catalog(storage, "main")
    assert catalog.index.backups[BID]["objects"] == {v.name: v.stored_size for v in volumes} and len(volumes) == 3
    key = layout.backup_object_key("main", BID, volumes[1].name)
    storage.delete_many([key])
    catalog = load_catalog(storage, "main")
    assert not catalog.backups and volumes[1].name in catalog.damaged[BID]
    delete_backup(storage, "main", BID)
    assert list(storage.list(layout.backup_prefix("main", BID))) == []


def test_a_split_file_dropped_during_the_backup_keeps_its_pieces_as_zeros(tmp_path: Path) -> None:
    """A relation dropped while its pieces are copied (normal during a backup): the pieces still cover it."""
    big = _file(tmp_path, "big", 2 * MiB + 8192)
    plans = plan_stream("base", [big], MiB)
    os.unlink(big.path)  # after the scan, before its volumes are written
    job = VolumeJob(MemoryStorage(), "main", BID, "zstd", 0, Counter(NoProgress()))
    written = write_volumes(job, plans, jobs=2)
    tar = TarEntry("base", None, [written[("base", p.number)][0] for p in plans])
    check_pieces(tar)
    assert [(f.offset, f.size) for f in tar.files] == [(0, MiB), (MiB, MiB), (2 * MiB, 8192)]
    assert {f.sha256 for f in tar.files[:2]} == {hashlib.sha256(bytes(MiB)).hexdigest()}


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_restore_hashes_a_volume_once(compression: str) -> None:
    """With ``trust_codec`` (restore, which checks every file's SHA-256) a self-checking payload is only
    counted, not hashed again; without compression it is still hashed."""
    storage = MemoryStorage()
    sink = create_object(storage, "k/v", TAR, "v", compression)
    sink.write(b"x" * 1000)
    stored = sink.commit()
    wrong = "0" * 64
    with open_object(storage, "k/v", TAR, "v", stored.size, wrong, trust_codec=True) as source:
        if compression == "none":
            with pytest.raises(IntegrityError, match="corrupt"):
                source.finish()
        else:
            assert source.finish().size == 1000
    source = open_object(storage, "k/v", TAR, "v", stored.size + 1, stored.sha256, trust_codec=True)
    with source, pytest.raises(IntegrityError, match="1000 bytes"):
        source.finish()
