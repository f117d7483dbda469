"""The ``restore`` use case: plan, check, extract with verification, configure recovery.

1. ``prepare``: the index -> the backup and the WAL plan (:mod:`cloudbk.repo.pitr`); segments and history files
   the index does not list are looked up with a ``stat`` of their exact keys (the index may lag behind an
   object) before they count as missing; the manifest is read.
2. ``restore``: refuses a manifest without ``global/pg_control``, a non-empty or unwritable destination (and
   tablespace directories, and link targets asked for: :mod:`cloudbk.backup.links`) and a backup with a volume
   missing or truncated, then extracts the volumes of every stream, ``jobs`` at a time
   (:mod:`cloudbk.backup.extract`), checking every file against the manifest and each volume against its SHA-256.
3. The tablespaces are pointed at their (mapped) directories through ``tablespace_map`` and ``pg_tblspc``;
   the recovery settings in ``postgresql.auto.conf`` and ``recovery.signal`` make ``pg_ctl start`` recover.
   ``global/pg_control``, extracted under a temporary name, is renamed into place last, so a restore that
   fails anywhere leaves a directory PostgreSQL refuses to start.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import logging
import os
import pwd
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cloudbk.backup.extract import PG_CONTROL_TMP, Extraction, check_volumes
from cloudbk.backup.links import requested_links
from cloudbk.backup.space import SpaceNeed, check_space, space_needed
from cloudbk.backup.volumes import DEFAULT_JOBS
from cloudbk.errors import CloudbkError, IntegrityError, OperationFailed, UsageError
from cloudbk.pg.datadir import PG_CONTROL, TABLESPACE_MAP
from cloudbk.pg.walnames import history_name, segment_name
from cloudbk.progress import NoProgress, Progress
from cloudbk.repo import layout
from cloudbk.repo.catalog import load_catalog, load_manifest, refuse_damaged
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import Manifest, TarEntry
from cloudbk.repo.pitr import RecoveryPlan, Stretch, Target, check_complete, check_reach, choose_backup, plan_recovery
from cloudbk.repo.ranges import runs
from cloudbk.storage.base import Storage

log = logging.getLogger("cloudbk.backup.restore")

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
    link_all: bool = False  # recreate every link the backup recorded (docs/backup.md, "Symbolic links")
    link_map: dict[str, str] = field(default_factory=dict)  # NAME -> PATH: recreate link NAME pointing at PATH
    force: bool = False
    jobs: int = DEFAULT_JOBS  # volumes downloaded and extracted at once
    # called with (dest, owner) once DEST exists, before extraction (the CLI starts the WAL prefetch there)
    on_extract: Callable[[str, tuple[int, int] | None], None] | None = None


@dataclass
class RestoreResult:
    dest: str
    files: int
    bytes: int
    seconds: float
    settings: dict[str, str]
    tablespaces: dict[int, str]
    links: dict[str, str] = field(default_factory=dict)


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
    """(timeline, segment number) pairs -> stretches of consecutive segments, in the order given."""
    return [
        Stretch(tli, a, b)
        for tli, group in itertools.groupby(items, key=lambda item: item[0])
        for a, b in runs(n for _, n in group)
    ]


def prepare(storage: Storage, server: str, options: RestoreOptions) -> tuple[Index, RecoveryPlan, Manifest]:
    catalog = load_catalog(storage, server)  # the backups that count; a missing index with objects raises
    refuse_damaged(catalog, options.backup_id)
    index = catalog.index
    backup = choose_backup(index, options.target, options.target_timeline, options.backup_id, catalog.backups)
    plan = plan_recovery(index, backup, options.target, options.target_timeline)
    if not options.force:
        check_reach(plan)  # before any other storage work
    if not plan.complete:
        plan = confirm_missing(storage, server, plan)
    return index, plan, load_manifest(storage, server, backup.id)


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


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _require_writable(path: str, what: str) -> None:
    """``path`` exists and is writable, or can be created: its nearest existing parent is writable."""
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        made = "" if existing == path else f"cannot be created: {existing} "
        raise UsageError(
            f"{what} {path} {made}is not writable by this user (uid {os.geteuid()})",
            key=path,
            hint=f"run restore as the OS user that will run the server, with a destination it may write "
            f"(e.g. as root: mkdir {path} && chown {_user_name()}: {path}), or choose another directory",
        )


def check_destinations(dest: str, targets: Mapping[int, str]) -> None:
    _require_empty(dest, "destination")
    _require_writable(dest, "destination")
    for oid, path in targets.items():
        _require_empty(path, f"tablespace {oid} directory")
        _require_writable(path, f"tablespace {oid} directory")
        real_dest = os.path.realpath(dest)
        if os.path.realpath(path) == real_dest or os.path.realpath(path).startswith(real_dest + os.sep):
            raise UsageError(f"tablespace {oid} directory {path} is inside the destination {dest}")


def _make_dir(path: str, owner: tuple[int, int] | None) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    if owner is not None:
        os.chown(path, *owner)


# -- extraction -----------------------------------------------------------------------------------------------


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
        os.write(fd, text.encode("utf-8", "surrogateescape"))
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
        with open(auto, encoding="utf-8", errors="surrogateescape") as f:  # any bytes survive
            for line in f.read().splitlines():
                name = line.split("=", 1)[0].strip().lower()
                lines.append(f"# disabled by cloudbk restore: {line}" if name in RECOVERY_SETTINGS else line)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines.append(f"# recovery settings written by cloudbk restore of backup {backup_id} at {stamp}")
    lines += [f"{name} = {_quote_conf(value)}" for name, value in settings.items()]
    _write_file(auto, "\n".join(lines) + "\n", owner)
    _write_file(os.path.join(dest, "recovery.signal"), "", owner)


def _base_tar(manifest: Manifest) -> TarEntry:
    """The PGDATA tar, after checking the manifest describes a directory that can start a server."""
    base = next((t for t in manifest.tars if t.tablespace_oid is None), None)
    if base is None:
        raise IntegrityError(f"backup {manifest.id} has no PGDATA tar stream", key=manifest.id)
    if not any(f.path == PG_CONTROL for f in base.files):
        raise IntegrityError(
            f"backup {manifest.id} lists no {PG_CONTROL} in its PGDATA tar {base.name}: a server cannot start from it",
            key=manifest.id,
            hint="the backup is damaged or was cut short; nothing was written. Restore another backup",
        )
    return base


def _finish(dest: str, targets: Mapping[int, str], settings: Mapping[str, str], backup_id: str,
            owner: tuple[int, int] | None) -> None:  # fmt: skip
    """Point the tablespaces, write the recovery settings and recovery.signal, and only then pg_control:
    the file that makes DEST startable comes last, after everything else is in place."""
    held_back = os.path.join(dest, PG_CONTROL_TMP)
    signal = os.path.join(dest, "recovery.signal")
    try:
        if not os.path.isfile(held_back) or os.path.islink(held_back):
            raise IntegrityError(f"{dest}: the backup's {PG_CONTROL} was not extracted", key=PG_CONTROL)
        _point_tablespaces(dest, targets, owner)
        write_recovery_config(dest, settings, backup_id, owner)
        os.rename(held_back, os.path.join(dest, PG_CONTROL))
    except (CloudbkError, OSError) as exc:
        if not os.path.isfile(os.path.join(dest, PG_CONTROL)):
            with contextlib.suppress(OSError):
                os.unlink(signal)  # an unstartable DEST must not look like a configured restore
        hint = f"{dest} is incomplete and cannot start (it has no {PG_CONTROL}); empty it before retrying"
        if isinstance(exc, CloudbkError):
            exc.hint = f"{exc.hint}. {hint}" if exc.hint else hint
            raise
        path = getattr(exc, "filename", None)
        where = f" at {path}" if path else ""
        raise OperationFailed(f"restore into {dest} failed{where}: {exc.strerror or exc}", key=path, hint=hint) from exc


def _make_dirs(dest: str, paths: list[str], owner: tuple[int, int] | None) -> None:
    for path in [dest, *paths]:
        try:
            _make_dir(path, owner)
        except OSError as exc:
            raise OperationFailed(
                f"cannot create directory {path}: {exc.strerror}",
                key=path,
                hint="run restore as the OS user that will run the server, with a destination it may create",
            ) from exc


@dataclass
class Preflight:
    """What :func:`preflight` found: where everything goes, and the space it needs."""

    dest: str
    targets: dict[int, str]
    links: dict[str, str]
    space: list[SpaceNeed]


def preflight(
    storage: Storage, server: str, plan: RecoveryPlan, manifest: Manifest, options: RestoreOptions
) -> Preflight:
    """Every check ``restore`` makes before it writes a byte (``restore --dry-run`` stops here): the WAL the
    plan needs, a startable manifest, every volume stored at its size, empty writable destinations, the links
    asked for, and the free space (:mod:`cloudbk.backup.space`). Raises what ``restore`` would refuse with."""
    if not options.force:
        check_complete(plan)
    base = _base_tar(manifest)
    check_volumes(storage, server, manifest)  # every volume stored, at its size: before anything is written
    dest = os.path.abspath(options.dest)
    targets = tablespace_targets(manifest, options.tablespace_mapping)
    check_destinations(dest, targets)
    links = requested_links(base, dest, options.link_all, options.link_map)
    space = space_needed(manifest, plan, dest, targets)
    if not options.force:
        check_space(space)
    return Preflight(dest, targets, links, space)


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
    checked = preflight(storage, server, plan, manifest, options)
    dest, targets, links = checked.dest, checked.targets, checked.links
    # run as root (e.g. from a script) into a directory the server's user made: files go to that user
    owner = None
    if os.geteuid() == 0 and os.path.isdir(dest):
        st = os.stat(dest)
        owner = (st.st_uid, st.st_gid) if st.st_uid != 0 else None
    _make_dirs(dest, list(targets.values()), owner)
    if options.on_extract is not None:
        options.on_extract(dest, owner)

    start = time.monotonic()
    progress.start(f"restore {manifest.id}", manifest.data_size)
    roots = {t.name: dest if t.tablespace_oid is None else targets[t.tablespace_oid] for t in manifest.tars}
    extraction = Extraction(storage, server, manifest, dest, roots, progress, owner, links, options.link_all)
    try:
        written = extraction.run(options.jobs)
    except (CloudbkError, OSError) as exc:
        hint = f"{dest} is incomplete and cannot start (its pg_control was held back); empty it before retrying"
        if links:
            hint += f" and the link targets {', '.join(sorted(links.values()))}"
        if isinstance(exc, CloudbkError):
            exc.hint = f"{exc.hint}. {hint}" if exc.hint else hint
            raise
        raise OperationFailed(
            f"restore into {dest} failed: {exc}", key=getattr(exc, "filename", None), hint=hint
        ) from exc
    progress.finish()

    settings = recovery_settings(options)
    _finish(dest, targets, settings, manifest.id, owner)
    return RestoreResult(
        dest=dest,
        files=manifest.file_count,
        bytes=written,
        seconds=time.monotonic() - start,
        settings=settings,
        tablespaces=targets,
        links=links,
    )
