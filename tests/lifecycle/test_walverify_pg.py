"""``cloudbk wal-verify`` on a real archive: an injected gap, and a segment of another database system."""

from __future__ import annotations

import json
import subprocess

from backends import Backend
from lifecycle_fakes import wal_object
from lifecycle_pg import Site, summary
from pgcluster import PG_BIN, PG_USER, new_dir, run_as_pg

from cloudbk.pg.walnames import parse_lsn, parse_segment_header, segment_name
from cloudbk.repo import layout
from cloudbk.repo.index import load_index


def test_wal_verify_reports_a_gap_and_a_foreign_segment() -> None:
    root = new_dir("lc-repo")
    backend = Backend("file", f"file://{root}")
    site = Site.create(backend)
    storage = backend.open()
    try:
        site.churn(1)
        b1 = site.backup()
        site.churn(6)
        site.backup()
        site.churn(2)
        site.settle()
        ok = site.wal_verify("--deep")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "wal-verify: OK" in ok.stdout

        size = load_index(storage, "main").wal_segment_size
        assert size is not None
        first = parse_lsn(summary(site, b1)["begin_lsn"]) // size
        lost, foreign = segment_name(1, first + 3, size), segment_name(1, first + 5, size)

        # a segment vanishes from storage: the index still lists it, so only --deep can tell
        storage.delete(layout.wal_key("main", lost))
        assert site.wal_verify().returncode == 0
        deep = site.wal_verify("--deep")
        assert deep.returncode == 4
        assert f"GAP: timeline 1: the index lists {lost} .. {lost} but storage does not hold them" in deep.stdout
        # once the index is rebuilt from the objects, the plain walk of the index sees the gap too
        site.cloudbk("reindex")
        plain = site.wal_verify()
        assert plain.returncode == 4
        assert f"GAP: timeline 1: 1 segment(s) missing, {lost} .. {lost}" in plain.stdout
        assert "wal-verify: FAILED (1 gap(s))" in plain.stdout

        # a segment of another cluster (a fresh initdb) stored under one of ours
        other = new_dir("lc-other")
        run_as_pg([str(PG_BIN / "initdb"), "-D", str(other / "data"), "-U", "postgres", "--auth=trust"])
        alien = run_as_pg(["cat", str(other / "data" / "pg_wal" / "000000010000000000000001")], input=b"").stdout
        assert isinstance(alien, bytes)
        header = parse_segment_header(alien[:64])
        assert header is not None
        key = layout.wal_key("main", foreign)
        storage.delete(key)
        storage.put_bytes(key, wal_object(foreign, alien))
        subprocess.run(["chown", "-R", PG_USER, str(root)], check=True)
        report = site.wal_verify("--deep", "--json")
        assert report.returncode == 4
        doc = json.loads(report.stdout)
        problems = {(p["kind"], p.get("key")) for p in doc["problems"]}
        assert ("foreign", key) in problems
        assert any(p["kind"] == "gap" and p["first"] == first + 3 for p in doc["problems"])
        message = next(p["message"] for p in doc["problems"] if p["kind"] == "foreign")
        assert str(header.system_identifier) in message and doc["system_identifier"] in message
        text = site.wal_verify("--deep").stdout
        assert f"FOREIGN: {foreign} belongs to database system {header.system_identifier}" in text
    finally:
        storage.close()
        site.destroy()
