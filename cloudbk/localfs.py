"""Local-filesystem durability helpers shared by the file backend and the commands that write local files."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable (after a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
