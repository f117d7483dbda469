"""The only place that builds object keys. See docs/format.md for the layout these functions implement.

<server>/index.json                          the index (a cache; `cloudbk reindex` rebuilds it)
<server>/wal/<TTTTTTTT>/<walname>            WAL segments, .partial and .backup files of timeline T
<server>/wal/history/<TTTTTTTT>.history      timeline history files
<server>/backups/<backup-id>/<name>          a base backup's data objects (one tar per tablespace)
<server>/backups/<backup-id>/manifest.json   its manifest, written last: without it the backup does not exist
<server>/backups/<backup-id>/keep.json       present while the backup is kept (`cloudbk keep`); retention skips it
<server>/backups/<backup-id>/heartbeat.json  present while its backup-push runs, rewritten every minute
<server>/check/<token>                       a probe `cloudbk check` writes and deletes at once
<server>/proofs/<kind>/<backup-id>/<time>-<outcome>.json   a verify or drill result (docs/format.md, "Proofs")
"""

from __future__ import annotations

import re

from cloudbk.errors import UsageError
from cloudbk.pg.walnames import HISTORY, WalName, parse_wal_name

_SERVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BACKUP_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z?[A-Za-z0-9._-]*$")

INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.json"
KEEP_NAME = "keep.json"
HEARTBEAT_NAME = "heartbeat.json"
PROOF_KINDS = ("verify", "drill")
PROOF_OUTCOMES = ("ok", "failed")
_PROOF_TIME = re.compile(r"^[0-9]{8}T[0-9]{6}(?:\.[0-9]{6})?Z$")


def check_server(server: str) -> str:
    if not _SERVER.match(server):
        raise UsageError(
            f"invalid server name {server!r}",
            hint="use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit",
        )
    return server


def check_backup_id(backup_id: str) -> str:
    if not _BACKUP_ID.match(backup_id):
        raise UsageError(f"invalid backup id {backup_id!r}", hint="see `cloudbk backup-list` for the ids")
    return backup_id


def server_prefix(server: str) -> str:
    return f"{check_server(server)}/"


def index_key(server: str) -> str:
    return f"{check_server(server)}/{INDEX_NAME}"


def wal_prefix(server: str) -> str:
    return f"{check_server(server)}/wal/"


def timeline_prefix(server: str, timeline: int) -> str:
    return f"{wal_prefix(server)}{timeline:08X}/"


def history_prefix(server: str) -> str:
    return f"{wal_prefix(server)}history/"


def wal_key(server: str, name: str | WalName) -> str:
    wal = parse_wal_name(name) if isinstance(name, str) else name
    if wal.kind == HISTORY:
        return f"{history_prefix(server)}{wal.name}"
    return f"{timeline_prefix(server, wal.timeline)}{wal.name}"


def wal_name_from_key(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def backups_prefix(server: str) -> str:
    return f"{check_server(server)}/backups/"


def backup_prefix(server: str, backup_id: str) -> str:
    return f"{backups_prefix(server)}{check_backup_id(backup_id)}/"


def backup_manifest_key(server: str, backup_id: str) -> str:
    return f"{backup_prefix(server, backup_id)}{MANIFEST_NAME}"


def backup_object_key(server: str, backup_id: str, name: str) -> str:
    if "/" in name or name in ("", MANIFEST_NAME, KEEP_NAME, HEARTBEAT_NAME):
        raise UsageError(f"invalid backup object name {name!r}")
    return f"{backup_prefix(server, backup_id)}{name}"


def backup_keep_key(server: str, backup_id: str) -> str:
    """The keep mark of a backup (``cloudbk keep``): its presence is what protects the backup from retention."""
    return f"{backup_prefix(server, backup_id)}{KEEP_NAME}"


def backup_heartbeat_key(server: str, backup_id: str) -> str:
    """The heartbeat of a running backup-push: it claims the incomplete uploads under its backup's prefix."""
    return f"{backup_prefix(server, backup_id)}{HEARTBEAT_NAME}"


def backup_id_from_key(server: str, key: str) -> str | None:
    """The backup id of a key under :func:`backups_prefix`, or None for a key outside it or a malformed id."""
    prefix = backups_prefix(server)
    if not key.startswith(prefix):
        return None
    backup_id = key[len(prefix) :].split("/", 1)[0]
    return backup_id if _BACKUP_ID.match(backup_id) else None


def check_probe_key(server: str, token: str) -> str:
    """A short-lived object `cloudbk check` writes and deletes to prove the repository is writable."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", token):
        raise UsageError(f"invalid probe token {token!r}")
    return f"{check_server(server)}/check/{token}"


def proofs_prefix(server: str) -> str:
    return f"{check_server(server)}/proofs/"


def proof_key(server: str, kind: str, backup_id: str, stamp: str, outcome: str) -> str:
    """The result object of one ``verify`` or ``drill`` of a backup: what it proved is in the key itself, so
    one LIST of :func:`proofs_prefix` answers "when was each backup last verified, last drilled?"."""
    if kind not in PROOF_KINDS or outcome not in PROOF_OUTCOMES or not _PROOF_TIME.match(stamp):
        raise UsageError(f"invalid proof {kind!r} {stamp!r} {outcome!r}")
    return f"{proofs_prefix(server)}{kind}/{check_backup_id(backup_id)}/{stamp}-{outcome}.json"


def parse_proof_key(server: str, key: str) -> tuple[str, str, str, str] | None:
    """(kind, backup id, time stamp, outcome) of a key :func:`proof_key` built, or None for any other key."""
    prefix = proofs_prefix(server)
    parts = key[len(prefix) :].split("/") if key.startswith(prefix) else []
    if len(parts) != 3 or parts[0] not in PROOF_KINDS or not _BACKUP_ID.match(parts[1]):
        return None
    stamp, _, rest = parts[2].partition("-")
    outcome = rest.removesuffix(".json")
    if not _PROOF_TIME.match(stamp) or outcome not in PROOF_OUTCOMES or not rest.endswith(".json"):
        return None
    return parts[0], parts[1], stamp, outcome
