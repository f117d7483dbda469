"""Links in a tar, decided against the tree they form together: chains, links to links, names reused, hard
links, links where restore writes its own files, and links asked for (--link-map / --link-all)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from cloudbk.backup.links import RESERVED, check_links, requested_links
from cloudbk.backup.tarextract import SafeExtractor
from cloudbk.errors import IntegrityError, LinkEscapes, UnsafeMember, UsageError
from cloudbk.repo.manifest import LinkEntry, Manifest, TarEntry

Member = tuple[tarfile.TarInfo, bytes | None]


def _tar(*members: Member) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for info, payload in members:
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def _file(name: str, payload: bytes = b"data") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def _dir(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o700
    return info, None


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): an empty destination and a directory beside it that must stay untouched."""
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    outside = tmp_path / "box" / "escaped_wal"
    return dest, outside


REFUSED: dict[str, tuple[list[Member], str]] = {
    # each member passes a check of its own text; together they lead out of DEST
    "chain-of-relative-links": (
        [_dir("d"), _link("d/up", ".."), _link("d/up2", "up/.."), _link("pg_wal", "d/up2/escaped_wal")],
        "goes above the destination",
    ),
    "link-to-link-to-outside": (
        [_dir("a"), _dir("a/b"), _link("a/b/top", "../.."), _link("esc", "a/b/top/.."), _link("pg_wal", "esc")],
        "goes above the destination",
    ),
    "loop": ([_link("x", "y"), _link("y", "x")], "loop"),
    "file-through-a-link": ([_dir("sub"), _link("l", "sub"), _file("l/f")], "through a symbolic link"),
    "link-replaced-by-directory": ([_link("x", "sub"), _dir("x"), _file("x/f")], "replaces a symbolic link"),
    "directory-replaced-by-link": ([_dir("x"), _file("x/f"), _link("x", "x/f")], "appears twice"),
    "file-replaced-by-file": ([_file("f", b"one"), _file("f", b"two")], "appears twice"),
    "hardlink-to-a-link": ([_file("f"), _link("s", "f"), _link("h", "s", tarfile.LNKTYPE)], "not a file extracted"),
    "hardlink-through-a-link": (
        [_dir("sub"), _file("sub/f"), _link("l", "sub"), _link("h", "l/f", tarfile.LNKTYPE)],
        "not a file extracted",
    ),
    "hardlink-before-its-file": ([_link("h", "f", tarfile.LNKTYPE), _file("f")], "not a file extracted"),
    "auto-conf-is-a-link": ([_file("real.conf"), _link("postgresql.auto.conf", "real.conf")], "restore writes"),
    "recovery-signal-is-a-link": ([_link("recovery.signal", "PG_VERSION")], "restore writes"),
    "recovery-signal-is-a-hardlink": (
        [_link("recovery.signal", "PG_VERSION", tarfile.LNKTYPE)],
        "restore writes",
    ),
    "pg-control-below-a-file": ([_file("global"), _file("global/pg_control")], "'global' is not a directory"),
    "pg-tblspc-is-a-link": ([_dir("base"), _link("pg_tblspc", "base")], "'pg_tblspc' is not a directory"),
    "a-file-below-a-file": ([_file("f"), _file("f/g")], "needs a directory"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_links_are_decided_against_the_tree_they_form(box: tuple[Path, Path], case: str) -> None:
    dest, outside = box
    members, reason = REFUSED[case]
    with pytest.raises(UnsafeMember, match=reason):
        SafeExtractor(str(dest), reserved=RESERVED).extract(io.BytesIO(_tar(_file("PG_VERSION", b"15\n"), *members)))
    assert not outside.exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]
    for path in dest.rglob("*"):  # no link was created: every one is checked before the first is made
        assert not path.is_symlink(), path


def test_links_inside_are_created_after_the_files(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = _tar(
        _link("alias", "conf"),  # a link to a link made later, to a file extracted later
        _link("conf", "sub/real.conf"),
        _dir("sub"),
        _file("sub/real.conf", b"x = 1\n"),
        _link("sub/up", ".."),
        _link("hard", "sub/real.conf", tarfile.LNKTYPE),
    )
    SafeExtractor(str(dest)).extract(io.BytesIO(data))
    assert (dest / "alias").read_bytes() == b"x = 1\n"
    assert os.readlink(dest / "alias") == "conf" and os.readlink(dest / "sub" / "up") == ".."
    assert (dest / "hard").stat().st_ino == (dest / "sub" / "real.conf").stat().st_ino


def test_check_links_names_the_link() -> None:
    assert check_links({"a": "b/c", "b": "d"}) == {"a": "d/c", "b": "d"}
    with pytest.raises(LinkEscapes, match=r"'pg_wal' -> 'log/x'.*passes through 'log'"):
        check_links({"pg_wal": "log/x"}, outward=frozenset({"log"}))


def test_a_backup_that_records_links_holds_no_link_members(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="symbolic link 'log' is not in the backup's manifest"):
        SafeExtractor(str(dest), symlinks=False).extract(io.BytesIO(_tar(_link("log", "sub"))))


def test_links_asked_for_get_the_content_and_point_outside(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    logs, wal, conf = tmp_path / "logs", tmp_path / "disk2" / "wal", tmp_path / "etc" / "extra.conf"
    data = _tar(
        _dir("log"), _file("log/server.log", b"LOG: ok\n"),  # a followed directory link (new backups)
        _link("pg_wal", "/somewhere/else"),  # a link member of an older backup
        _file("extra.conf", b"work_mem = '8MB'\n"),  # a followed file link
    )  # fmt: skip
    links = {"log": str(logs), "pg_wal": str(wal), "extra.conf": str(conf)}
    SafeExtractor(str(dest), links=links).extract(io.BytesIO(data))
    assert os.readlink(dest / "log") == str(logs) and (logs / "server.log").read_bytes() == b"LOG: ok\n"
    assert os.readlink(dest / "pg_wal") == str(wal) and wal.is_dir() is False  # made only as the link
    assert os.readlink(dest / "extra.conf") == str(conf) and conf.read_bytes() == b"work_mem = '8MB'\n"


def test_without_a_request_an_older_backups_absolute_link_is_refused_with_the_way_out(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = _tar(_link("log", "/var/log/postgresql"))
    with pytest.raises(UnsafeMember, match="absolute path"):
        SafeExtractor(str(dest)).extract(io.BytesIO(data))
    SafeExtractor(str(dest), trust_symlinks=True).extract(io.BytesIO(data))  # --link-all on such a backup
    assert os.readlink(dest / "log") == "/var/log/postgresql"


def test_link_requests_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    dest = str(tmp_path / "dest")
    tar = TarEntry.single("base.tar.zst", None, 0, "", 0, links=[LinkEntry("pg_wal", "/disk2/wal", LinkEntry.DIR)])
    assert requested_links(tar, dest, True, {}) == {"pg_wal": "/disk2/wal"}
    assert requested_links(tar, dest, False, {"pg_wal/": "/x/wal"}) == {"pg_wal": "/x/wal"}
    for mapping, reason in [
        ({"log": "/x"}, "recorded no link 'log'"),
        ({"pg_wal": "relative"}, "must be an absolute path"),
        ({"pg_wal": f"{dest}/inner"}, "points inside the destination"),
    ]:
        with pytest.raises(UsageError, match=reason):
            requested_links(tar, dest, False, mapping)
    older = TarEntry.single("base.tar.zst", None, 0, "", 0)  # before links were recorded: any name may be asked for
    assert requested_links(older, dest, True, {"log": "/x/log"}) == {"log": "/x/log"}
    for name, reason in [("global", "itself"), ("recovery.signal", "itself"), ("pg_tblspc/16385", "tablespace")]:
        with pytest.raises(UsageError, match=f"{name}.*{reason}"):
            requested_links(older, dest, False, {name: "/x/y"})
    # --link-all leaves restore's own files plain (a postgresql.auto.conf linked to /etc, say)
    auto = LinkEntry("postgresql.auto.conf", "/etc/pg/auto.conf", LinkEntry.FILE)
    tar.links = [*(tar.links or []), auto]
    assert requested_links(tar, dest, True, {}) == {"pg_wal": "/disk2/wal"}


def test_manifest_records_links_and_reads_older_manifests_without_them() -> None:
    link = LinkEntry("log", "/var/log/postgresql", LinkEntry.DIR)
    m = Manifest(
        id="20261121T090000Z", server="main", system_identifier="1", pg_version=150004, timeline=1, begin_lsn=0,
        end_lsn=1, begin_wal="0" * 24, end_wal="0" * 24, begin_time="t", end_time="t", wal_segment_size=1 << 24,
        compression="zstd", tars=[TarEntry.single("base.tar.zst", None, 0, "", 0, links=[link])],
    )  # fmt: skip
    doc = json.loads(m.to_json())
    assert doc["tars"][0]["links"] == [{"path": "log", "target": "/var/log/postgresql", "type": "dir"}]
    assert Manifest.from_json(m.to_json(), "k").tars[0].links == [link]
    del doc["tars"][0]["links"]
    assert Manifest.from_dict(doc, "k").tars[0].links is None
    doc["tars"][0]["links"] = [{"path": "log", "target": "x", "type": "fifo"}]
    with pytest.raises(IntegrityError, match="unknown type"):
        Manifest.from_dict(doc, "k")
