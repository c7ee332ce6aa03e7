"""The ASGI application: HTTP routes on Quart-Trio, WebSocket upgrades to the front door.

Routes only: every decision lives in the module a route hands to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Response, g, request
from quart_trio import QuartTrio

from relay.asgi_ws import Receive, Scope, Send
from relay.guards import Refusal, client_ip, ip_allowed, rate_limit
from relay.metrics import CONTENT_TYPE
from relay.runtime import Runtime

Handler = Callable[[], Awaitable[Response]]
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Webhook forms are a few KiB; refusing large bodies early keeps a flood cheap.
MAX_BODY_BYTES = 256 * 1024


def refusal_response(refusal: Refusal) -> Response:
    return Response(refusal.reason + "\n", status=refusal.status, headers=dict(refusal.headers),
                    content_type="text/plain; charset=utf-8")


def text(body: str, status: int = 200) -> Response:
    return Response(body + "\n", status=status, content_type="text/plain; charset=utf-8")


def create_http_app(rt: Runtime, twilio_routes: dict[str, Handler], signed: Callable[[], Awaitable[bool]]) -> QuartTrio:
    """``twilio_routes`` maps ``/twilio/...`` paths to POST handlers; ``signed`` tells
    whether the current request carries a valid Twilio signature (such requests
    are exempt from the per-IP bucket, SPEC §3)."""
    app = QuartTrio("relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = 10
    app.config["PROPAGATE_EXCEPTIONS"] = False
    settings = rt.settings

    @app.before_request
    async def guard() -> Response | None:
        peer = request.scope.get("client") or ("", 0)
        g.client_ip = client_ip(str(peer[0]), request.headers.get("X-Forwarded-For"),
                                settings.server.trusted_networks)
        if request.path in twilio_routes and request.method == "POST" and await signed():
            return None
        refusal = await rate_limit(rt.store, f"http:{g.client_ip}", settings.limits.http_per_minute)
        if refusal is not None:
            rt.metrics.reject("http_rate")
            rt.refusal_log.note("http_rate", g.client_ip, refusal.reason)
            return refusal_response(refusal)
        return None

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        return text("ok")

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> Response:
        return text("draining", 503) if rt.draining.is_set() else text("ready")

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        if not ip_allowed(g.client_ip, settings.server.metrics_networks):
            rt.metrics.reject("metrics_forbidden")
            return text("forbidden", 403)
        return Response(rt.metrics.render(), content_type=CONTENT_TYPE)

    async def ping(rest: str = "") -> Response:
        # Health ping for clients that probe the token URL over plain HTTP;
        # the token is deliberately not checked (SPEC §3).
        return text("ok")

    for prefix in ("/token", "/auth"):
        app.add_url_rule(prefix, f"{prefix}_bare", ping, methods=ALL_METHODS)
        app.add_url_rule(f"{prefix}/<path:rest>", f"{prefix}_ping", ping, methods=ALL_METHODS)

    for path, handler in twilio_routes.items():
        app.add_url_rule(path, path, _post_only(handler), methods=ALL_METHODS)

    async def upgrade_required(path: str = "") -> Response:
        response = text("this endpoint speaks WebSocket", 426)
        response.headers["Upgrade"] = "websocket"
        response.headers["Connection"] = "Upgrade"
        return response

    app.add_url_rule("/", "root", upgrade_required, methods=ALL_METHODS)
    app.add_url_rule("/<path:path>", "other", upgrade_required, methods=ALL_METHODS)

    @app.errorhandler(413)
    async def too_large(_: Any) -> Response:
        return text("request body too large", 413)

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


def combine(http_app: QuartTrio, websocket: Callable[[Scope, Receive, Send], Awaitable[None]]) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """One ASGI callable: WebSocket scopes to ``websocket``, the rest (HTTP, lifespan) to Quart."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await websocket(scope, receive, send)
        else:
            await http_app(scope, receive, send)

    return asgi
