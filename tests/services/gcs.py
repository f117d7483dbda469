"""placeholder: filled in by the backend work."""
