"""The symbolic-link policy shared by backup and restore (docs/backup.md, "Symbolic links").

Backup (:mod:`cloudbk.pg.datadir`, :mod:`cloudbk.backup.take`): links under ``pg_tblspc/`` are tablespaces and are
recreated from ``tablespace_map``; every other link is followed, its content stored under the link's own
name (a directory's content with the usual exclusions: ``pg_wal`` stays empty), and the link is recorded in
the manifest (``tars[].links``). The tar itself holds no link.

Restore: a recorded link comes back as a plain directory or file inside DEST, unless ``--link-all`` or
``--link-map NAME=PATH`` asks for the link; then the content is written at the link's target and the link
is created in DEST, pointing there. Tars of backups taken before links were recorded may hold symbolic
link members: each is created only after every other member has been written (so nothing is ever written
through one), and only if it resolves, through the other links, to a place inside DEST. A link outside DEST
is created only when asked for.

This module holds the pure part: resolving links against the tree they will form, and the plan of which
links a restore creates.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Mapping

from cloudbk.errors import LinkEscapes, UsageError
from cloudbk.repo.manifest import LinkEntry, TarEntry

log = logging.getLogger("cloudbk.backup.restore")

MAX_HOPS = 40  # as the kernel's ELOOP limit: a chain longer than this is a loop

# What restore writes into itself, after extracting: a tar may hold these only as regular files ("file"), or
# directories ("dir"), or not at all.
RESERVED: dict[str, str] = {
    "global/pg_control": "file",
    "postgresql.auto.conf": "file",
    "recovery.signal": "file",
    "standby.signal": "file",
    "backup_label": "file",
    "tablespace_map": "file",
    "global": "dir",
    "pg_tblspc": "dir",
}


def resolve(rel: str, links: Mapping[str, str], outward: frozenset[str] = frozenset()) -> str:
    """The path ``rel`` (relative to the root) leads to once ``links`` (relative path -> target) exist and
    every other component is a real directory. ``outward`` links lead outside the root by request: passing
    through one counts as leaving. Raises ``LinkEscapes`` when the path leaves the root."""
    todo = [p for p in rel.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if not done:
                raise LinkEscapes("goes above the destination")
            done.pop()
            continue
        done.append(part)
        here = "/".join(done)
        if here in outward:
            raise LinkEscapes(f"passes through {here!r}, which leads outside the destination")
        if here not in links:
            continue
        hops += 1
        if hops > MAX_HOPS:
            raise LinkEscapes(f"is a loop of symbolic links (more than {MAX_HOPS} in a row)")
        target = links[here]
        if target.startswith("/"):
            raise LinkEscapes(f"passes through {here!r} -> {target!r}, an absolute path")
        done.pop()
        todo = [p for p in target.split("/") if p] + todo
    return "/".join(done)


def check_links(links: Mapping[str, str], outward: frozenset[str] = frozenset()) -> dict[str, str]:
    """Each link in ``links`` but not in ``outward`` -> where it resolves; ``LinkEscapes`` (naming the
    link) for the first that leaves the root."""
    resolved: dict[str, str] = {}
    for rel, target in links.items():
        if rel in outward:
            continue
        try:
            resolved[rel] = resolve(posixpath.join(posixpath.dirname(rel), target), links, outward)
        except LinkEscapes as exc:
            raise LinkEscapes(f"symbolic link {rel!r} -> {target!r} {exc.reason}") from None
    return resolved


def _mappable(rel: str) -> bool:
    """Whether ``rel`` may be restored as a link: not one of restore's own paths, nor above one, nor a
    tablespace link (those come from tablespace_map)."""
    if rel in ("", ".", "..") or rel.startswith(("pg_tblspc/", "../")):
        return False
    return not any(r == rel or r.startswith(rel + "/") for r in RESERVED)


def requested_links(tar: TarEntry, dest: str, link_all: bool, link_map: Mapping[str, str]) -> dict[str, str]:
    """The links restore creates in the PGDATA tar ``tar``: relative path -> the absolute path the link
    points at (where the content goes). ``--link-map`` names must be links the backup recorded (or, for a
    backup from before links were recorded, anything the tar may hold)."""
    recorded: dict[str, LinkEntry] = {link.path: link for link in tar.links or []}
    wanted: dict[str, str] = {}
    if link_all:  # restore's own files and directories stay in DEST, plain: --link-all means "where it can"
        for link in recorded.values():
            if not _mappable(link.path):
                log.info("--link-all: %s is restored as a plain %s in DEST, never as a link", link.path, link.type)
                continue
            wanted[link.path] = os.path.normpath(os.path.join(dest, os.path.dirname(link.path), link.target))
    for name, path in link_map.items():
        rel = posixpath.normpath(name.strip("/"))
        if tar.links is not None and rel not in recorded:
            known = ", ".join(sorted(recorded)) or "none"
            raise UsageError(
                f"--link-map {name}={path}: the backup recorded no link {rel!r}", hint=f"its links: {known}"
            )
        if not os.path.isabs(path):
            raise UsageError(f"--link-map {name}={path}: the link's target must be an absolute path")
        wanted[rel] = os.path.normpath(path)
    for rel, path in sorted(wanted.items()):
        if rel.startswith("pg_tblspc/"):
            raise UsageError(f"--link-map {rel}: a tablespace cannot be mapped here", hint="use --tablespace-mapping")
        if not _mappable(rel):
            raise UsageError(
                f"--link-map {rel}: restore writes {rel} (or files in it) itself, so it cannot be a link",
                hint="leave it out: it is restored as a plain directory or file inside DEST",
            )
        real_dest = os.path.realpath(dest)
        real = os.path.realpath(path)
        if real == real_dest or real.startswith(real_dest + os.sep):
            raise UsageError(f"link {rel} -> {path} points inside the destination {dest}", hint="map it elsewhere")
        if os.path.lexists(real) and not (os.path.isdir(real) and not os.listdir(real)):
            raise UsageError(
                f"link {rel} -> {path}: {path} exists and is not an empty directory; restore never overwrites files",
                key=path,
                hint=f"empty or remove {path}, or choose another target with --link-map {rel}=PATH",
            )
    return wanted
