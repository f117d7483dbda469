"""Will the restore fit? The free space at DEST and at each tablespace target against what the restore needs.

A restore writes each stream's files (the manifest's data size) and then, while recovery replays WAL, holds
segments in ``pg_wal`` and grows relation files by what the WAL adds. The headroom asked for at DEST is the WAL
the plan replays, capped at :data:`WAL_HEADROOM_CAP` (PostgreSQL's default ``max_wal_size``: restartpoints
recycle the segments replayed before it), plus :data:`SPARE_SEGMENTS` segments. Destinations on one file
system are summed against it. The numbers are estimates; ``restore --force`` writes anyway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudbk.errors import OperationFailed
from cloudbk.repo.manifest import Manifest
from cloudbk.repo.pitr import RecoveryPlan

WAL_HEADROOM_CAP = 1024**3
SPARE_SEGMENTS = 3


@dataclass
class SpaceNeed:
    """What one file system must hold."""

    path: str  # the first destination on it
    needed: int
    free: int
    paths: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.needed <= self.free

    def to_dict(self) -> dict[str, Any]:
        return {"paths": self.paths, "needed": self.needed, "free": self.free, "ok": self.ok}


def _existing(path: str) -> str:
    """``path`` or its nearest existing parent (a destination may not exist yet)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def wal_headroom(plan: RecoveryPlan) -> int:
    return min(plan.wal_bytes, WAL_HEADROOM_CAP) + SPARE_SEGMENTS * plan.segment_size


def space_needed(manifest: Manifest, plan: RecoveryPlan, dest: str, targets: Mapping[int, str]) -> list[SpaceNeed]:
    """One :class:`SpaceNeed` per file system the restore writes to."""
    wants: list[tuple[str, int]] = []
    for tar in manifest.tars:
        if tar.tablespace_oid is None:
            wants.append((dest, tar.data_size + wal_headroom(plan)))
        else:
            wants.append((targets[tar.tablespace_oid], tar.data_size))
    needs: dict[int, SpaceNeed] = {}
    for path, size in wants:
        where = _existing(path)
        st = os.statvfs(where)
        device = os.stat(where).st_dev
        need = needs.setdefault(device, SpaceNeed(path, 0, st.f_bavail * st.f_frsize))
        need.needed += size
        need.paths.append(path)
    return list(needs.values())


def check_space(needs: list[SpaceNeed]) -> None:
    """``OperationFailed`` naming the first file system the restore would fill."""
    for need in needs:
        if not need.ok:
            raise OperationFailed(
                f"not enough free space for the restore at {', '.join(need.paths)}: it needs about "
                f"{_mib(need.needed)} (the backup's files plus headroom for the WAL replay), {_mib(need.free)} is free",
                key=need.path,
                hint="free some space or choose another destination (--tablespace-mapping for tablespaces); "
                "--force restores anyway",
            )


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"
