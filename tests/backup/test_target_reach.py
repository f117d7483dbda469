"""A --target-time later than anything the archive can reach is refused up front (``--force`` goes on): the
index records, per timeline, when its newest segment was pushed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from synthetic import plant_backup, segment_file

from cloudbk.cli.main import main
from cloudbk.errors import ExitCode, OperationFailed
from cloudbk.repo import pitr
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.repo.pitr import RecoveryPlan, Target, choose_backup, format_target_time, plan_recovery
from cloudbk.storage.memory import MemoryStorage
from cloudbk.wal.push import push_wal

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def test_wal_push_records_when_each_timeline_was_last_pushed(tmp_path: Path) -> None:
    storage = MemoryStorage()
    before = datetime.now(UTC)
    push_wal(storage, "main", str(segment_file(tmp_path, 1, 3)), "none")
    first = load_index(storage, "main").last_push[1]
    push_wal(storage, "main", str(segment_file(tmp_path, 1, 3)), "none")  # a re-push: nothing new
    assert load_index(storage, "main").last_push[1] == first
    push_wal(storage, "main", str(segment_file(tmp_path, 1, 4)), "none")
    push_wal(storage, "main", str(segment_file(tmp_path, 2, 5)), "none")
    index = load_index(storage, "main")
    assert set(index.last_push) == {1, 2}
    assert before <= datetime.fromisoformat(first) <= datetime.fromisoformat(index.last_push[1])
    assert datetime.fromisoformat(index.last_push[2]) <= datetime.now(UTC)
    assert '"last_push"' in storage.get_bytes("main/index.json").decode()  # stored with each timeline's ranges


def _index(last_push: dict[int, datetime]) -> tuple[MemoryStorage, Index]:
    storage = MemoryStorage()
    plant_backup(storage, ended=T0)

    def mutate(index: Index) -> bool:
        for timeline, moment in last_push.items():
            index.record_push(timeline, moment)
        return True

    return storage, update_index(storage, "main", mutate)


def _plan(index: Index, minutes: float) -> RecoveryPlan:
    target = Target.parse(time=(T0 + timedelta(minutes=minutes)).isoformat())
    return plan_recovery(index, choose_backup(index, target), target)


def test_plan_knows_how_far_the_archive_reaches() -> None:
    _, index = _index({1: T0 + timedelta(minutes=30)})
    reachable = _plan(index, 30)
    pitr.check_reach(reachable)
    with pytest.raises(OperationFailed) as info:
        pitr.check_reach(_plan(index, 31))
    message = str(info.value)
    assert format_target_time(T0 + timedelta(minutes=30)) in message and "--force" in message
    _, old = _index({})  # an index written before the bound was recorded: nothing is refused
    pitr.check_reach(_plan(old, 600))


def test_restore_refuses_a_target_time_beyond_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CLOUDBK_CONFIG", raising=False)
    url = f"memory://reach-{tmp_path.name}"
    storage = MemoryStorage.named(url)
    plant_backup(storage, ended=T0)
    reach = T0 + timedelta(minutes=30)
    doc = json.loads(storage.get_bytes("main/index.json"))
    doc["wal"]["00000001"]["last_push"] = reach.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # as wal-push records it
    storage.put_bytes("main/index.json", json.dumps(doc).encode())
    late = (T0 + timedelta(hours=2)).isoformat()

    dest = tmp_path / "refused"
    assert main(["restore", str(dest), "--repo", url, "--target-time", late]) == ExitCode.FAILED
    err = capsys.readouterr().err
    assert "later than anything the archive can reach" in err and format_target_time(reach) in err
    assert "--force" in err and not dest.exists()

    assert main(["restore", str(tmp_path / "within"), "--repo", url, "--target-time", reach.isoformat()]) == 0
    assert f"reachable   up to {format_target_time(reach)}" in capsys.readouterr().out
    assert main(["restore", str(tmp_path / "forced"), "--repo", url, "--target-time", late, "--force"]) == 0
    assert "restoring anyway (--force)" in capsys.readouterr().err
    conf = (tmp_path / "forced" / "postgresql.auto.conf").read_text()
    assert f"recovery_target_time = '{format_target_time(T0 + timedelta(hours=2))}'" in conf
