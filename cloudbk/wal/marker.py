"""Push-ahead markers: what the worker may vouch for, and the check a later ``archive_command`` call makes.

Under ``pg_wal/cloudbk-push/<id>/`` (``pg_wal``'s content is never part of a base backup), one state directory
per *settings identity*: the flags and environment variables that decide which repository and server a call
archives into (:func:`identity`). ``<id>`` is a CRC of that identity, only to tell directories apart; every
marker also carries the whole identity and is compared field by field. Files there:

- ``worker.lock`` / ``worker.log``: the push-ahead worker's lock (with its PID) and log (cloudbk.background).
- ``NAME.busy``: the worker has taken ``NAME`` (uploading it, or waiting for the index update that lists it).
- ``NAME.ok``: the marker. Written only after ``NAME`` is durably stored *and* a compare-and-swap of the index
  listing it succeeded. It names the repository, server, system identifier, the file's (device, inode, size,
  mtime) and the SHA-256 uploaded. A call for ``NAME`` with the same identity, whose file still has that
  (device, inode, size, mtime), may return 0 without touching storage; it removes the marker.
- ``NAME.failed``: the worker could not archive ``NAME``; the message is inside. The call pushes ``NAME``
  itself, synchronously, and that push reports the error to PostgreSQL.

Standard library only (the fast path imports this module). Nothing here writes a secret: the one credential
that can sit in the identity's variables (an Azure connection string's key or SAS) is left out, and a value
that could hold a password (``user:pass@``) is kept as a digest.
"""

from __future__ import annotations

import os
import zlib

TYPE_CHECKING = False  # typing itself costs import time on the fast path
if TYPE_CHECKING:
    from collections.abc import Mapping

STATE_DIR = "cloudbk-push"
MARKER_VERSION = "cloudbk push-ahead marker 1"
OK, BUSY, FAILED = ".ok", ".busy", ".failed"

# settings that decide where a call archives: flags (by their Settings name) and environment variables
IDENTITY_FLAGS = ("repo", "server", "endpoint_url", "config")
IDENTITY_ENV = (
    "CLOUDBK_REPO",
    "CLOUDBK_SERVER",
    "CLOUDBK_ENDPOINT_URL",
    "CLOUDBK_CONFIG",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "STORAGE_EMULATOR_HOST",
)
# environment variables a flag makes irrelevant (cloudbk.config: flags win over the environment)
_OVERRIDDEN = {
    "repo": ("CLOUDBK_REPO",),
    "server": ("CLOUDBK_SERVER",),
    "endpoint_url": ("CLOUDBK_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
}
# the parts of an Azure connection string that name the account and endpoint (never its key or SAS)
_AZURE_FIELDS = ("accountname", "blobendpoint", "endpointsuffix", "defaultendpointsprotocol")


def _safe(value: str) -> str:
    if "@" in value or "\n" in value or "\r" in value:
        import hashlib

        return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return value


def file_identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def identity(flags: Mapping[str, object], environ: Mapping[str, str]) -> dict[str, str]:
    """The settings identity of a call: flag and environment values that choose the repository and server.

    The config file is identified by its path and (device, inode, size, mtime), not parsed: parsing TOML costs
    more than the whole fast path. Any change to the file makes a new identity (a new state directory).
    An environment variable that a given flag overrides is left out: ``--repo X`` archives into X whatever
    ``CLOUDBK_REPO`` says, so ``restore`` (which writes the flags into restore_command) and the server agree."""
    items: dict[str, str] = {}
    ignored: set[str] = set()
    for key in IDENTITY_FLAGS:
        value = flags.get(key)
        if value is not None and value != "":
            items[f"flag.{key}"] = _safe(str(value))
            ignored.update(_OVERRIDDEN.get(key, ()))
    for name in IDENTITY_ENV:
        value = None if name in ignored else environ.get(name)
        if value:
            items[f"env.{name}"] = _safe(value)
    connection_string = environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection_string:
        for part in connection_string.split(";"):
            key, _, value = part.partition("=")
            if key.strip().lower() in _AZURE_FIELDS:
                items[f"azure.{key.strip().lower()}"] = _safe(value.strip())
    config = flags.get("config") or environ.get("CLOUDBK_CONFIG")
    if config:
        path = os.path.abspath(str(config))
        try:
            items["config.file"] = _safe(f"{path}:{file_identity(os.stat(path))}")
        except OSError:
            items["config.file"] = _safe(f"{path}:missing")
    return items


def state_dir(wal_dir: str, ident: Mapping[str, str], kind: str = STATE_DIR) -> str:
    """``pg_wal/<kind>/<id>``: one directory per settings identity (``cloudbk-push``; ``cloudbk-fetch`` for the
    prefetch spool)."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(ident.items()))
    return os.path.join(wal_dir, kind, f"{zlib.crc32(text.encode('utf-8', 'surrogateescape')):08x}")


def format_marker(
    name: str, ident: Mapping[str, str], repo: str, server: str, sysid: str, file_id: str, sha256: str
) -> str:
    lines = [MARKER_VERSION, f"name={name}", f"repo={_safe(repo)}", f"server={server}", f"sysid={sysid}"]
    lines += [f"file={file_id}", f"sha256={sha256}"]
    lines += [f"id.{k}={v}" for k, v in sorted(ident.items())]
    return "\n".join(lines) + "\n"


def parse_marker(text: str, version: str = MARKER_VERSION) -> dict[str, str] | None:
    """The fields of a note whose first line is ``version`` (a push marker, or a prefetch spool voucher)."""
    lines = text.split("\n")
    if not lines or lines[0] != version or not text.endswith("\n"):
        return None  # another version, or torn by a crash before it reached the disk: not a voucher
    fields: dict[str, str] = {}
    for line in lines[1:-1]:
        key, sep, value = line.partition("=")
        if not sep:
            return None
        fields[key] = value
    return fields


def vouches(fields: Mapping[str, str], name: str, ident: Mapping[str, str], st: os.stat_result) -> bool:
    """Whether a parsed marker vouches that ``name`` (whose file has stat ``st``) is archived for ``ident``."""
    if fields.get("name") != name or fields.get("file") != file_identity(st):
        return False
    if not fields.get("sha256") or not fields.get("repo") or not fields.get("server"):
        return False
    theirs = {k[3:]: v for k, v in fields.items() if k.startswith("id.")}
    return theirs == dict(ident)


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, so a reader sees all of it or nothing."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read(65536)
    except OSError:
        return None


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
