"""What cloudbk knows about a data directory: which files a base backup copies (of it, or of a tablespace
directory), and which recovery mode its signal files put the server in.

The exclusions follow PostgreSQL's documentation ("Making a Base Backup Using the Low Level API") and what
pg_basebackup leaves out (``basebackup.c``): server runtime state, WAL (fetched from the archive instead),
replication slots, temporary files and relations, relation cache init files, and the non-init forks of
unlogged relations (they are reset from their init fork at the end of recovery). Directories whose contents
are skipped are still copied, empty, because the server expects them to exist.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cloudbk.errors import LinkLoop, OperationFailed

log = logging.getLogger("cloudbk.pg.datadir")

PG_CONTROL = "global/pg_control"
BACKUP_LABEL = "backup_label"
TABLESPACE_MAP = "tablespace_map"

# Files skipped wherever they appear (basebackup.c excludeFiles).
EXCLUDED_FILES = frozenset(
    {
        "postmaster.pid",
        "postmaster.opts",
        "postgresql.auto.conf.tmp",
        "current_logfiles.tmp",
        BACKUP_LABEL,  # a stale one must not shadow the label the backup writes
        TABLESPACE_MAP,
        "backup_manifest",
        "cloudbk_restore_id",  # the restore that made this directory (cloudbk.wal.spool): not a backup's
    }
)
EXCLUDED_PREFIXES = ("pg_internal.init", "pgsql_tmp")
# Top-level directories copied empty (basebackup.c excludeDirContents, plus pg_wal: WAL comes from the archive).
EMPTY_DIRS = frozenset(
    {"pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_subtrans", "pg_wal"}
)
_TEMP_REL = re.compile(r"^t\d+_\d+(_(fsm|vm|init))?(\.\d+)?$")
_RELFILE = re.compile(r"^(\d+)(_(fsm|vm|init))?(\.\d+)?$")


@dataclass(frozen=True)
class Tablespace:
    oid: int
    name: str
    location: str  # the directory pg_tblspc/<oid> pointed at when the backup was taken


@dataclass(frozen=True)
class Entry:
    """One thing to put in the tar: ``kind`` is 'd' (directory), 'f' (file) or 'l' (a dangling symbolic link,
    recorded but not in the tar). ``target`` is set when the entry was reached through a symbolic link of
    that name (followed: a 'd' or 'f' entry then holds what the link points at)."""

    rel: str  # path relative to the stream's root
    path: str  # absolute path on disk
    kind: str
    size: int = 0
    mode: int = 0o700
    mtime: float = 0.0
    target: str = ""


def _unlogged(names: list[str]) -> set[str]:
    """Relfilenodes in one database directory that have an init fork: their other forks are skipped."""
    return {m.group(1) for n in names if (m := _RELFILE.match(n)) and m.group(3) == "init"}


def _is_db_dir(rel: str) -> bool:
    """``base/<oid>`` in PGDATA or ``PG_<ver>_<cat>/<oid>`` in a tablespace: where relation files live."""
    parts = rel.split("/")
    return len(parts) == 2 and parts[1].isdigit() and (parts[0] == "base" or parts[0].startswith("PG_"))


def _skip_file(name: str, rel_dir: str, unlogged: set[str]) -> bool:
    if name in EXCLUDED_FILES or name.startswith(EXCLUDED_PREFIXES):
        return True
    if _is_db_dir(rel_dir):
        if _TEMP_REL.match(name):
            return True
        m = _RELFILE.match(name)
        if m and m.group(1) in unlogged and m.group(3) != "init":
            return True
    return False


def _link_entry(d: os.DirEntry[str], rel: str) -> Entry | None:
    """A symbolic link, followed: a directory or file entry carrying the link's target, a dangling link
    (kind 'l'), or None for a link to something a backup never holds."""
    target = os.readlink(d.path)
    try:
        st = os.stat(d.path)
    except (FileNotFoundError, NotADirectoryError):
        return Entry(rel, d.path, "l", target=target)
    if stat.S_ISDIR(st.st_mode):
        return Entry(rel, d.path, "d", mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime, target=target)
    if stat.S_ISREG(st.st_mode):
        return Entry(rel, d.path, "f", size=st.st_size, mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime,
                     target=target)  # fmt: skip
    log.warning("skipping %s: a symbolic link to something neither a regular file nor a directory", d.path)
    return None


def _contains_any(directory: str, paths: frozenset[str]) -> bool:
    prefix = directory.rstrip("/") + "/"
    return any(p == directory or p.startswith(prefix) for p in paths)


def _walk(root: str, rel_dir: str, is_base: bool, inside: frozenset[str] = frozenset()) -> Iterator[Entry]:
    directory = os.path.join(root, rel_dir) if rel_dir else root
    inside = inside | {os.path.realpath(directory)}  # the real directories this walk is in: a link into one loops
    try:
        with os.scandir(directory) as it:
            dirents = sorted(it, key=lambda d: d.name)
    except FileNotFoundError:
        return  # dropped while we copied (a database or a temporary directory): WAL replay agrees
    except PermissionError as exc:
        raise OperationFailed(
            f"cannot read directory {directory}: permission denied",
            key=directory,
            hint="run backup-push as the server's OS user; a directory reached through a symbolic link in the "
            "data directory is backed up too, so that user must be able to read it (or remove the link)",
        ) from exc
    names = [d.name for d in dirents]
    unlogged = _unlogged(names) if _is_db_dir(rel_dir) else set()
    for d in dirents:
        rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
        try:
            st = d.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        entry: Entry | None = None
        if stat.S_ISLNK(st.st_mode):
            if is_base and rel_dir == "pg_tblspc":
                continue  # tablespace links are recreated from tablespace_map at restore
            # any other link is followed: its content is backed up as if it were here (docs/backup.md)
            entry = _link_entry(d, rel)
            if entry is None:
                continue
            if entry.kind == "d" and _contains_any(os.path.realpath(d.path), inside):
                raise LinkLoop(d.path, entry.target)
            if entry.kind != "d":
                if entry.kind == "f" and _skip_file(d.name, rel_dir, unlogged):
                    continue
                yield entry
                continue
        if entry is not None or stat.S_ISDIR(st.st_mode):
            if d.name.startswith("pgsql_tmp"):
                continue
            yield entry or Entry(rel, d.path, "d", mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime)
            if is_base and rel in EMPTY_DIRS:
                if rel == "pg_wal":
                    yield Entry("pg_wal/archive_status", os.path.join(d.path, "archive_status"), "d", mode=0o700)
                continue
            yield from _walk(root, rel, is_base, inside)
            continue
        if not stat.S_ISREG(st.st_mode):
            log.warning("skipping %s: not a regular file, directory or symbolic link", d.path)
            continue
        if _skip_file(d.name, rel_dir, unlogged):
            continue
        yield Entry(rel, d.path, "f", size=st.st_size, mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime)


def scan_data_directory(pgdata: str) -> list[Entry]:
    """PGDATA's entries in tar order; ``global/pg_control`` is left out (the backup writes it last)."""
    return [e for e in _walk(pgdata, "", True) if e.rel != PG_CONTROL]


def scan_tablespace(location: str, version_dir_prefix: str) -> list[Entry]:
    """A tablespace directory's entries: only this major version's ``PG_<major>_<catversion>`` directory."""
    entries: list[Entry] = []
    for entry in _walk(location, "", False):
        top = entry.rel.split("/", 1)[0]
        if top.startswith(version_dir_prefix):
            entries.append(entry)
    return entries


ARCHIVE_RECOVERY, STANDBY, NO_RECOVERY = "archive recovery", "standby", "none"


def recovery_mode(pgdata: str | None = None) -> str:
    """The server's mode, from the signal files in its data directory.

    PostgreSQL runs restore_command in the data directory, so the working directory is checked first; ``pgdata``
    (``--pgdata`` / ``PGDATA``) is used when the working directory is not a data directory.
    """
    try:
        base = os.getcwd()
    except OSError:
        base = pgdata or "."
    if pgdata and not os.path.exists(os.path.join(base, "PG_VERSION")):
        base = pgdata
    if os.path.exists(os.path.join(base, "standby.signal")):
        return STANDBY  # standby.signal wins when both exist, as in PostgreSQL
    if os.path.exists(os.path.join(base, "recovery.signal")):
        return ARCHIVE_RECOVERY
    return NO_RECOVERY
