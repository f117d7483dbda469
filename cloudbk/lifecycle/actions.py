"""Keeping a repository healthy: keep marks, deleting one backup, and carrying out a retention plan.

What exists is decided by the objects, not by the index (a cache), in :mod:`cloudbk.repo.catalog`: a backup
exists while its manifest does (and counts while it is sound), and it is kept while its keep mark
(``<server>/backups/<id>/keep.json``) does. The index mirrors the keep mark as ``"keep": "full"|"standalone"``
in the backup's summary, for listing; the mark is what protects, so a rebuilt or stale index never exposes a
kept backup to retention. One LIST of ``<server>/backups/`` (a handful of keys per backup) gives both.

Deletion order mirrors the write order (data, then manifest, then index): a backup's manifest goes first,
so the backup stops existing in one step; then its data objects; then the index entry. WAL goes before its
index ranges. An interrupted run leaves the index listing things that are gone, which the next run (or
``cloudbk reindex``) finishes; nothing that is still listed as restorable is ever half-deleted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudbk.errors import OperationFailed, UsageError
from cloudbk.lifecycle.retention import (
    DEFAULT_MINIMUM_REDUNDANCY,
    Policy,
    RetentionPlan,
    plan_retention,
)
from cloudbk.pg.walnames import HISTORY, parse_wal_name
from cloudbk.repo import layout
from cloudbk.repo.catalog import KEEP_FULL, KEEP_MODES, Catalog, load_catalog, resolve_backup
from cloudbk.repo.index import Index, update_index
from cloudbk.repo.inflight import DEFAULT_STALE_UPLOAD_AGE, abort_uploads, describe_uploads, find_stale_uploads
from cloudbk.repo.manifest import BackupSummary, format_time
from cloudbk.storage.base import Storage, UploadInfo

log = logging.getLogger("cloudbk.lifecycle.actions")

KEEP_FORMAT_VERSION = 1


def _mirror_keeps(
    keeps: dict[str, str], only: Iterable[str] | None = None, add_only: bool = False
) -> Callable[[Index], bool]:
    """An index change making each summary's ``keep`` field match ``keeps`` (for the backups in ``only``).

    ``add_only`` never removes a mirror: retention repairs missing ones, but a ``keep --release`` racing it
    removes its own, and a ``keep`` racing it must not be undone.
    """
    wanted = None if only is None else set(only)

    def mutate(index: Index) -> bool:
        changed = False
        for backup_id, summary in index.backups.items():
            if wanted is not None and backup_id not in wanted:
                continue
            mode = keeps.get(backup_id)
            if mode is None and add_only:
                continue
            if summary.get("keep") != mode:
                if mode is None:
                    summary.pop("keep", None)
                else:
                    summary["keep"] = mode
                changed = True
        return changed

    return mutate


# -- keep -------------------------------------------------------------------------------------------------


def keep_backup(storage: Storage, server: str, backup_id: str, mode: str = KEEP_FULL) -> BackupSummary:
    """Mark a backup as kept: retention will never expire it (nor, for ``full``, the WAL after it)."""
    if mode not in KEEP_MODES:
        raise UsageError(f"unknown keep mode {mode!r}", hint=f"use one of {', '.join(KEEP_MODES)}")
    catalog = load_catalog(storage, server)
    backup = resolve_backup(catalog, backup_id)
    doc = {
        "format_version": KEEP_FORMAT_VERSION,
        "id": backup.id,
        "mode": mode,
        "since": format_time(datetime.now(UTC)),
    }
    storage.put_bytes(layout.backup_keep_key(server, backup.id), json.dumps(doc, indent=1).encode())
    update_index(storage, server, _mirror_keeps({backup.id: mode}, [backup.id]))
    return backup


def release_backup(storage: Storage, server: str, backup_id: str) -> tuple[BackupSummary, str | None]:
    """Remove a backup's keep mark; returns the backup and the mode it had (None if it was not kept)."""
    catalog = load_catalog(storage, server)
    backup = resolve_backup(catalog, backup_id)
    previous = catalog.keeps.get(backup.id)
    storage.delete(layout.backup_keep_key(server, backup.id))
    update_index(storage, server, _mirror_keeps({}, [backup.id]))
    return backup, previous


# -- delete ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeleteResult:
    backup_id: str
    deleted_keys: list[str]
    existed: bool  # False: only the leftovers of an unfinished or half-deleted backup were removed


