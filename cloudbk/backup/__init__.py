"""Base backup use cases: take a backup (tar streams), restore one (safe extraction, links, recovery settings)."""
