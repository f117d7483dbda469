"""Backups in progress: the heartbeat a running ``backup-push`` keeps, and the uploads a killed one leaves.

A backup's tar streams are multipart uploads (S3) that stay invisible until they complete. A backup-push
killed midway (SIGKILL, the OOM killer, a lost machine) cannot abort them, so their parts stay stored, and
billed. A running backup therefore keeps a heartbeat, ``<server>/backups/<id>/heartbeat.json``: written
before its first upload starts, rewritten every ``HEARTBEAT_INTERVAL`` seconds, deleted when the backup ends.
``cloudbk retention`` aborts an incomplete upload under ``<server>/`` when both hold:

- no live heartbeat claims it. A heartbeat claims the uploads under its backup's prefix; it is live while it
  was rewritten less than ``HEARTBEAT_TIMEOUT`` ago, by its modification time (the storage's clock);
- it was started longer than the stale-upload age ago (a setting, default one day): a younger upload may
  belong to a ``wal-push`` or a ``backup-push`` that is just starting.

Backends without incomplete uploads (``capabilities.incomplete_uploads`` false, see
:class:`cloudbk.storage.base.Capabilities`) are not asked: the local filesystem and memory have no such thing;
Azure and GCS discard theirs by themselves (docs/lifecycle.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from cloudbk.errors import AlreadyExists, CloudbkError, ConflictError
from cloudbk.repo import layout
from cloudbk.storage.base import CREATE_ONLY, OVERWRITE, Storage, UploadInfo, WriteMode

log = logging.getLogger("cloudbk.repo.inflight")

HEARTBEAT_INTERVAL = 60.0  # seconds between rewrites of a running backup's heartbeat
# A heartbeat not rewritten for this long belongs to a backup-push that died. Many intervals, so a slow or
# briefly failing storage, or clocks a few minutes apart, never make a running backup look dead.
HEARTBEAT_TIMEOUT = timedelta(minutes=15)
DEFAULT_STALE_UPLOAD_AGE = timedelta(days=1)


class Heartbeat:
    """The heartbeat of one running backup, rewritten from a daemon thread between ``start`` and ``stop``."""

    def __init__(self, storage: Storage, server: str, backup_id: str, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.storage = storage
        self.key = layout.backup_heartbeat_key(server, backup_id)
        self.backup_id = backup_id
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudbk-heartbeat", daemon=True)

    def start(self) -> None:
        """Write the first heartbeat (create-only: it also reserves the backup id) and keep it fresh."""
        try:
            self._write(CREATE_ONLY)
        except AlreadyExists as exc:
            raise ConflictError(
                f"another backup-push is running with backup id {self.backup_id} (its heartbeat {self.key} exists)",
                key=self.key,
                hint="run backup-push again: it picks the next free id",
            ) from exc
        self._thread.start()

    def stop(self) -> None:
        """Stop rewriting and delete the heartbeat. Best effort, never raises: a heartbeat left behind stops
        claiming anything once it is older than ``HEARTBEAT_TIMEOUT``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        try:
            self.storage.delete(self.key)
        except CloudbkError as exc:
            log.warning("could not delete the heartbeat %s: %s", self.key, exc)

    def _write(self, mode: WriteMode) -> None:
        doc = {"backup_id": self.backup_id, "hostname": socket.gethostname(), "pid": os.getpid()}
        self.storage.put_bytes(self.key, json.dumps(doc).encode(), mode)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write(OVERWRITE)
            except CloudbkError as exc:  # the next round tries again; the timeout allows for many misses
                log.warning("could not refresh the heartbeat %s: %s", self.key, exc)


def live_heartbeats(storage: Storage, server: str, now: datetime, timeout: timedelta = HEARTBEAT_TIMEOUT) -> set[str]:
    """The ids of the backups whose heartbeat was rewritten within ``timeout`` (one LIST of the backups)."""
    live: set[str] = set()
    for info in storage.list(layout.backups_prefix(server)):
        backup_id = layout.backup_id_from_key(server, info.key)
        if backup_id is None or info.key != layout.backup_heartbeat_key(server, backup_id):
            continue
        if info.modified is None or now.timestamp() - info.modified < timeout.total_seconds():
            live.add(backup_id)  # a store that reports no time: count it live, never abort on a guess
    return live


def stale_uploads(
    server: str, uploads: Iterable[UploadInfo], live: set[str], now: datetime, max_age: timedelta
) -> list[UploadInfo]:
    """The uploads no live heartbeat claims and that were started more than ``max_age`` before ``now``."""
    stale = []
    for upload in uploads:
        backup_id = layout.backup_id_from_key(server, upload.key)
        if backup_id is not None and backup_id in live:
            continue
        if upload.initiated is None or now.timestamp() - upload.initiated <= max_age.total_seconds():
            continue
        stale.append(upload)
    return stale


def find_stale_uploads(
    storage: Storage, server: str, now: datetime, max_age: timedelta, timeout: timedelta = HEARTBEAT_TIMEOUT
) -> list[UploadInfo]:
    """List the incomplete uploads under ``<server>/`` and pick the stale ones (see the module docstring)."""
    if not storage.capabilities.incomplete_uploads:
        return []
    uploads = list(storage.list_uploads(layout.server_prefix(server)))
    if not uploads:
        return []
    return stale_uploads(server, uploads, live_heartbeats(storage, server, now, timeout), now, max_age)


def abort_uploads(storage: Storage, uploads: Iterable[UploadInfo]) -> None:
    for upload in uploads:
        storage.abort_upload(upload)
        log.info("aborted the incomplete upload of %s (started by a backup-push or wal-push that died)", upload.key)


def describe_uploads(uploads: Iterable[UploadInfo]) -> list[Mapping[str, object]]:
    return [{"key": u.key, "upload_id": u.upload_id, "initiated": u.initiated} for u in uploads]