def _delete_backups(storage: Storage, server: str, ids: list[str], objects: dict[str, list[str]]) -> list[str]:
    """Manifests first (one batch), then everything else under the backups' prefixes; returns what went."""
    manifests = [
        layout.backup_manifest_key(server, b)
        for b in ids
        if layout.backup_manifest_key(server, b) in objects.get(b, [])
    ]
    if manifests:
        storage.delete_many(manifests)
    # LIST again rather than trust the earlier listing: a writer may have added an object meanwhile.
    rest: list[str] = []
    for b in ids:
        rest.extend(info.key for info in storage.list(layout.backup_prefix(server, b)))
    if rest:
        storage.delete_many(rest)
    return manifests + rest


def _drop_from_index(ids: Iterable[str]) -> Callable[[Index], bool]:
    gone = set(ids)

    def mutate(index: Index) -> bool:
        present = [b for b in index.backups if b in gone]
        for b in present:
            del index.backups[b]
        return bool(present)

    return mutate


def delete_backup(
    storage: Storage,
    server: str,
    backup_id: str,
    force: bool = False,
    minimum_redundancy: int = DEFAULT_MINIMUM_REDUNDANCY,
) -> DeleteResult:
    """Delete one backup (never its WAL: that is retention's job).

    Refuses a kept backup (release it first), and, unless ``force``, refuses to leave fewer than
    ``max(1, minimum_redundancy)`` backups. A backup the index lists but whose manifest is gone (an
    interrupted delete) is finished off; ``force`` is needed to remove the objects of a backup that has
    neither (a backup-push that died, or one still running).
    """
    layout.check_backup_id(backup_id)
    catalog = load_catalog(storage, server)
    keys = catalog.objects.get(backup_id, [])
    if backup_id in catalog.keeps:
        raise OperationFailed(
            f"backup {backup_id} is kept ({catalog.keeps[backup_id]}); refusing to delete it",
            key=backup_id,
            hint=f"release it first with `cloudbk keep --release {backup_id}`",
        )
    backup = catalog.find(backup_id)
    if backup is None:
        if backup_id in catalog.incomplete or backup_id in catalog.vanished or backup_id in catalog.damaged:
            pass  # not counted by redundancy; a vanished one lost its manifest already: finish the job
        elif keys:
            if not force:
                raise OperationFailed(
                    f"backup {backup_id} has no manifest: its {len(keys)} object(s) are left from a backup-push that "
                    "did not finish (or is still running), or from an interrupted delete",
                    key=layout.backup_prefix(server, backup_id),
                    hint="make sure no backup-push is running, then use --force to remove them",
                )
        else:
            raise OperationFailed(
                f"backup {backup_id} does not exist in server {server!r}",
                key=backup_id,
                hint="see `cloudbk backup-list` for the backup ids",
            )
    else:
        floor = max(1, minimum_redundancy)
        remaining = len(catalog.backups) - 1
        if remaining < floor and not force:
            what = "the last backup" if remaining == 0 else f"backup {backup_id}"
            raise OperationFailed(
                f"refusing to delete {what}: {remaining} backup(s) would remain, the minimum is {floor}",
                key=backup_id,
                hint="take a new backup first, or pass --force if you really mean it",
            )
    deleted = _delete_backups(storage, server, [backup_id], catalog.objects)
    update_index(storage, server, _drop_from_index([backup_id]))
    return DeleteResult(backup_id, deleted, backup is not None)


# -- retention ----------------------------------------------------------------------------------------------


@dataclass
class RetentionResult:
    plan: RetentionPlan
    catalog: Catalog
    #: WAL object keys that go (or went), in key order
    wal_keys: list[str]
    #: backup id -> its object keys that go (or went); expired backups and vanished ones
    backup_keys: dict[str, list[str]]
    dry_run: bool
    #: incomplete uploads a killed backup-push or wal-push left, aborted (or to be); see cloudbk.repo.inflight
    stale_uploads: list[UploadInfo] = field(default_factory=list)


def _wal_keys_to_delete(storage: Storage, server: str, plan: RetentionPlan, timelines: Iterable[int]) -> list[str]:
    """LIST each timeline's WAL up to the plan's cut and pick what goes; also catches WAL the index missed."""
    if plan.wal_keep_from is None:
        return []
    keys: list[str] = []
    for timeline in sorted(set(timelines)):
        for info in storage.list(layout.timeline_prefix(server, timeline)):
            name = layout.wal_name_from_key(info.key)
            try:
                wal = parse_wal_name(name)
            except UsageError:
                continue  # not a WAL file: not ours to delete
            if wal.kind == HISTORY or wal.timeline != timeline:
                continue
            if wal.segno(plan.segment_size) >= plan.wal_keep_from:
                break  # keys are sorted by segment number within a timeline: nothing further goes
            if plan.wal_deletable(name):
                keys.append(info.key)
    return keys


