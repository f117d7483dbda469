"""``cloudbk reindex``: rebuild a server's index from the objects themselves.

The index is a cache (SPEC §2); the objects are the truth: WAL segment keys give the segment ranges per
timeline, history objects give the timeline histories, and each backup's manifest gives its summary (a
backup prefix without a manifest is an unfinished backup and is reported, not listed).

A rebuild must not lose entries written while it lists (a wal-push racing with it): the new index is
stored by compare-and-swap, and an entry that the old index has but the listing did not see is kept when a
``stat`` of its exact key finds the object; entries added to the index after the rebuild read it are kept
as they are.

An index that does not parse (truncated, overwritten) is no obstacle: it is treated as empty, and the
rebuilt one replaces it by compare-and-swap against the damaged version (so a writer that replaced it in
the meantime is merged with, not overwritten). An index of a newer format version is refused instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from dataclasses import dataclass, field

from cloudbk.errors import CorruptManifest, IntegrityError, NotFound, UnreadableIndex, UsageError
from cloudbk.pg.walnames import (
    DEFAULT_SEGMENT_SIZE,
    HISTORY,
    SEGMENT,
    HistoryEntry,
    parse_history,
    parse_segment_header,
    parse_wal_name,
    segment_name,
)
from cloudbk.repo import layout
from cloudbk.repo.catalog import KEEP_FULL, read_keep_mark
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.repo.manifest import Manifest
from cloudbk.repo.objects import WAL, open_object, read_object
from cloudbk.storage.base import Storage

log = logging.getLogger("cloudbk.lifecycle.reindex")

STAT_THREADS = 8


@dataclass
class ReindexReport:
    segments: int = 0
    timelines: list[int] = field(default_factory=list)
    histories: int = 0
    other_files: int = 0
    backups: int = 0
    unfinished_backups: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # objects skipped, with the reason
    damaged_backups: list[str] = field(default_factory=list)  # their manifest is corrupt: not listed
    kept_concurrent: int = 0  # entries the listing missed but whose objects exist (written meanwhile)
    added: int = 0  # segments the old index lacked
    removed: int = 0  # segments the old index listed whose objects are gone
    index_unreadable: str | None = None  # why the index the rebuild replaced did not parse


def _segments(index: Index) -> set[tuple[int, int]]:
    return {(t, n) for t, ranges in index.segments.items() for a, b in ranges for n in range(a, b + 1)}


def _segment_header_facts(storage: Storage, key: str, name: str) -> tuple[str, int] | None:
    """(system identifier, segment size) from the first bytes of a stored segment."""
    with open_object(storage, key, WAL, name) as source:
        head = source.read(64)
    parsed = parse_segment_header(head)
    return None if parsed is None else (str(parsed.system_identifier), parsed.segment_size)


def scan(storage: Storage, server: str, old: Index) -> tuple[Index, ReindexReport]:
    """The index the objects describe (no write)."""
    report = ReindexReport()
    new = Index(server=server, system_identifier=old.system_identifier, wal_segment_size=old.wal_segment_size)

    manifests: list[tuple[Manifest, int]] = []  # with the stored manifest's size
    kept: list[str] = []  # backups with a keep mark (cloudbk keep)
    ids: dict[str, bool] = {}
    for info in storage.list(layout.backups_prefix(server)):
        rest = info.key[len(layout.backups_prefix(server)) :]
        backup_id, _, name = rest.partition("/")
        ids.setdefault(backup_id, False)
        if name == layout.KEEP_NAME:
            kept.append(backup_id)
        if name == layout.MANIFEST_NAME:
            ids[backup_id] = True
            data = storage.get_bytes(info.key)  # a read that fails is an error, never "not a backup"
            try:
                manifests.append((Manifest.from_json(data, info.key), len(data)))
            except CorruptManifest as exc:
                report.unreadable.append(f"{info.key}: {exc.message}")
                report.damaged_backups.append(backup_id)
    report.unfinished_backups = sorted(i for i, has_manifest in ids.items() if not has_manifest)
    for m, manifest_size in manifests:
        new.backups[m.id] = m.summary(manifest_size=manifest_size)
        new.system_identifier = new.system_identifier or m.system_identifier
        new.wal_segment_size = new.wal_segment_size or m.wal_segment_size
    # the index mirrors keep marks; the marks themselves are what protects a backup from retention
    for backup_id in kept:
        if backup_id in new.backups:
            new.backups[backup_id]["keep"] = read_keep_mark(storage, server, backup_id) or KEEP_FULL

    segment_keys: list[tuple[str, str]] = []
    for info in storage.list(layout.wal_prefix(server)):
        name = layout.wal_name_from_key(info.key)
        try:
            wal = parse_wal_name(name)
            if layout.wal_key(server, wal) != info.key:
                raise UsageError("not where its name says it belongs")
        except UsageError as exc:
            report.unreadable.append(f"{info.key}: {exc.message}")
            continue
        if wal.kind == SEGMENT:
            segment_keys.append((info.key, name))
        elif wal.kind == HISTORY:
            chunks: list[bytes] = []
            try:
                read_object(storage, info.key, WAL, name, chunks.append)
                entries: list[HistoryEntry] = parse_history(b"".join(chunks).decode())
            except (IntegrityError, UsageError, UnicodeDecodeError) as exc:
                report.unreadable.append(f"{info.key}: {exc}")
                continue
            new.add_history(wal.timeline, entries)
        else:
            new.add_other_file(name)

    if segment_keys and (new.wal_segment_size is None or new.system_identifier is None):
        facts = _segment_header_facts(storage, *segment_keys[0])
        if facts is not None:
            new.system_identifier = new.system_identifier or facts[0]
            new.wal_segment_size = new.wal_segment_size or facts[1]
    size = new.wal_segment_size or DEFAULT_SEGMENT_SIZE
    for _key, name in segment_keys:
        wal = parse_wal_name(name)
        new.add_segments(wal.timeline, wal.segno(size))

    report.segments = len(segment_keys)
    report.timelines = sorted(new.segments)
    report.histories = len(new.histories)
    report.other_files = len(new.other_files)
    report.backups = len(new.backups)
    return new, report


def _read_old(storage: Storage, server: str) -> tuple[Index, str | None]:
    """The current index, or an empty one with the reason when it does not parse (the rebuild replaces it)."""
    try:
        return load_index(storage, server), None
    except UnreadableIndex as exc:
        log.warning("%s; rebuilding it from the objects", exc.message)
        return Index(server=server), exc.message


def reindex(storage: Storage, server: str) -> ReindexReport:
    """Rebuild and store the index of ``server``; see the module docstring for concurrent writers."""
    old, report_unreadable = _read_old(storage, server)
    new, report = scan(storage, server, old)
    report.index_unreadable = report_unreadable
    size = new.wal_segment_size or DEFAULT_SEGMENT_SIZE

    # Entries the old index has and the listing did not see: kept if their objects exist now.
    old_segments, new_segments = _segments(old), _segments(new)
    unseen = sorted(old_segments - new_segments)

    def exists(item: tuple[int, int]) -> bool:
        return storage.exists(layout.wal_key(server, segment_name(item[0], item[1], size)))

    with cf.ThreadPoolExecutor(max_workers=STAT_THREADS, thread_name_prefix="cloudbk-stat") as pool:
        kept = [item for item, ok in zip(unseen, pool.map(exists, unseen), strict=True) if ok]
    kept_backups = {}
    for backup_id, summary in old.backups.items():
        if backup_id not in new.backups and backup_id not in report.damaged_backups:
            try:
                storage.stat(layout.backup_manifest_key(server, backup_id))
                kept_backups[backup_id] = summary
            except NotFound:
                pass
    report.kept_concurrent = len(kept) + len(kept_backups)
    report.added = len(new_segments - old_segments)
    report.removed = len(unseen) - len(kept)

    def mutate(current: Index) -> bool:
        # whatever reached the index after we read it is newer than our listing: keep it as it is
        arrived = _segments(current) - old_segments
        for tli, n in [*kept, *arrived]:
            new.add_segments(tli, n)
        for backup_id, summary in {**kept_backups, **current.backups}.items():
            if backup_id not in old.backups or backup_id in kept_backups:
                new.backups.setdefault(backup_id, summary)
        for tli, entries in current.histories.items():
            if tli not in old.histories:
                new.histories.setdefault(tli, entries)
        for name in current.other_files:
            if name not in old.other_files:
                new.add_other_file(name)
        if current.system_identifier and not new.system_identifier:
            new.system_identifier = current.system_identifier
        current.system_identifier = new.system_identifier
        current.wal_segment_size = new.wal_segment_size
        current.segments = {t: [list(r) for r in ranges] for t, ranges in new.segments.items()}
        current.histories = dict(new.histories)
        current.other_files = list(new.other_files)
        current.backups = dict(new.backups)
        return True

    update_index(storage, server, mutate, replace_unreadable=True)
    return report
