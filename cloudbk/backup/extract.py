"""The restore's data path: check every volume is stored, then extract them ``jobs`` at a time.

Before anything is written, one LIST of the backup's prefix shows each volume the manifest names stored with
the stored size the manifest gives (a missing or truncated volume is refused, naming it). Then a pool of
``jobs`` worker threads (:mod:`cloudbk.backup.workers`) takes the volumes of every stream, largest first;
each worker downloads, decompresses and extracts its volume through a
:class:`~cloudbk.backup.tarextract.SafeExtractor`, checking every file (or piece of a split file) against
the manifest as it is written and the volume against its SHA-256 and size at its end. The first volume to
fail stops the others at their next chunk, and its error, naming the object, is the one raised; the caller
then leaves DEST without ``recovery.signal`` and without ``global/pg_control`` (held back under a temporary
name until everything is verified).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from cloudbk.backup.links import RESERVED
from cloudbk.backup.tarextract import SafeExtractor
from cloudbk.backup.workers import checked, run_parallel
from cloudbk.errors import IntegrityError
from cloudbk.pg.datadir import PG_CONTROL
from cloudbk.progress import Progress
from cloudbk.repo import layout
from cloudbk.repo.manifest import Manifest, TarEntry, VolumeEntry
from cloudbk.repo.objects import TAR, open_object
from cloudbk.storage.base import Storage

PG_CONTROL_TMP = PG_CONTROL + ".cloudbk-restore"
_DAMAGED = "the stored backup is damaged; restore another backup"


def check_volumes(storage: Storage, server: str, manifest: Manifest) -> None:
    """``IntegrityError`` naming the first volume that is not stored, or not at the size the manifest gives."""
    listed = {info.key: info.size for info in storage.list(layout.backup_prefix(server, manifest.id))}
    for _, volume in manifest.volumes:
        key = layout.backup_object_key(server, manifest.id, volume.name)
        size = listed.get(key)
        if size == volume.stored_size:
            continue
        state = "missing" if size is None else f"{size} bytes, the manifest says {volume.stored_size}"
        raise IntegrityError(
            f"backup {manifest.id} cannot be restored: its volume {key} is {state}",
            key=key,
            hint=f"nothing was written; restore another backup (`cloudbk delete {manifest.id}` removes this one)",
        )


@dataclass
class Extraction:
    """Where and how one restore extracts its volumes."""

    storage: Storage
    server: str
    manifest: Manifest
    dest: str
    roots: Mapping[str, str]  # stream name -> the directory it is extracted into
    progress: Progress
    owner: tuple[int, int] | None
    links: Mapping[str, str]  # links asked for (PGDATA-relative name -> target)
    link_all: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)

    def extract(self, item: tuple[TarEntry, VolumeEntry]) -> int:
        """Extract and verify one volume; return the bytes of the files written."""
        tar, volume = item
        key = layout.backup_object_key(self.server, self.manifest.id, volume.name)
        expected = {f.path: f for f in volume.files}
        base = tar.tablespace_oid is None
        extractor = SafeExtractor(
            self.roots[tar.name], expected, {PG_CONTROL: PG_CONTROL_TMP} if base else {},
            checked(self.cancel, self.progress.advance), what=f"backup object {key}", owner=self.owner,
            hash_stream=False, links=self.links if base else {},
            symlinks=tar.links is None,  # only backups from before links were recorded hold link members
            trust_symlinks=self.link_all and tar.links is None,
            reserved=RESERVED if base else {}, make_requested=False,
        )  # fmt: skip
        # every file and piece is checked against its SHA-256 as it is written, every member against the
        # manifest, the tar headers against their own checksums and the payload against its codec's: the volume
        # is not hashed a second time (its size is still checked), except without compression
        source = open_object(self.storage, key, TAR, volume.name, volume.size, volume.sha256, origin="its manifest",
                             hint=_DAMAGED, trust_codec=True)  # fmt: skip
        with source:
            try:
                result, _, _ = extractor.extract(source)  # the codec checks the whole volume against the manifest
                source.finish()
            except IntegrityError as exc:
                if exc.key is None:
                    exc.key = key
                raise
        absent = sorted(set(expected) - set(result.files))
        if absent:
            raise IntegrityError(
                f"backup object {key} lacks {len(absent)} files its manifest lists, e.g. {absent[0]}",
                key=key,
                hint=_DAMAGED,
            )
        return sum(f.size for f in result.files.values())

    def run(self, jobs: int) -> int:
        """Extract every volume, ``jobs`` at a time, then make the links asked for; return the bytes written."""
        items = sorted(self.manifest.volumes, key=lambda item: -item[1].size)  # largest first: a short tail
        written = sum(run_parallel(self.extract, items, jobs, self.cancel, "restore"))
        if self.links:
            SafeExtractor(self.dest, links=self.links, owner=self.owner, what="restore").make_requested_links()
        return written
