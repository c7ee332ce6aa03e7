"""Refusal logging that a flood cannot turn into a disk-filler.

Up to ``burst`` refusals per ``interval`` are logged one by one; the rest are
counted and reported in one summary line when the next interval starts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("relay.refusals")


class RefusalLog:
    def __init__(
        self, burst: int = 20, interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = clock()
        self._logged = 0
        self._suppressed: Counter[str] = Counter()

    def note(self, reason: str, ip: str, detail: str) -> None:
        now = self._clock()
        if now - self._window_start >= self._interval:
            self._flush()
            self._window_start = now
            self._logged = 0
        if self._logged < self._burst:
            self._logged += 1
            log.warning("refused: %s", detail, extra={"reason": reason, "client_ip": ip})
        else:
            self._suppressed[reason] += 1

    def flush(self) -> None:
        """Report what was suppressed so far (the server calls this periodically and at stop)."""
        self._flush()

    def _flush(self) -> None:
        if self._suppressed:
            total = sum(self._suppressed.values())
            log.warning(
                "refused %d more requests (not logged one by one)",
                total,
                extra={"by_reason": dict(self._suppressed)},
            )
            self._suppressed.clear()
