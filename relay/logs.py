"""Logging setup: plain text or one JSON object per line, for us and every library.

Secrets are scrubbed by a filter as a last line of defence; the code never
logs them in the first place (no access log: a token can sit in a URL path).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


class Redactor(logging.Filter):
    """Replaces any configured secret that slipped into a message with ``[redacted]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            scrubbed = message
            for s in self._secrets:
                scrubbed = scrubbed.replace(s, "[redacted]")
            if scrubbed is not message and scrubbed != message:
                record.msg, record.args = scrubbed, None
        return True


def setup_logging(fmt: str, level: str, secrets: Iterable[str] = ()) -> None:
    """Route the root logger, warnings and libraries' loggers to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(Redactor(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # Libraries that log per request or per frame at INFO/DEBUG would flood the log.
    for noisy in ("hypercorn.access", "trio-websocket", "httpx", "httpcore", "twilio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name in ("hypercorn.error", "quart.app", "quart.serving"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
