"""Phone calls that act (docs/contract.md §11 and §12): what a call leaves behind
(:mod:`relay.calls.report`), token usage, signing, HTTP tools, call events, and
the ``@call`` errands reported back into a conversation.

Pure data and I/O helpers; the call's behaviour itself lives in
``relay.sessions.twilio_core``.
"""
