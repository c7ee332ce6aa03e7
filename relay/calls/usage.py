"""Token usage summed from ``response.done`` events (docs/contract.md §9, §11)."""

from __future__ import annotations

from typing import Any

# A count beyond this is not a real usage figure; a hostile upstream cannot make a
# session's totals overflow into nonsense.
_MAX_COUNT = 10**9


def _count(obj: Any, key: str) -> int | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNT:
        return None
    return value


class Usage:
    """One session's tokens by direction and modality."""

    __slots__ = ("input_audio", "input_text", "output_audio", "output_text")

    def __init__(self) -> None:
        self.input_text = 0
        self.input_audio = 0
        self.output_text = 0
        self.output_audio = 0

    def add(self, usage: Any) -> tuple[int, int, int, int] | None:
        """Add ``response.usage`` of one ``response.done``; returns what was added as
        (input text, input audio, output text, output audio), or None when there was
        no usage object. Text tokens missing from the details are the total less the
        audio ones."""
        if not isinstance(usage, dict):
            return None
        added: list[int] = []
        for total_key, details_key in (
            ("input_tokens", "input_token_details"),
            ("output_tokens", "output_token_details"),
        ):
            details = usage.get(details_key)
            audio = _count(details, "audio_tokens") or 0
            text = _count(details, "text_tokens")
            if text is None:
                text = max(0, (_count(usage, total_key) or 0) - audio)
            added += (text, audio)
        self.input_text += added[0]
        self.input_audio += added[1]
        self.output_text += added[2]
        self.output_audio += added[3]
        return added[0], added[1], added[2], added[3]

    def event_fields(self) -> dict[str, int]:
        """The ``usage`` object of a ``call.ended`` event."""
        return {
            "input_tokens": self.input_text + self.input_audio,
            "output_tokens": self.output_text + self.output_audio,
            "input_audio_tokens": self.input_audio,
            "output_audio_tokens": self.output_audio,
        }

    def log_fields(self) -> dict[str, int]:
        """For a session's end log line."""
        return {
            "tokens_in": self.input_text + self.input_audio,
            "tokens_out": self.output_text + self.output_audio,
        }
