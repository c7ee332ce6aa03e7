"""The ASGI application: HTTP routes on Quart-Trio, WebSocket upgrades to the front door.

Routes only: every decision lives in the module a route hands to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from relay.admission.guards import (
    Refusal,
    client_ip,
    forwarded_lines,
    ip_allowed,
    ip_key,
    rate_limit,
)
from relay.daemon.state import DaemonState
from relay.edge.asgi_ws import Message, Receive, Scope, Send
from relay.ops.metrics import CONTENT_TYPE

Handler = Callable[[], Awaitable[Response]]
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Webhook forms are a few KiB; refusing large bodies early keeps a flood cheap.
MAX_BODY_BYTES = 256 * 1024


def refusal_response(refusal: Refusal) -> Response:
    return Response(
        refusal.reason + "\n",
        status=refusal.status,
        headers=dict(refusal.headers),
        content_type="text/plain; charset=utf-8",
    )


def text(body: str, status: int = 200) -> Response:
    return Response(body + "\n", status=status, content_type="text/plain; charset=utf-8")


def create_http_app(
    rt: DaemonState, twilio_routes: dict[str, Handler], signed: Callable[[], Awaitable[bool]]
) -> QuartTrio:
    """``twilio_routes`` maps ``/twilio/...`` paths to POST handlers; ``signed`` tells
    whether the current request carries a valid Twilio signature (such requests
    are exempt from the per-IP bucket, docs/contract.md §3)."""
    app = QuartTrio("relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = 10
    app.config["PROPAGATE_EXCEPTIONS"] = False
    settings = rt.settings

    @app.before_request
    async def guard() -> Response | None:
        peer = request.scope.get("client") or ("", 0)
        g.client_ip = client_ip(
            str(peer[0]),
            request.headers.getlist("X-Forwarded-For"),
            settings.server.trusted_networks,
        )
        bucket = ip_key(g.client_ip, settings.limits.ipv6_prefix)
        # Read the (bounded) body before any early answer: an answer given while
        # the body is still arriving leaves it unread, and the kept-alive
        # connection could then carry no further request.
        await request.get_data()
        if request.path in twilio_routes and request.method == "POST" and await signed():
            return None
        refusal = await rate_limit(rt.store, f"http:{bucket}", settings.limits.http_per_minute)
        if refusal is not None:
            rt.metrics.reject("http_rate")
            rt.refusal_log.note("http_rate", g.client_ip, refusal.reason)
            return refusal_response(refusal)
        return None

    for path, handler in twilio_routes.items():
        app.add_url_rule(path, path, _post_only(handler), methods=ALL_METHODS)

    @app.errorhandler(413)
    async def too_large(_: Any) -> Response:
        response = text("request body too large", 413)
        # The rest of the body is never read: the connection cannot be reused.
        response.headers["Connection"] = "close"
        return response

    @app.errorhandler(500)
    async def internal(_: Any) -> Response:
        return text("internal error", 500)

    return app


def _post_only(handler: Handler) -> Handler:
    async def route() -> Response:
        if request.method != "POST":
            response = text("POST only", 426)
            response.headers["Upgrade"] = "websocket"
            return response
        return await handler()

    return route


def combine(
    rt: DaemonState,
    http_app: QuartTrio,
    websocket: Callable[[Scope, Receive, Send], Awaitable[None]],
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """One ASGI callable: WebSocket scopes to ``websocket``; the Twilio webhooks and
    lifespan to Quart; every other HTTP route answered right here.

    The plain routes (health, readiness, metrics, token pings, 426) skip Quart
    because they are what a flood hits: answering them in a few lines of ASGI
    costs a fraction of a framework request.
    """
    settings = rt.settings
    quart_paths = frozenset(rule.rule for rule in http_app.url_map.iter_rules())

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await websocket(scope, receive, send)
            return
        if kind != "http":
            await http_app(cast(Any, scope), cast(Any, receive), cast(Any, send))
            return
        if scope["path"] in quart_paths:
            await http_app(cast(Any, scope), cast(Any, receive), cast(Any, _ending_shielded(send)))
            return
        peer = scope.get("client") or ("", 0)
        forwarded = forwarded_lines(scope["headers"])
        ip = client_ip(str(peer[0]), forwarded, settings.server.trusted_networks)
        bucket = f"http:{ip_key(ip, settings.limits.ipv6_prefix)}"
        refusal = await rate_limit(rt.store, bucket, settings.limits.http_per_minute)
        if refusal is not None:
            rt.metrics.reject("http_rate")
            rt.refusal_log.note("http_rate", ip, refusal.reason)
            await _plain(scope, send, refusal.status, refusal.reason, refusal.headers)
            return
        await _route(rt, ip, scope, send)

    return asgi


def _ending_shielded(send: Send) -> Send:
    """``send`` with the response's last message shielded from cancellation.

    Quart-Trio runs a request as two tasks in a nursery and cancels that nursery
    as soon as the response is sent. Hypercorn does the connection's end-of-response
    work inside the ``send`` of the last body message: it queues ``http.disconnect``
    for the app (Quart's message task wakes and cancels the nursery), then re-arms
    the keep-alive timer or, for ``Connection: close``, closes the socket. Both of
    those await, so the cancellation cuts them and the connection stays open for
    good, whatever the status (README "Design notes"). Shielded,
    the send runs to its end; it can only wait on Hypercorn's own socket write,
    which Hypercorn already shields.
    """

    async def shielded(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return shielded


async def _route(rt: DaemonState, ip: str, scope: Scope, send: Send) -> None:
    path: str = scope["path"]
    method: str = scope["method"]
    first = path.split("/", 2)[1] if path.startswith("/") else ""
    if path == "/healthz" and method in ("GET", "HEAD"):
        await _plain(scope, send, 200, "ok")
    elif path == "/readyz" and method in ("GET", "HEAD"):
        draining = rt.draining.is_set()
        await _plain(scope, send, 503 if draining else 200, "draining" if draining else "ready")
    elif path == "/metrics" and method == "GET":
        if not ip_allowed(ip, rt.settings.server.metrics_networks):
            rt.metrics.reject("metrics_forbidden")
            await _plain(scope, send, 403, "forbidden")
        else:
            await _send(send, 200, rt.metrics.render(), CONTENT_TYPE, ())
    elif first in ("token", "auth"):
        # Health ping for clients that probe the token URL over plain HTTP;
        # the token is deliberately not checked (docs/contract.md §3).
        await _plain(scope, send, 200, "ok")
    else:
        await _plain(
            scope,
            send,
            426,
            "this endpoint speaks WebSocket",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )


async def _plain(
    scope: Scope, send: Send, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
) -> None:
    body = b"" if scope.get("method") == "HEAD" else (reason + "\n").encode()
    if _has_body(scope):
        # The request body is never read on these routes, so the connection cannot
        # carry another request: say so rather than let a keep-alive client find out.
        headers = (*headers, ("Connection", "close"))
    await _send(send, status, body, "text/plain; charset=utf-8", headers)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def _send(
    send: Send, status: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...]
) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
