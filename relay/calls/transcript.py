"""A call's text in order, bounded (docs/contract.md §11): older turns go first."""

from __future__ import annotations

from collections import deque

MAX_BYTES = 64 * 1024


class Transcript:
    """(role, text) turns whose UTF-8 text adds up to at most ``max_bytes``.

    A single turn longer than the bound keeps its beginning; adding a turn drops
    the oldest ones until the new one fits. Memory per call is therefore bounded
    whatever the upstream sends.
    """

    __slots__ = ("_turns", "max_bytes", "size")

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._turns: deque[tuple[str, str, int]] = deque()

    def add(self, role: str, text: str) -> None:
        text = text.strip()
        if not text:
            return
        data = text.encode("utf-8", "replace")
        if len(data) > self.max_bytes:
            data = data[: self.max_bytes]
            text = data.decode("utf-8", "ignore")
            data = text.encode("utf-8")
        while self._turns and self.size + len(data) > self.max_bytes:
            self.size -= self._turns.popleft()[2]
        self._turns.append((role, text, len(data)))
        self.size += len(data)

    def turns(self) -> list[tuple[str, str]]:
        return [(role, text) for role, text, _ in self._turns]

    def __len__(self) -> int:
        return len(self._turns)
