"""Proofs: the result objects ``verify`` and ``drill`` leave in the repository (docs/format.md, "Proofs").

Each run writes one small JSON object per backup it examined, create-only, under
``<server>/proofs/<kind>/<backup-id>/<time>-<outcome>.json``. The key holds the kind, the backup, the time and
the outcome, so ``backup-list``, ``backup-show`` and ``check`` learn when each backup was last verified and last
drilled from one LIST, without reading any of them; the body holds the details (RTO, problems, phases).
Proofs are history: nothing rewrites them, and a backup's proofs outlive it (they say what was once proven).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloudbk.repo import layout
from cloudbk.storage.base import CREATE_ONLY, Storage

VERIFY, DRILL = layout.PROOF_KINDS
PROOF_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Proof:
    kind: str  # VERIFY | DRILL
    backup_id: str
    time: datetime
    ok: bool
    key: str


@dataclass
class ProofState:
    """What the proofs of one backup and kind say: the newest run, and the newest one that passed."""

    last: Proof | None = None
    last_ok: Proof | None = None

    def add(self, proof: Proof) -> None:
        if self.last is None or proof.time > self.last.time:
            self.last = proof
        if proof.ok and (self.last_ok is None or proof.time > self.last_ok.time):
            self.last_ok = proof


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _parse_stamp(stamp: str) -> datetime:
    form = "%Y%m%dT%H%M%S.%fZ" if "." in stamp else "%Y%m%dT%H%M%SZ"
    return datetime.strptime(stamp, form).replace(tzinfo=UTC)


def record_proof(
    storage: Storage, server: str, kind: str, backup_id: str, ok: bool, details: Mapping[str, Any],
    now: datetime | None = None,
) -> str:  # fmt: skip
    """Store the proof of one run over ``backup_id``; returns its key."""
    moment = now or datetime.now(UTC)
    key = layout.proof_key(server, kind, backup_id, _stamp(moment), "ok" if ok else "failed")
    doc = {
        "format_version": PROOF_FORMAT_VERSION,
        "kind": kind,
        "backup": backup_id,
        "time": moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "ok": ok,
        **details,
    }
    storage.put_bytes(key, json.dumps(doc, indent=1, default=str).encode(), CREATE_ONLY)
    return key


def load_proofs(storage: Storage, server: str) -> dict[tuple[str, str], ProofState]:
    """(kind, backup id) -> its :class:`ProofState`, from one LIST of the proofs prefix."""
    states: dict[tuple[str, str], ProofState] = {}
    for info in storage.list(layout.proofs_prefix(server)):
        parsed = layout.parse_proof_key(server, info.key)
        if parsed is None:
            continue
        kind, backup_id, stamp, outcome = parsed
        proof = Proof(kind, backup_id, _parse_stamp(stamp), outcome == "ok", info.key)
        states.setdefault((kind, backup_id), ProofState()).add(proof)
    return states


def newest_ok(states: Mapping[tuple[str, str], ProofState], kind: str) -> Proof | None:
    """The newest passing proof of ``kind`` over any backup."""
    passed = [s.last_ok for (k, _), s in states.items() if k == kind and s.last_ok is not None]
    return max(passed, key=lambda p: p.time, default=None)


def describe(states: Mapping[tuple[str, str], ProofState], backup_id: str) -> dict[str, Any]:
    """For backup-list/backup-show: ``{"verify": {...}|None, "drill": {...}|None}``."""
    doc: dict[str, Any] = {}
    for kind in layout.PROOF_KINDS:
        state = states.get((kind, backup_id))
        if state is None or state.last is None:
            doc[kind] = None
            continue
        doc[kind] = {
            "last": state.last.time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "last_ok": bool(state.last.ok),
            "last_success": None if state.last_ok is None else state.last_ok.time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    return doc
