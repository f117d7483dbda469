"""Which backups of a server exist and are sound: decided here, once, for every command that uses backups.

``backup-list``, ``backup-show``, ``restore`` (the PITR choice), ``check``, ``wal-verify``, ``retention``,
``delete`` and ``keep`` all start from :func:`load_catalog`, so they agree on what counts as a backup.

A backup counts when, in one LIST of ``<server>/backups/`` and the index:

- its manifest exists (the manifest is written last: without it the backup does not exist);
- its manifest is sound: the index entry records the manifest's size, and the listed size equals it; when it
  differs, or an older index entry records no sizes, the manifest is read and parsed (a manifest that is not
  valid JSON or not a valid manifest makes the backup *damaged*);
- every data object the manifest names is listed with the stored size the manifest gives (a truncated or
  missing tar makes the backup *damaged*);
- its status is complete.

Damaged backups are reported (``Catalog.damaged``), never counted, never chosen, never expired by
retention (``cloudbk delete ID`` removes one). A manifest that cannot be *read* because the storage failed
(anything but NotFound) raises: a transient error is never taken for "not a backup", so retention never
deletes on it. Re-reading every byte of the data objects is not done here (that is ``verify``'s job).

When ``index.json`` is missing although backup or WAL objects exist, :func:`load_catalog` raises with a hint
to run ``cloudbk reindex``, rather than reporting an empty repository (one extra LIST, limited to its first
page, on that path only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudbk.errors import CorruptManifest, IntegrityError, NotFound, OperationFailed
from cloudbk.repo import layout
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import STATUS_COMPLETE, BackupSummary, Manifest, order_backups
from cloudbk.storage.base import ObjectInfo, Storage

log = logging.getLogger("cloudbk.repo.catalog")

#: keep modes (``cloudbk keep``): ``full`` keeps all WAL after the backup, ``standalone`` only its own
KEEP_FULL = "full"
KEEP_STANDALONE = "standalone"
KEEP_MODES = (KEEP_FULL, KEEP_STANDALONE)

REINDEX_HINT = "run `cloudbk reindex` to rebuild the index from the objects"


@dataclass
class Catalog:
    """The backups of one server as the objects say, reconciled with the index."""

    index: Index
    #: complete, sound backups whose manifest exists, oldest first (end LSN, then end time)
    backups: list[BackupSummary]
    #: backup id -> keep mode, from the keep marks in storage
    keeps: dict[str, str]
    #: backup id -> every key under its prefix (manifest, data objects, keep mark)
    objects: dict[str, list[str]]
    #: False when the index object does not exist (a new repository, or one whose index was deleted)
    index_found: bool = True
    #: listed by the index, but their manifest is gone (an interrupted delete): they do not exist
    vanished: list[str] = field(default_factory=list)
    #: their manifest exists but the index does not list them (read from the manifest instead)
    unindexed: list[str] = field(default_factory=list)
    #: manifests whose status is not complete: never counted, never expired
    incomplete: list[str] = field(default_factory=list)
    #: objects without a manifest or index entry: a backup-push still running, or one that died
    orphans: list[str] = field(default_factory=list)
    #: backup id -> what is wrong with it (corrupt manifest, truncated or missing data object)
    damaged: dict[str, str] = field(default_factory=dict)

    def find(self, backup_id: str) -> BackupSummary | None:
        return next((b for b in self.backups if b.id == backup_id), None)


def damaged_hint(backup_id: str) -> str:
    return (
        f"backup {backup_id} cannot be restored; take a new backup with `cloudbk backup-push`, then remove this "
        f"one with `cloudbk delete {backup_id}`"
    )


def read_keep_mark(storage: Storage, server: str, backup_id: str) -> str | None:
    """The keep mode of a backup, or None when it is not kept."""
    key = layout.backup_keep_key(server, backup_id)
    try:
        doc = storage.get_json(key)
    except NotFound:
        return None
    except ValueError as exc:
        # A damaged mark still means "kept": err on the side of keeping.
        log.warning("keep mark %s is unreadable (%s); treating the backup as kept (full)", key, exc)
        return KEEP_FULL
    mode = doc.get("mode") if isinstance(doc, dict) else None
    return mode if mode in KEEP_MODES else KEEP_FULL


def read_keep_marks(storage: Storage, server: str) -> dict[str, str]:
    """Every kept backup of ``server`` and its keep mode (for ``cloudbk reindex`` to mirror in the index)."""
    keeps: dict[str, str] = {}
    for info in storage.list(layout.backups_prefix(server)):
        backup_id = layout.backup_id_from_key(server, info.key)
        if backup_id is not None and info.key == layout.backup_keep_key(server, backup_id):
            keeps[backup_id] = read_keep_mark(storage, server, backup_id) or KEEP_FULL
    return keeps


def _read_index(storage: Storage, server: str) -> Index | None:
    key = layout.index_key(server)
    try:
        data = storage.get_bytes(key)
    except NotFound:
        return None
    return Index.from_json(data, key)


def _any_wal(storage: Storage, server: str) -> bool:
    """Whether anything is stored under the WAL prefix: the first page of one LIST, no more."""
    listing = storage.list(layout.wal_prefix(server))
    try:
        return next(listing, None) is not None
    finally:
        close = getattr(listing, "close", None)
        if close is not None:
            close()


def _missing_index(storage: Storage, server: str, objects: dict[str, dict[str, ObjectInfo]]) -> None:
    """Raise when the index is missing although the repository holds backups or WAL."""
    found = []
    # only finished backups count: a heartbeat or parts of a backup-push still running are no sign of a lost index
    with_manifest = [b for b, infos in objects.items() if layout.MANIFEST_NAME in infos]
    if with_manifest:
        found.append(f"{len(with_manifest)} backup(s) under {layout.backups_prefix(server)}")
    if _any_wal(storage, server):
        found.append(f"WAL under {layout.wal_prefix(server)}")
    if found:
        raise IntegrityError(
            f"the index {layout.index_key(server)} is missing, but the repository holds {' and '.join(found)}",
            key=layout.index_key(server),
            hint=REINDEX_HINT,
        )


def _sizes_problem(doc: dict[str, Any], infos: dict[str, ObjectInfo]) -> str | None:
    """What is wrong with a backup's data objects against the stored sizes its summary records."""
    for name, size in sorted(doc["objects"].items()):
        info = infos.get(name)
        if info is None:
            return f"its data object {name} is missing"
        if info.size != size:
            return f"its data object {name} is {info.size} bytes, the manifest says {size}"
    return None


