"""The one exception every WebSocket of the relay raises when it is over."""

from __future__ import annotations


class Disconnected(Exception):
    """The connection is over for receiving (or sending).

    ``code``: the peer's close code (1005 if it sent none), 1006 when the
    connection was lost without a close; with ``local`` the peer broke the
    protocol and ``code`` is the close we owe it (1002, 1007, 1008, 1009); with
    ``stalled`` the peer took or sent nothing for ``stall_seconds`` and the
    connection was aborted.
    """

    def __init__(
        self, code: int, reason: str = "", *, local: bool = False, stalled: bool = False
    ) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.local = local
        self.stalled = stalled

    def again(self) -> Disconnected:
        """A fresh copy to raise (re-raising one instance would chain tracebacks)."""
        return type(self)(self.code, self.reason, local=self.local, stalled=self.stalled)


class UpstreamClosed(Disconnected):
    """Raised by the relay's own (client-side) connections: the upstream is over.

    A separate class so that a session step that talks to both sides (a barge-in
    clears Twilio and truncates upstream) knows which one is gone."""
