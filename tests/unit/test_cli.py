"""The command-line contract: options before or after the command, usage errors exit 3, help works."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudbk.cli.main import COMMANDS, command_word, main


def test_options_before_and_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"file://{tmp_path / 'repo'}"
    assert main(["--repo", repo, "--server", "alpha", "backup-list", "--json"]) == 0
    before = capsys.readouterr().out
    assert main(["backup-list", "--repo", repo, "--server", "alpha", "--json"]) == 0
    assert capsys.readouterr().out == before
    # a flag given after the command wins over the same flag given before it
    assert main(["--server", "bad/name", "backup-list", "--repo", repo, "--server", "alpha"]) == 0


def test_an_option_value_that_names_a_command_is_not_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = f"file://{tmp_path / 'repo'}"
    assert main(["--server", "restore", "--repo", repo, "backup-list"]) == 0
    assert "no backups for server 'restore'" in capsys.readouterr().out
    assert main(["--repo", repo, "--server=check", "backup-list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["--server", "restore", "backup-list"], "backup-list"),
        (["--serv", "keep", "-v", "delete", "x"], "delete"),
        (["--server=keep", "check"], "check"),
        (["-v", "--", "reindex"], "reindex"),
        (["--repo", "file:///x"], None),
        (["--repo", "file:///x", "nonsense", "check"], None),
    ],
)
def test_command_word(argv: list[str], command: str | None) -> None:
    assert command_word(argv) == command


@pytest.mark.parametrize(
    "argv",
    [
        ["no-such-command"],
        ["backup-list", "--no-such-flag"],
        ["backup-list", "--repo", "ftp://bucket/x"],
        ["backup-list", "--repo", "file:///tmp/x", "--compression", "brotli"],
        ["backup-list", "--repo", "file:///tmp/x", "--server", "../etc"],
        ["backup-list"],  # no repository configured anywhere
    ],
)
def test_usage_errors_exit_3(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CLOUDBK_REPO", raising=False)
    monkeypatch.delenv("CLOUDBK_CONFIG", raising=False)
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "ERROR" in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in text
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "--repo" in capsys.readouterr().out