def _sized(doc: dict[str, Any] | None) -> bool:
    return doc is not None and isinstance(doc.get("objects"), dict) and isinstance(doc.get("manifest_size"), int)


def _summary_doc(
    storage: Storage, server: str, backup_id: str, entry: dict[str, Any] | None, manifest: ObjectInfo
) -> dict[str, Any] | None:
    """The summary to judge a backup by: the index entry when its manifest size matches, else the manifest.

    Returns None when the manifest vanished meanwhile; raises ``CorruptManifest`` for a manifest that is not
    valid, and lets every other error through (a read that failed says nothing about the backup).
    """
    if entry is not None and _sized(entry) and entry["manifest_size"] == manifest.size:
        return entry
    try:
        data = storage.get_bytes(manifest.key)
    except NotFound:
        return None  # deleted between the LIST and now
    return Manifest.from_json(data, manifest.key).summary(manifest_size=len(data))


def _judge(catalog: Catalog, storage: Storage, server: str, backup_id: str, infos: dict[str, ObjectInfo]) -> None:
    """Place one backup with a manifest in the catalog: counted, incomplete, or damaged."""
    entry = catalog.index.backups.get(backup_id)
    manifest = infos[layout.MANIFEST_NAME]
    try:
        doc = _summary_doc(storage, server, backup_id, entry, manifest)
    except CorruptManifest as exc:
        catalog.damaged[backup_id] = f"its manifest {manifest.key} is corrupt: {exc.message}"
        return
    if doc is None:
        return
    if entry is None:
        catalog.unindexed.append(backup_id)
        log.warning("backup %s has a manifest but is not in the index; run `cloudbk reindex`", backup_id)
    summary = BackupSummary.from_dict(doc, layout.index_key(server) if doc is entry else manifest.key)
    problem = _sizes_problem(doc, infos)
    if problem is not None:
        catalog.damaged[backup_id] = problem
    elif summary.status == STATUS_COMPLETE:
        catalog.backups.append(summary)
    else:
        catalog.incomplete.append(backup_id)


