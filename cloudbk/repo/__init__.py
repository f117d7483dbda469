"""The repository format: object keys, the object envelope and compression, the index, manifests, the
catalog of backups, and point-in-time planning over the index."""
