"""The ``restore`` use case: plan, check, extract with verification, configure recovery.

1. ``prepare``: the index -> the backup and the WAL plan (:mod:`cloudbk.pitr`); segments and history files
   the index does not list are looked up with a ``stat`` of their exact keys (the index may lag behind an
   object) before they count as missing; the manifest is read.
2. ``restore``: refuses a non-empty destination (and non-empty tablespace directories), then extracts each
   tar stream (in parallel threads) through :class:`cloudbk.tarstream.SafeExtractor`, checking every file
   against the manifest and each stream against its SHA-256. ``global/pg_control`` is written under a
   temporary name and renamed into place only when everything has been verified, so a failed restore leaves
   a directory PostgreSQL refuses to start.
3. The tablespaces are pointed at their (mapped) directories through ``tablespace_map`` and ``pg_tblspc``;
   ``recovery.signal`` and the recovery settings in ``postgresql.auto.conf`` make ``pg_ctl start`` recover.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cloudbk import layout
from cloudbk.compression import DecompressingReader
from cloudbk.envelope import read_header
from cloudbk.errors import CloudbkError, IntegrityError, NotFound, OperationFailed, UsageError
from cloudbk.index import Index, load_index
from cloudbk.manifest import BASE_TAR, Manifest, TarEntry
from cloudbk.pgdata import PG_CONTROL, TABLESPACE_MAP
from cloudbk.pitr import RecoveryPlan, Stretch, Target, check_reach, choose_backup, plan_recovery
from cloudbk.progress import NoProgress, Progress
from cloudbk.storage.base import Storage
from cloudbk.tarstream import SafeExtractor
from cloudbk.wal import history_name, segment_name

log = logging.getLogger("cloudbk.restore")

PG_CONTROL_TMP = PG_CONTROL + ".cloudbk-restore"
MAX_STATS = 2000  # exact-key lookups before refusing a plan; more means the index is stale: reindex
STAT_THREADS = 8
# settings a restored postgresql.auto.conf must not carry over from an earlier restore of the same cluster
RECOVERY_SETTINGS = (
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_action",
    "recovery_target_timeline",
    "recovery_target_inclusive",
    "primary_conninfo",
    "primary_slot_name",
)


@dataclass
class RestoreOptions:
    dest: str
    restore_command: str
    target: Target = field(default_factory=Target)
    backup_id: str | None = None
    target_action: str = "promote"
    target_timeline: int | None = None  # None: 'latest'
    tablespace_mapping: dict[str, str] = field(default_factory=dict)
    force: bool = False
    parallel: int = 4


@dataclass
class RestoreResult:
    dest: str
    files: int
    bytes: int
    seconds: float
    settings: dict[str, str]
    tablespaces: dict[int, str]


# -- planning -------------------------------------------------------------------------------------------------


def confirm_missing(storage: Storage, server: str, plan: RecoveryPlan) -> RecoveryPlan:
    """Drop from ``plan.missing`` whatever a ``stat`` of the exact key finds (the index lagging behind)."""
    names: list[tuple[int, int]] = [(m.timeline, n) for m in plan.missing for n in range(m.first, m.last + 1)]
    checked, unchecked = names[:MAX_STATS], names[MAX_STATS:]
    if unchecked:
        log.warning(
            "the index is missing %d segments on the recovery path; it may be stale (`cloudbk reindex`)", len(names)
        )

    def present(item: tuple[int, int]) -> bool:
        return storage.exists(layout.wal_key(server, segment_name(item[0], item[1], plan.segment_size)))

    with cf.ThreadPoolExecutor(max_workers=STAT_THREADS, thread_name_prefix="cloudbk-stat") as pool:
        found = dict(zip(checked, pool.map(present, checked), strict=True))
    absent = [item for item in names if not found.get(item, False)]
    plan.missing = _ranges(absent)
    plan.missing_histories = [
        t for t in plan.missing_histories if not storage.exists(layout.wal_key(server, history_name(t)))
    ]
    return plan


def _ranges(items: list[tuple[int, int]]) -> list[Stretch]:
    out: list[Stretch] = []
    for tli, n in items:
        if out and out[-1].timeline == tli and out[-1].last == n - 1:
            out[-1] = Stretch(tli, out[-1].first, n)
        else:
            out.append(Stretch(tli, n, n))
    return out


def prepare(storage: Storage, server: str, options: RestoreOptions) -> tuple[Index, RecoveryPlan, Manifest]:
    index = load_index(storage, server)
    backup = choose_backup(index, options.target, options.target_timeline, options.backup_id)
    plan = plan_recovery(index, backup, options.target, options.target_timeline)
    if not options.force:
        check_reach(plan)  # before any other storage work
    if not plan.complete:
        plan = confirm_missing(storage, server, plan)
    key = layout.backup_manifest_key(server, backup.id)
    try:
        manifest = Manifest.from_json(storage.get_bytes(key), key)
    except NotFound as exc:
        raise OperationFailed(
            f"backup {backup.id} is in the index but its manifest {key} is gone",
            key=key,
            hint="run `cloudbk reindex`, then choose another backup",
        ) from exc
    return index, plan, manifest


# -- destinations ---------------------------------------------------------------------------------------------


def _require_empty(path: str, what: str) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path} exists and is not a directory", key=path)
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(
            f"{what} {path} is not empty; restore never overwrites files",
            key=path,
            hint="give an empty or new directory (or --tablespace-mapping OLD=NEW for a tablespace)",
        )


def tablespace_targets(manifest: Manifest, mapping: Mapping[str, str]) -> dict[int, str]:
    """Tablespace OID -> the directory it is restored to."""
    locations = {os.path.normpath(ts.location): ts for ts in manifest.tablespaces}
    normalized: dict[str, str] = {}
    for old, new in mapping.items():
        if os.path.normpath(old) not in locations:
            known = ", ".join(sorted(locations)) or "none"
            raise UsageError(
                f"--tablespace-mapping {old}={new}: the backup has no tablespace at {old}",
                hint=f"its tablespaces: {known}",
            )
        if not os.path.isabs(new):
            raise UsageError(f"--tablespace-mapping {old}={new}: the new directory must be an absolute path")
        normalized[os.path.normpath(old)] = os.path.normpath(new)
    return {ts.oid: normalized.get(loc, loc) for loc, ts in locations.items()}


def check_destinations(dest: str, targets: Mapping[int, str]) -> None:
    _require_empty(dest, "destination")
    for oid, path in targets.items():
        _require_empty(path, f"tablespace {oid} directory")
        real_dest = os.path.realpath(dest)
        if os.path.realpath(path) == real_dest or os.path.realpath(path).startswith(real_dest + os.sep):
            raise UsageError(f"tablespace {oid} directory {path} is inside the destination {dest}")


def _make_dir(path: str, owner: tuple[int, int] | None) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    if owner is not None:
        os.chown(path, *owner)


# -- extraction -----------------------------------------------------------------------------------------------


def _extract_tar(
    storage: Storage,
    server: str,
    manifest: Manifest,
    tar: TarEntry,
    root: str,
    progress: Progress,
    owner: tuple[int, int] | None,
) -> int:
    key = layout.backup_object_key(server, manifest.id, tar.name)
    expected = {f.path: f for f in tar.files}
    rename = {PG_CONTROL: PG_CONTROL_TMP} if tar.tablespace_oid is None else {}
    with storage.open_read(key) as obj:
        header = read_header(obj, key)
        if header.kind != "tar" or header.name != tar.name:
            raise IntegrityError(f"object {key} holds {header.kind} {header.name!r}, not tar {tar.name!r}", key=key)
        stream = DecompressingReader(header.compression, obj)
        try:
            extractor = SafeExtractor(
                root, expected, rename, progress.advance, what=f"backup object {key}", owner=owner, hash_stream=False
            )
            result, _, _ = extractor.extract(stream)  # the decompressor hashes the whole stream already
            sha256, size = stream.sha256, stream.size
        except IntegrityError as exc:
            if exc.key is None:
                exc.key = key
            raise
        finally:
            stream.close()
    if size != tar.size or sha256 != tar.sha256:
        raise IntegrityError(
            f"backup object {key} does not match its manifest: {size} bytes with SHA-256 {sha256[:16]}…, "
            f"expected {tar.size} bytes with {tar.sha256[:16]}…",
            key=key,
            hint="the stored backup is damaged; restore another backup",
        )
    absent = sorted(set(expected) - set(result.files))
    if absent:
        raise IntegrityError(
            f"backup object {key} lacks {len(absent)} files its manifest lists, e.g. {absent[0]}",
            key=key,
            hint="the stored backup is damaged; restore another backup",
        )
    return sum(f.size for f in result.files.values())


def _escape_map_path(path: str) -> str:
    # tablespace_map escapes backslash, CR and LF with a backslash (xlog.c, do_pg_backup_start)
    out = []
    for ch in path:
        if ch in "\\\r\n":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def _point_tablespaces(dest: str, targets: Mapping[int, str], owner: tuple[int, int] | None) -> None:
    if not targets:
        return
    text = "".join(f"{oid} {_escape_map_path(path)}\n" for oid, path in sorted(targets.items()))
    map_path = os.path.join(dest, TABLESPACE_MAP)
    if os.path.lexists(map_path):
        os.unlink(map_path)
    _write_file(map_path, text, owner)
    tblspc = os.path.join(dest, "pg_tblspc")
    _make_dir(tblspc, owner)
    for oid, path in targets.items():
        link = os.path.join(tblspc, str(oid))
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(path, link)
        if owner is not None:
            os.lchown(link, *owner)


def _write_file(path: str, text: str, owner: tuple[int, int] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if owner is not None:
        os.chown(path, *owner)


def _quote_conf(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def recovery_settings(options: RestoreOptions) -> dict[str, str]:
    settings = {"restore_command": options.restore_command}
    settings.update(options.target.settings())
    if options.target.kind != "end":
        settings["recovery_target_action"] = options.target_action
    settings["recovery_target_timeline"] = str(options.target_timeline) if options.target_timeline else "latest"
    return settings


def write_recovery_config(
    dest: str, settings: Mapping[str, str], backup_id: str, owner: tuple[int, int] | None
) -> None:
    """recovery.signal, and the settings appended to postgresql.auto.conf (earlier recovery settings there,
    left by a previous restore of this cluster, are commented out: two targets would stop the server)."""
    auto = os.path.join(dest, "postgresql.auto.conf")
    lines: list[str] = []
    if os.path.exists(auto):
        with open(auto, encoding="utf-8") as f:
            for line in f.read().splitlines():
                name = line.split("=", 1)[0].strip().lower()
                lines.append(f"# disabled by cloudbk restore: {line}" if name in RECOVERY_SETTINGS else line)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines.append(f"# recovery settings written by cloudbk restore of backup {backup_id} at {stamp}")
    lines += [f"{name} = {_quote_conf(value)}" for name, value in settings.items()]
    _write_file(auto, "\n".join(lines) + "\n", owner)
    _write_file(os.path.join(dest, "recovery.signal"), "", owner)


def restore(
    storage: Storage,
    server: str,
    plan: RecoveryPlan,
    manifest: Manifest,
    options: RestoreOptions,
    progress: Progress | None = None,
) -> RestoreResult:
    """Extract ``manifest``'s backup into ``options.dest`` and configure the recovery ``plan``."""
    progress = progress or NoProgress()
    if not plan.complete and not options.force:
        raise OperationFailed(
            "the archive lacks WAL this recovery needs: " + "; ".join(plan.describe_missing()),
            hint="nothing was written. Choose another target or backup, or pass --force to restore anyway "
            "(recovery will stop at the first missing segment)",
        )
    if not any(t.tablespace_oid is None and t.name.startswith(BASE_TAR + ".") for t in manifest.tars):
        raise IntegrityError(f"backup {manifest.id} has no PGDATA tar stream", key=manifest.id)
    dest = os.path.abspath(options.dest)
    targets = tablespace_targets(manifest, options.tablespace_mapping)
    check_destinations(dest, targets)
    # run as root (e.g. from a script) into a directory the server's user made: files go to that user
    owner = None
    if os.geteuid() == 0 and os.path.isdir(dest):
        st = os.stat(dest)
        owner = (st.st_uid, st.st_gid) if st.st_uid != 0 else None
    _make_dir(dest, owner)
    for path in targets.values():
        _make_dir(path, owner)

    start = time.monotonic()
    progress.start(f"restore {manifest.id}", manifest.data_size)
    roots = {t.name: dest if t.tablespace_oid is None else targets[t.tablespace_oid] for t in manifest.tars}
    try:
        with cf.ThreadPoolExecutor(max_workers=max(1, min(options.parallel, len(manifest.tars)))) as pool:
            futures = [
                pool.submit(_extract_tar, storage, server, manifest, t, roots[t.name], progress, owner)
                for t in manifest.tars
            ]
            written = sum(f.result() for f in futures)
    except (CloudbkError, OSError) as exc:
        hint = f"{dest} is incomplete and cannot start (its pg_control was held back); empty it before retrying"
        if isinstance(exc, CloudbkError):
            exc.hint = f"{exc.hint}. {hint}" if exc.hint else hint
            raise
        raise OperationFailed(
            f"restore into {dest} failed: {exc}", key=getattr(exc, "filename", None), hint=hint
        ) from exc
    progress.finish()

    _point_tablespaces(dest, targets, owner)
    settings = recovery_settings(options)
    write_recovery_config(dest, settings, manifest.id, owner)
    os.rename(os.path.join(dest, PG_CONTROL_TMP), os.path.join(dest, PG_CONTROL))
    return RestoreResult(
        dest=dest,
        files=manifest.file_count,
        bytes=written,
        seconds=time.monotonic() - start,
        settings=settings,
        tablespaces=targets,
    )