def load_catalog(storage: Storage, server: str) -> Catalog:
    """Read the index and LIST the backups prefix; decide which backups count (see the module docstring)."""
    read = _read_index(storage, server)
    index = read if read is not None else Index(server=server)
    listed: dict[str, dict[str, ObjectInfo]] = {}
    prefix = layout.backups_prefix(server)
    for info in storage.list(prefix):
        backup_id = layout.backup_id_from_key(server, info.key)
        if backup_id is not None:
            name = info.key[len(layout.backup_prefix(server, backup_id)) :]
            listed.setdefault(backup_id, {})[name] = info
    if read is None:
        _missing_index(storage, server, listed)
    objects = {b: [info.key for info in infos.values()] for b, infos in listed.items()}
    catalog = Catalog(index=index, backups=[], keeps={}, objects=objects, index_found=read is not None)
    for backup_id, infos in sorted(listed.items()):
        if layout.KEEP_NAME in infos:
            catalog.keeps[backup_id] = read_keep_mark(storage, server, backup_id) or KEEP_FULL
        if layout.MANIFEST_NAME not in infos:
            if backup_id not in index.backups:
                catalog.orphans.append(backup_id)
            continue
        _judge(catalog, storage, server, backup_id, infos)
    for backup_id, problem in catalog.damaged.items():
        log.warning("backup %s is damaged: %s; it does not count as a backup", backup_id, problem)
    catalog.vanished = sorted(b for b in index.backups if layout.MANIFEST_NAME not in listed.get(b, {}))
    catalog.backups = order_backups(catalog.backups)
    return catalog


def resolve_backup(catalog: Catalog, backup_id: str) -> BackupSummary:
    """The backup ``backup_id`` (or the newest for ``latest``); ``OperationFailed`` when it does not exist,
    ``IntegrityError`` when it is damaged."""
    if backup_id == "latest":
        if not catalog.backups:
            raise OperationFailed(
                f"server {catalog.index.server!r} has no backups", hint="take one with `cloudbk backup-push`"
            )
        return catalog.backups[-1]
    layout.check_backup_id(backup_id)
    if backup_id in catalog.damaged:
        raise IntegrityError(
            f"backup {backup_id} is damaged: {catalog.damaged[backup_id]}",
            key=layout.backup_prefix(catalog.index.server, backup_id),
            hint=damaged_hint(backup_id),
        )
    return find_backup(catalog.backups, backup_id, catalog.index.server)


def find_backup(backups: Sequence[BackupSummary], backup_id: str, server: str) -> BackupSummary:
    """The backup ``backup_id`` among ``backups``; ``OperationFailed`` naming the server when it is not there."""
    found = next((b for b in backups if b.id == backup_id), None)
    if found is None:
        raise OperationFailed(
            f"backup {backup_id} does not exist in server {server!r}",
            key=backup_id,
            hint="see `cloudbk backup-list` for the backup ids",
        )
    return found


def load_manifest(storage: Storage, server: str, backup_id: str) -> Manifest:
    """The manifest of a backup the index or a LIST showed; ``OperationFailed`` when it is gone since."""
    key = layout.backup_manifest_key(server, backup_id)
    try:
        return Manifest.from_json(storage.get_bytes(key), key)
    except NotFound as exc:
        raise OperationFailed(
            f"backup {backup_id} is in the index but its manifest {key} is gone",
            key=key,
            hint="run `cloudbk reindex`, then choose another backup",
        ) from exc


def refuse_damaged(catalog: Catalog, backup_id: str | None) -> None:
    """For restore: raise ``IntegrityError`` when the backup asked for is damaged, or when no backup counts
    and some are damaged (rather than saying there are none)."""
    damaged = catalog.damaged
    if backup_id is not None and backup_id != "latest":
        if backup_id in damaged:
            resolve_backup(catalog, backup_id)
        return
    if not catalog.backups and damaged:
        first = sorted(damaged)[-1]
        raise IntegrityError(
            f"server {catalog.index.server!r} has no sound backup: "
            + "; ".join(f"backup {b} is damaged: {damaged[b]}" for b in sorted(damaged)),
            key=layout.backup_prefix(catalog.index.server, first),
            hint=damaged_hint(first),
        )
