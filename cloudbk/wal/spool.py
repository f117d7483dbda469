"""The prefetch spool: what the prefetcher leaves for ``restore_command``, and the check a call makes before it
serves a file from it. Standard library only: the hit path of ``cloudbk-wal-fetch`` runs this under ``-I -S``.

Under ``pg_wal/cloudbk-fetch/<id>/`` (``pg_wal``'s content is never part of a base backup; same filesystem as
``%p``, so serving is a rename), one state directory per settings identity (:func:`cloudbk.wal.marker.identity`):

- ``worker.lock`` / ``worker.log``: the prefetcher's lock (with its PID) and log (:mod:`cloudbk.background`).
- ``want``: the name PostgreSQL asked for last (written by every call): where the prefetcher works from.
- ``NAME``: a verified entry: downloaded into ``.NAME.tmp-*``, decompressed, its size and SHA-256 checked
  against the object's header, fsynced, and only then renamed to ``NAME``.
- ``NAME.ok``: its voucher, written before the rename: the name, size, SHA-256, the entry file's (device,
  inode, size, mtime), and the **generation** it belongs to.
- ``NAME.busy``: the prefetcher is downloading ``NAME``; a call for it waits for the entry while the
  prefetcher lives.

The generation is what makes an entry this recovery's: the settings identity (repository, server and the
settings that choose them), the system identifier in ``global/pg_control``, the restore that created the data
directory (the id ``cloudbk restore`` writes into :data:`RESTORE_ID_FILE`; ``none`` for a data directory made
otherwise, e.g. by ``pg_basebackup``), and the data directory itself (device and inode). A call serves
``NAME`` only when it is exactly the name asked for, its voucher names the current generation field by field,
and the file moved into ``%p`` is the very file the voucher describes. Anything else is deleted or ignored,
and the call fetches from the archive as if there were no spool.
"""

from __future__ import annotations

import os
import sys
import time

from cloudbk import background
from cloudbk.wal import marker

TYPE_CHECKING = False  # typing itself costs import time on the fast path
if TYPE_CHECKING:
    from collections.abc import Mapping

STATE_DIR = "cloudbk-fetch"
VOUCHER_VERSION = "cloudbk prefetch entry 1"
OK, BUSY, WANT = ".ok", ".busy", "want"
TMP_INFIX = ".tmp-"
RESTORE_ID_FILE = "cloudbk_restore_id"  # in the data directory, written by `cloudbk restore`
SIGNALS = ("standby.signal", "recovery.signal")
DEFAULT_WAIT = 60.0  # seconds: the WAL commands' default retry deadline (cloudbk.config.WAL_RETRY_DEADLINE)
_waited = False  # a call waits for the prefetcher once: the hit path and the full command share this process
_HEX = frozenset("0123456789ABCDEF")


def is_segment_name(name: str) -> bool:
    """A full segment name (24 upper-case hex digits): the only names the spool ever holds."""
    return len(name) == 24 and _HEX.issuperset(name)


def data_directory(dest: str) -> str | None:
    """The data directory whose ``pg_wal`` holds ``dest`` (``%p``), or None when ``dest`` is elsewhere."""
    wal_dir = os.path.dirname(os.path.abspath(dest))
    if os.path.basename(wal_dir) != "pg_wal":
        return None
    datadir = os.path.dirname(wal_dir)
    return datadir if os.path.exists(os.path.join(datadir, "PG_VERSION")) else None


def in_recovery(datadir: str) -> bool:
    return any(os.path.exists(os.path.join(datadir, s)) for s in SIGNALS)


def spool_root(datadir: str) -> str:
    return os.path.join(datadir, "pg_wal", STATE_DIR)


def spool_dir(datadir: str, ident: Mapping[str, str]) -> str:
    return marker.state_dir(os.path.join(datadir, "pg_wal"), ident, STATE_DIR)


def system_identifier(datadir: str) -> str | None:
    """The system identifier: the first field of ``global/pg_control`` (a uint64 in the machine's byte order)."""
    try:
        with open(os.path.join(datadir, "global", "pg_control"), "rb") as f:
            raw = f.read(8)
    except OSError:
        return None
    return str(int.from_bytes(raw, sys.byteorder)) if len(raw) == 8 else None


def restore_id(datadir: str) -> str:
    text = marker.read_text(os.path.join(datadir, RESTORE_ID_FILE))
    value = text.strip() if text else ""
    return value if value and "\n" not in value else "none"


def generation(datadir: str, ident: Mapping[str, str], sysid: str | None = None) -> dict[str, str] | None:
    """The current generation of ``datadir``'s spool (see the module docstring); None without a system id."""
    sysid = sysid or system_identifier(datadir)
    if sysid is None:
        return None
    st = os.stat(datadir)
    fields = {"gen.sysid": sysid, "gen.restore": restore_id(datadir), "gen.datadir": f"{st.st_dev}:{st.st_ino}"}
    fields.update({f"id.{k}": v for k, v in ident.items()})
    return fields


def format_voucher(name: str, size: int, sha256: str, file_id: str, gen: Mapping[str, str]) -> str:
    lines = [VOUCHER_VERSION, f"name={name}", f"size={size}", f"sha256={sha256}", f"file={file_id}"]
    lines += [f"{k}={v}" for k, v in sorted(gen.items())]
    return "\n".join(lines) + "\n"


