"""Pieces of ``scripts/bench_wal.py``: processes and their CPU, the HTTPS endpoint, the peers, the phases.

Import it from a script that has put ``tests/`` and the repository root on ``sys.path`` (bench_wal.py does):
the benchmark starts its services and PostgreSQL clusters with the same code the tests use.
"""
