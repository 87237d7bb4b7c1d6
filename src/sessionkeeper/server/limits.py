"""Limits on what a request may send: body size, counted as it arrives, and safe JSON.

``BodyLimit`` refuses a body over the limit with 413 before it is read whole: at once from
``Content-Length``, else (chunked bodies) as soon as the bytes received pass it.
``JSONRoute`` parses bodies with orjson (nesting is capped at 1024 levels, numbers past a
double refused), and integers past 64 bits are refused rather than turned into floats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import ProblemError, problem

__all__ = ["BodyLimit", "JSONRoute", "parse_json"]

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# orjson reads integers past 64 bits as floats: numbers this long take the careful path
_LONG_NUMBER = re.compile(rb"\d{20,}")


def _too_large(limit: int) -> str:
    return f"the body is over the limit of {limit} bytes (http_max_body_bytes)"


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            if name != b"content-length":
                continue
            if not value.isdigit():
                await problem(400, "Content-Length must be a number")(scope, receive, send)
                return
            if int(value) > limit:
                await problem(413, _too_large(limit))(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # an HTTPException passes through FastAPI's body reading as itself
                    raise ProblemError(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)


def _int64(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ProblemError(
            422, f"body: the integer {text[:30]}... does not fit in 64 bits", field="body"
        )
    return value


def _no_constant(text: str) -> Any:
    raise ProblemError(422, f"body: {text} is not a JSON number", field="body")


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body. Raises ``json.JSONDecodeError`` for text that is
    not JSON (400) and ProblemError (422) for integers past 64 bits."""
    value = orjson.loads(body)
    if _LONG_NUMBER.search(body) is None:
        return value
    try:  # depth is at most orjson's 1024 here, so the standard parser can only be slow
        return json.loads(body, parse_int=_int64, parse_constant=_no_constant)
    except RecursionError:
        raise ProblemError(422, "body: nested too deeply", field="body") from None


class _JSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose JSON bodies are read by ``parse_json``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_JSONRequest(request.scope, request.receive))

        return route
