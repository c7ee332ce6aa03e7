"""One TLS context for every outgoing HTTP client of the daemon.

``httpx.AsyncClient()`` builds a fresh SSL context (loading the CA bundle,
~20 ms here) per client, and the daemon holds several (Twilio REST, chat,
HTTP tools, call events, status reports): that was most of the extra start-up
time. The context is made once, on first use, with httpx's own defaults
(certificate and host-name checks on).
"""

from __future__ import annotations

import ssl
from functools import cache
from typing import Any

import httpx


@cache
def shared_ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def http_client(**kwargs: Any) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**kwargs)`` verifying TLS with the shared context."""
    kwargs.setdefault("verify", shared_ssl_context())
    return httpx.AsyncClient(**kwargs)
