"""Which function calls of which response are still unanswered (docs/contract.md §11).

Pure bookkeeping for :class:`relay.sessions.twilio_core.TwilioCore`: a call is
opened once (the model announces it twice: arguments done, output item done),
answered once, and a response whose every call is answered and whose
``response.done`` has arrived is due its one follow-up ``response.create``,
unless one of its calls (``end_call``, a transfer that happened) said not to.
"""

from __future__ import annotations


class _Turn:
    __slots__ = ("done", "followup", "open")

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.done = False
        self.followup = True


class Turns:
    """Open function calls by response. Every method that can complete a response
    returns True when its follow-up ``response.create`` is due now."""

    def __init__(self, max_ids: int = 4096) -> None:
        self.max_ids = max_ids
        self._seen: set[str] = set()
        self._turns: dict[str, _Turn] = {}
        self._response_of: dict[str, str] = {}  # open call_id -> response id

    @property
    def seen(self) -> int:
        """Calls noted so far."""
        return len(self._seen)

    def open(self, call_id: str, response_id: str) -> bool:
        """Note a call of ``response_id``; False when it was already noted, or when
        ``max_ids`` calls have been (a model in a loop: memory stays bounded, and
        further calls are ignored rather than risk answering one twice)."""
        if call_id in self._seen or len(self._seen) >= self.max_ids:
            return False
        self._seen.add(call_id)
        self._turns.setdefault(response_id, _Turn()).open.add(call_id)
        self._response_of[call_id] = response_id
        return True

    def response_of(self, call_id: str) -> str | None:
        return self._response_of.get(call_id)

    def is_done(self, response_id: str) -> bool:
        """Its ``response.done`` arrived (or nothing of it is open any more)."""
        turn = self._turns.get(response_id)
        return turn is None or turn.done

    def answered(self, call_id: str, *, followup: bool = True) -> bool:
        response_id = self._response_of.pop(call_id, None)
        turn = None if response_id is None else self._turns.get(response_id)
        if turn is None or response_id is None:
            return False
        turn.open.discard(call_id)
        if not followup:
            turn.followup = False
        return self._complete(response_id, turn)

    def no_followup(self, call_id: str) -> None:
        """The response of ``call_id`` ends the model's turn for good (end_call)."""
        response_id = self._response_of.get(call_id)
        turn = None if response_id is None else self._turns.get(response_id)
        if turn is not None:
            turn.followup = False

    def done(self, response_id: str) -> bool:
        turn = self._turns.get(response_id)
        if turn is None:
            return False
        turn.done = True
        return self._complete(response_id, turn)

    def _complete(self, response_id: str, turn: _Turn) -> bool:
        if not turn.done or turn.open:
            return False
        del self._turns[response_id]
        return turn.followup
