"""How long-running use cases report progress without printing: the CLI passes an implementation."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, what: str, total: int) -> None:
        """A phase moving ``total`` bytes begins (0 when unknown)."""

    def advance(self, n: int) -> None:
        """``n`` more bytes done. Called from worker threads."""

    def note(self, text: str) -> None:
        """A step worth telling the operator (waiting for WAL, writing the manifest ...)."""

    def finish(self) -> None:
        """The current phase is over."""


class NoProgress:
    def start(self, what: str, total: int) -> None:
        return None

    def advance(self, n: int) -> None:
        return None

    def note(self, text: str) -> None:
        return None

    def finish(self) -> None:
        return None