def voucher_fields(text: str | None) -> dict[str, str] | None:
    return None if text is None else marker.parse_marker(text, VOUCHER_VERSION)


def same_generation(fields: Mapping[str, str], gen: Mapping[str, str]) -> bool:
    theirs = {k: v for k, v in fields.items() if k.startswith(("gen.", "id."))}
    return theirs == dict(gen)


def vouches(fields: Mapping[str, str] | None, name: str, gen: Mapping[str, str], st: os.stat_result) -> bool:
    """Whether a voucher vouches that the file with stat ``st`` is the verified entry ``name`` of ``gen``."""
    if fields is None or fields.get("name") != name or not fields.get("sha256"):
        return False
    if fields.get("file") != marker.file_identity(st) or fields.get("size") != str(st.st_size):
        return False
    return same_generation(fields, gen)


def drop(sdir: str, name: str) -> None:
    """Remove entry ``name`` and its voucher (the voucher last: an entry is never left vouched for)."""
    marker.remove(os.path.join(sdir, name))
    marker.remove(os.path.join(sdir, name + OK))


def take(sdir: str, name: str, dest: str, gen: Mapping[str, str]) -> str | None:
    """Move the entry ``name`` to ``dest`` if its voucher vouches for it: its SHA-256, else None.

    The check is made on the file that arrived at ``dest`` (after the rename), so nothing can swap it in
    between; a file that fails it is removed from ``dest`` again."""
    entry = os.path.join(sdir, name)
    fields = voucher_fields(marker.read_text(entry + OK))
    if fields is None or fields.get("name") != name or not same_generation(fields, gen):
        return None
    try:
        os.rename(entry, dest)
    except FileNotFoundError:
        return None  # vouched for, not renamed into place yet (or just evicted)
    try:
        st = os.stat(dest)
    except OSError:
        return None
    marker.remove(entry + OK)
    if not vouches(fields, name, gen, st):
        marker.remove(dest)
        return None
    return fields["sha256"]


# the flags a prefetcher is given: those that choose the repository (the identity) and how it reads
WORKER_FLAGS = ("config", "repo", "server", "endpoint_url", "retry_deadline", "prefetch")


def start_prefetcher(
    datadir: str, sdir: str, flags: Mapping[str, object], environ: Mapping[str, str], extra: tuple[str, ...] = ()
) -> int | None:
    """Start the prefetcher for ``sdir`` unless one runs (or the postmaster is PID 1): its PID, or None."""
    if background.is_running(sdir) or background.postmaster_is_pid1(datadir):
        return None
    argv = [sys.executable, "-P", "-c", "from cloudbk.wal.prefetch import main; main()", datadir]
    argv += [f"--{k.replace('_', '-')}={flags[k]}" for k in WORKER_FLAGS if flags.get(k) is not None]
    argv += list(extra)
    return background.spawn_detached(argv, sdir, dict(environ))


def note_wanted(sdir: str, name: str) -> None:
    try:
        marker.write_atomically(os.path.join(sdir, WANT), name + "\n")
    except OSError:
        pass  # a read-only or full disk: the call goes on, the prefetcher works from its last position


def clean(datadir: str) -> None:
    """Remove the spools of ``datadir`` whose prefetcher is not running (the server runs outside recovery)."""
    root = spool_root(datadir)
    try:
        names = os.listdir(root)
    except OSError:
        return
    import shutil

    for name in names:
        path = os.path.join(root, name)
        if not background.is_running(path):
            shutil.rmtree(path, ignore_errors=True)
    try:
        os.rmdir(root)
    except OSError:
        pass


def serve(name: str, dest: str, flags: Mapping[str, object], environ: Mapping[str, str]) -> str | None:
    """Serve ``name`` into ``dest`` from the spool: its SHA-256 when served, else None (fetch it as usual).

    Waits for an entry the prefetcher is downloading (``NAME.busy``) while the prefetcher lives, up to the
    retry deadline, once per process (the full command does not wait again after the hit path gave up).
    Removes the spools of a server that runs outside recovery, and entries of another generation."""
    datadir = data_directory(dest)
    if datadir is None or not is_segment_name(name):
        return None
    if not in_recovery(datadir):
        clean(datadir)
        return None
    ident = marker.identity(flags, environ)
    sdir = spool_dir(datadir, ident)
    if not os.path.isdir(sdir):
        return None
    note_wanted(sdir, name)
    gen = generation(datadir, ident)
    if gen is None:
        return None
    deadline_value = flags.get("retry_deadline") or environ.get("CLOUDBK_RETRY_DEADLINE")
    from cloudbk.wal.fastargs import seconds

    global _waited
    wait = 0.0 if _waited else seconds(str(deadline_value) if deadline_value else None, DEFAULT_WAIT)
    _waited = True
    give_up = time.monotonic() + wait
    pause = 0.002
    while True:
        sha256 = take(sdir, name, dest, gen)
        if sha256 is not None:
            return sha256
        fields = voucher_fields(marker.read_text(os.path.join(sdir, name + OK)))
        if fields is not None and not same_generation(fields, gen):
            drop(sdir, name)  # another generation's entry: deleted, never served
            return None
        if not os.path.exists(os.path.join(sdir, name + BUSY)) or not background.is_running(sdir):
            return None
        if time.monotonic() >= give_up:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
