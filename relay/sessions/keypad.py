"""Caller key presses gathered into bursts (docs/contract.md §11). Pure.

Keys pressed less than ``gap_ms`` apart are one burst; a burst becomes one
typed message once ``gap_ms`` pass without a key. A burst keeps its first
``max_keys`` keys and goes on absorbing the rest until it pauses, so a stream
that floods key presses without a pause produces no message at all.
"""

from __future__ import annotations

KEYS = frozenset("0123456789*#ABCD")  # the sixteen DTMF keys


class Keypad:
    __slots__ = ("_keys", "due_ms", "gap_ms", "max_keys")

    def __init__(self, gap_ms: float = 1500.0, max_keys: int = 64) -> None:
        self.gap_ms = gap_ms
        self.max_keys = max_keys
        self._keys: list[str] = []
        self.due_ms = 0.0  # when the burst in progress is over

    @property
    def pending(self) -> bool:
        return bool(self._keys)

    def press(self, key: object, now_ms: float) -> bool:
        """Note a key; False (and nothing noted) for anything that is not a phone's key."""
        if not isinstance(key, str) or key not in KEYS:
            return False
        if len(self._keys) < self.max_keys:
            self._keys.append(key)
        self.due_ms = now_ms + self.gap_ms
        return True

    def take(self, now_ms: float) -> str | None:
        """The message of the burst, once it is over (then the keypad is empty)."""
        if not self._keys or now_ms < self.due_ms:
            return None
        keys, self._keys = self._keys, []
        return f"The caller pressed {' '.join(keys)}."
