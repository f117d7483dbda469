"""Keeping a repository healthy: retention, delete and keep, check, reindex."""
