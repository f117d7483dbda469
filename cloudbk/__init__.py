"""cloudbk: PostgreSQL WAL archiving, base backups and point-in-time restore to object storage."""

__version__ = "0.1.0"
