"""Settings that are valid but risky on an exposed host, named at start.

Each is allowed (a test rig or a lab needs them) but an operator who set one by
mistake should hear about it: ``relay serve`` logs one warning line per risky
setting when it starts, and ``relay check-config`` prints the same lines
(docs/contract.md §10 "Risky settings").
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from relay.config import Settings, mask_password

log = logging.getLogger("relay.config")

# A signing key shorter than this can be searched for from one signed request.
MIN_SIGNING_KEY = 16


def is_loopback_host(host: str) -> bool:
    """True for a loopback address (IPv4, IPv6, IPv4-mapped) or the name localhost.

    Any other name counts as not loopback: what it resolves to is not known
    here, and a warning too many is cheaper than a key sent in clear.
    """
    host = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _bind_host(bind: str) -> str:
    return bind.rpartition(":")[0]


def _clear_text_remote(url: str) -> bool:
    """A ws:// or http:// URL whose host is not this machine."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    return parts.scheme in ("ws", "http") and not is_loopback_host(host)


def risky_settings(settings: Settings) -> list[str]:
    """One line for each risky setting in ``settings``, in a fixed order; [] if none."""
    server, twilio, openai = settings.server, settings.twilio, settings.openai
    public_binds = [b for b in server.bind if not is_loopback_host(_bind_host(b))]
    loopback_binds = [b for b in server.bind if is_loopback_host(_bind_host(b))]
    found: list[str] = []
    if not twilio.validate_signatures and public_binds:
        found.append(
            "twilio.validate_signatures = false on a non-loopback bind "
            f"({', '.join(public_binds)}): anyone can post forged Twilio webhooks and streams"
        )
    bases = [
        ("openai.realtime_url", openai.realtime_url, "the OpenAI API key"),
        ("openai.api_base", openai.api_base, "the OpenAI API key"),
        ("twilio.api_base", twilio.api_base, "the Twilio credentials"),
    ]
    for key, url, secret in bases:
        if url and _clear_text_remote(url):
            found.append(
                f"{key} = {mask_password(url)!r} is not encrypted and not on this host: "
                f"{secret} would travel in clear"
            )
    calls = settings.calls
    # Signed, so not forgeable; but what is signed is not secret from the wire.
    receivers = [("calls.events_url", calls.events_url, "each call's transcript")]
    receivers += [
        (f"calls.http_tools[{i}].url", tool.url, f"the arguments of {tool.name} and its answer")
        for i, tool in enumerate(calls.http_tools)
    ]
    for key, url, what in receivers:
        if url and _clear_text_remote(url):
            found.append(
                f"{key} = {mask_password(url)!r} is not encrypted and not on this host: "
                f"{what} would travel in clear"
            )
    signing_key = settings.secrets.events_signing_key
    used = bool(calls.events_url or calls.http_tools)
    if signing_key is not None and len(signing_key) < MIN_SIGNING_KEY and used:
        found.append(
            f"EVENTS_SIGNING_KEY is shorter than {MIN_SIGNING_KEY} characters: a receiver's "
            "signatures could be guessed (make a long one with `relay keygen`)"
        )
    if (
        urlsplit(server.public_url).scheme == "https"
        and loopback_binds
        and not server.trusted_proxies
    ):
        found.append(
            f"server.public_url is https on a loopback bind ({', '.join(loopback_binds)}) "
            "with no server.trusted_proxies: behind a proxy every client looks like the "
            "proxy and shares its rate limits"
        )
    return found


def log_risky_settings(settings: Settings) -> None:
    """``relay serve``: one warning line per risky setting, at start."""
    for line in risky_settings(settings):
        log.warning("risky setting: %s", line)
