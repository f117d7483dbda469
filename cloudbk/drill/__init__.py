"""The restore drill: prove a backup restores by recovering it into a scratch directory (docs/drill.md)."""
