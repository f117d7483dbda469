"""WAL use cases: push (archive_command), fetch (restore_command), verify."""
