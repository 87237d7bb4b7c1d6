"""What the service tells operators: Prometheus metrics and one JSON access-log line per
request, neither ever holding a key, a header or a body."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import rules

__all__ = ["ACCESS_LOG", "AccessLog", "Metrics", "client_ip"]

ACCESS_LOG = logging.getLogger("sessionkeeper.access")
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sessionkeeper_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sessionkeeper_http_request_duration_seconds",
            "Seconds from a request's start to its response's end, by route and status",
            ["method", "route", "status"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.engine_errors = Counter(
            "sessionkeeper_engine_errors",
            "Requests that failed because the storage engine failed or was unreachable",
            registry=r,
        )
        self.sessions_created = Counter(
            "sessionkeeper_sessions_created", "Sessions created through the API", registry=r
        )
        self.messages_appended = Counter(
            "sessionkeeper_messages_appended", "Messages appended through the API", registry=r
        )

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


def client_ip(scope: Scope, trusted_proxies: list[str]) -> str:
    """The client's address, from ``X-Forwarded-For`` only when the peer is trusted."""
    client = scope.get("client")
    peer = client[0] if client else None
    forwarded = None
    if trusted_proxies:
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                forwarded = value.decode("latin-1")
    return rules.client_ip(peer, forwarded, trusted_proxies)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class AccessLog:
    """ASGI middleware: count and time every request, and log it as one JSON line."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, trusted_proxies: list[str], enabled: bool
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.trusted_proxies = trusted_proxies
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            elapsed = time.perf_counter() - started
            route = _route(scope)
            method = scope["method"]
            code = str(status)
            self.metrics.requests.labels(method, route, code).inc()
            self.metrics.latency.labels(method, route, code).observe(elapsed)
            if self.enabled and ACCESS_LOG.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                line = {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "method": method,
                    "path": scope["path"],  # no query string: it may carry cursors
                    "route": route,
                    "status": status,
                    "ms": round(elapsed * 1000, 3),
                    "client": client_ip(scope, self.trusted_proxies),
                    "key": state.get("key_id"),
                    "tenant": state.get("tenant"),
                }
                ACCESS_LOG.info(orjson.dumps(line).decode())
