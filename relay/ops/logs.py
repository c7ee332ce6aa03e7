"""Logging setup: plain text or one JSON object per line, for us and every library.

With ``log_format = "json"`` the process writes nothing but JSON lines to
stdout and stderr (docs/contract.md §3): our records, hypercorn's and libraries' records,
warnings, uncaught and unraisable exceptions, and, as a catch-all, any text a
library prints to ``sys.stdout``/``sys.stderr``. (Writes straight to file
descriptor 2 from C code, e.g. a faulthandler dump, cannot be caught here.)

Secrets are scrubbed from every finished line as a last line of defence; the
code never logs them in the first place (no access log: a token can sit in a
URL path).

In text format no value can break a line (docs/contract.md §10): many logged
values come from clients (a Twilio ``streamSid`` or custom parameter, a
forwarded address), so :class:`TextFormatter` escapes every control character
(a line break as ``\\n``, others as ``\\xNN``/``\\uNNNN``) in the message, the logger
name and every extra field, in one place rather than at each call site. A
record is one line that starts with its timestamp; a traceback follows it as
continuation lines that each start with two spaces (what log shippers join to
the record before them, e.g. a multiline pattern of ``^[[:space:]]``). The
exception message inside a traceback is a client's value too: there, too,
every control character but the line break is escaped, and whatever follows a
line break is indented like the rest of the block, so it cannot pass for a
record of its own. JSON needs no such care (JSON strings escape control
characters); it only also escapes NEL, U+2028 and U+2029, which some readers
take for line breaks.
"""

from __future__ import annotations

import base64
import io
import logging
import sys
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TextIO

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
REDACTED = "[redacted]"
# A secret shorter than this would also match ordinary text and mangle it.
MIN_SECRET_LEN = 8


class Redactor:
    """Replaces every configured secret in a finished line with ``[redacted]``.

    A bytes secret (the ENCRYPTION_KEY) is matched in every text form an
    operator may have written it in: base64 and base64url, padded or not.
    """

    def __init__(self, secrets: Iterable[str | bytes] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if isinstance(secret, bytes):
                forms.update(_text_forms(secret))
            else:
                forms.add(secret)
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted(
            (s for s in forms if len(s) >= MIN_SECRET_LEN), key=len, reverse=True
        )

    def __call__(self, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, REDACTED)
        return line


def _text_forms(key: bytes) -> set[str]:
    std = base64.b64encode(key).decode()
    url = base64.urlsafe_b64encode(key).decode()
    return {std, std.rstrip("="), url, url.rstrip("=")}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


# Valid JSON may hold NEL, U+2028 and U+2029 raw, but some line readers (JavaScript's,
# Python's str.splitlines) break lines there: write them as JSON escapes.
_JSON_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_line(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj, default=str).decode().translate(_JSON_SEPARATORS)


def _timestamp(created: float) -> str:
    millis = int(created % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the record's extras, exc."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (an exception, a path) still logs.
        return self._redact(_json_line(out))


# Named escapes for the common controls; every other non-printable character
# (C0, DEL, C1 such as NEL U+0085, U+2028/U+2029, bidi overrides, lone
# surrogates) as \xNN, \uNNNN or \UNNNNNNNN, the way repr() writes them.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Continuation lines of a record (its traceback) start with this.
CONTINUATION = "  "


def _escape_char(ch: str) -> str:
    if ch.isprintable():
        return ch
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character escaped: it cannot break a line."""
    if text.isprintable():  # the usual case, one C-speed pass
        return text
    return "".join(map(_escape_char, text))


def _field(value: object) -> str:
    r"""An extra's value as ``key=value`` wants it. Plain when it is printable and
    holds no space, ``=``, ``"`` or backslash; else quoted logfmt-style (``\\`` and
    ``\"`` inside, control characters escaped), so a value can neither break the
    line nor pose as another field, and every escape reads one way."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _block(text: str) -> str:
    """A traceback or stack: each of its lines escaped and indented as a continuation."""
    return "".join(f"\n{CONTINUATION}{escape(line)}" for line in text.rstrip("\n").split("\n"))


class TextFormatter(logging.Formatter):
    """``2025-01-31 12:00:00,123 INFO relay.daemon.server: message key=value ...``

    One line per record whatever its values hold; a traceback follows as
    indented continuation lines (see the module docstring).
    """

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        # Built here rather than by logging.Formatter.format, which would store the
        # message on the record and append the traceback unescaped.
        line = (
            f"{self.formatTime(record)} {record.levelname} {escape(record.name)}: "
            f"{escape(record.getMessage())}"
        )
        extra = _extras(record)
        if extra:
            line += " " + " ".join(f"{escape(k)}={_field(v)}" for k, v in extra.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += _block(record.exc_text)
        if record.stack_info:
            line += _block(self.formatStack(record.stack_info))
        return self._redact(line)


class JsonLinesStream(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr`` in JSON mode: every line a library
    prints becomes one JSON object (logger ``stdout``/``stderr``) on the real stream.

    It writes to the real stream itself rather than through ``logging``, so a
    failing handler that reports to ``sys.stderr`` cannot loop back into it.
    """

    encoding = "utf-8"

    def __init__(self, target: TextIO, name: str, level: str, redact: Redactor) -> None:
        super().__init__()
        self._target = target
        self._name = name
        self._level = level
        self._redact = redact
        self._pending = ""
        # Reentrant: a signal handler may print while this thread holds the lock.
        self._lock = threading.RLock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._target.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            for line in lines:
                self._emit(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._emit(self._pending)
                self._pending = ""
            self._target.flush()

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        out = {
            "ts": _timestamp(time.time()),
            "level": self._level,
            "logger": self._name,
            "msg": line.rstrip("\r"),
        }
        self._target.write(self._redact(_json_line(out)) + "\n")
        self._target.flush()


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("relay").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    # e.g. an exception in __del__ or a finalizer: Python would print it raw.
    what = unraisable.err_msg or "exception ignored"
    obj = f" in {unraisable.object!r}" if unraisable.object is not None else ""
    exc = unraisable.exc_value
    logging.getLogger("relay").error(
        "%s%s",
        what,
        obj,
        exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc is not None else None,
    )


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = args.exc_value
    logging.getLogger("relay").error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, exc, args.exc_traceback) if exc is not None else None,
    )


def setup_logging(fmt: str, level: str, secrets: Iterable[str | bytes] = ()) -> None:
    """Route the root logger, warnings, uncaught exceptions and libraries' loggers to
    stderr in one format; in JSON mode also wrap ``sys.stdout``/``sys.stderr``.

    ``secrets`` are scrubbed from every line (a bytes secret in its base64 forms).
    Meant to be called once, by ``relay serve``, before anything else logs.
    """
    redact = Redactor(secrets)
    stream: TextIO = sys.__stderr__ or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # Libraries that log per request or per frame at INFO/DEBUG would flood the log.
    for noisy in ("hypercorn.access", "trio-websocket", "httpx", "httpcore", "twilio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name in ("hypercorn.error", "quart.app", "quart.serving", "py.warnings"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
    # Python's defaults print these raw to stderr, past the formatter and the redactor.
    sys.excepthook = _log_uncaught
    sys.unraisablehook = _log_unraisable
    threading.excepthook = _log_thread_exception
    if fmt == "json":
        sys.stdout = JsonLinesStream(sys.__stdout__ or sys.stdout, "stdout", "info", redact)
        sys.stderr = JsonLinesStream(stream, "stderr", "error", redact)