def _expire_in_index(plan: RetentionPlan, ids: list[str], keeps: dict[str, str]) -> Callable[[Index], bool]:
    drop = _drop_from_index(ids)
    mirror = _mirror_keeps(keeps, add_only=True)

    def mutate(index: Index) -> bool:
        changed = drop(index)
        if plan.wal_keep_from is not None:
            for timeline, ranges in list(index.segments.items()):
                for first, last in plan.segments_going(timeline, ranges):
                    index.remove_segments(timeline, first, last)
                    changed = True
            going = [name for name in index.other_files if plan.wal_deletable(name)]
            if going:
                index.other_files = [name for name in index.other_files if name not in going]
                changed = True
        return mirror(index) or changed

    return mutate


def apply_retention(
    storage: Storage,
    server: str,
    policy: Policy,
    now: datetime | None = None,
    dry_run: bool = False,
    stale_upload_age: timedelta = DEFAULT_STALE_UPLOAD_AGE,
) -> RetentionResult:
    """Expire what ``policy`` says may go (see :mod:`cloudbk.lifecycle.retention`) and abort the incomplete uploads no
    running backup claims that are older than ``stale_upload_age`` (:mod:`cloudbk.repo.inflight`); with
    ``dry_run`` only report it."""
    now = now or datetime.now(UTC)
    stale = find_stale_uploads(storage, server, now, stale_upload_age)
    catalog = load_catalog(storage, server)
    plan = plan_retention(catalog.backups, catalog.keeps, catalog.index, policy, now)
    expired = [b.id for b in plan.expired]
    timelines = set(catalog.index.segments) | {b.timeline for b in catalog.backups}
    timelines |= {parse_wal_name(n).timeline for n in catalog.index.other_files}
    wal_keys = _wal_keys_to_delete(storage, server, plan, timelines)
    going = expired + [b for b in catalog.vanished if b not in expired]
    backup_keys = {b: sorted(catalog.objects.get(b, [])) for b in going}
    result = RetentionResult(plan, catalog, wal_keys, backup_keys, dry_run, stale)
    if dry_run:
        return result
    for backup_id in expired:
        # The LIST above is a moment old: a `cloudbk keep` since then must still win.
        if storage.exists(layout.backup_keep_key(server, backup_id)):
            raise OperationFailed(
                f"backup {backup_id} was marked kept while retention was running; nothing was deleted",
                key=backup_id,
                hint="run `cloudbk retention` again",
            )
    if going:
        deleted = _delete_backups(storage, server, going, catalog.objects)
        result.backup_keys = {
            b: sorted(k for k in deleted if k.startswith(layout.backup_prefix(server, b))) for b in going
        }
        for backup_id in expired:
            log.info("expired backup %s", backup_id)
    if wal_keys:
        storage.delete_many(wal_keys)
        log.info("deleted %d WAL file(s) older than the oldest retained backup", len(wal_keys))
    update_index(storage, server, _expire_in_index(plan, going, catalog.keeps))
    abort_uploads(storage, stale)
    return result


def describe_plan(result: RetentionResult) -> dict[str, Any]:
    """A JSON-ready description of a retention run."""
    plan = result.plan
    return {
        "policy": plan.policy.describe(),
        "now": format_time(plan.now),
        "dry_run": result.dry_run,
        "backups": [
            {
                "id": d.backup.id,
                "timeline": d.backup.timeline,
                "end_lsn": d.backup.to_dict()["end_lsn"],
                "end_time": d.backup.end_time,
                "status": "retained" if d.retain else "expired",
                "reason": d.reason,
                "keep": d.keep,
            }
            for d in plan.decisions
        ],
        "vanished_backups": result.catalog.vanished,
        "damaged_backups": result.catalog.damaged,
        "unfinished_backups": result.catalog.orphans,
        "wal_keep_from": plan.wal_keep_from,
        "wal_ranges": {f"{t:08X}": r for t, r in sorted(plan.wal_ranges.items())},
        "wal_keys": result.wal_keys,
        "backup_keys": result.backup_keys,
        "stale_uploads": describe_uploads(result.stale_uploads),
    }
