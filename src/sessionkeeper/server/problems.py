"""Errors as RFC 9457 problem details: one shape for every error the service returns.

Every error body is ``application/problem+json`` with ``type`` (a URN naming the kind of
problem), ``title``, ``status`` and a ``detail`` that says what to fix, plus ``field`` for
bad input, ``retry_after`` for 429 and ``errors`` for request validation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import (
    AlreadyExists,
    BackendUnavailable,
    BudgetExceeded,
    InvalidInput,
    LockedOut,
    NotFound,
    RateLimited,
    SessionKeeperError,
    VersionConflict,
)

__all__ = ["PROBLEM_JSON", "Problem", "ProblemError", "install", "problem_responses"]

PROBLEM_JSON = "application/problem+json"
_TYPE = "urn:sessionkeeper:problem:"

#: status -> (type slug, title, when the service answers it), for docs and plain errors
_KINDS: dict[int, tuple[str, str, str]] = {
    400: ("bad-request", "Bad request", "The body is not JSON, or If-Match is malformed"),
    401: ("unauthorized", "Unauthorized", "No API key, or a wrong, unknown or revoked one"),
    403: ("forbidden", "Forbidden", "The key's role or tenant does not allow this"),
    404: ("not-found", "Not found", "No such session or folder in this tenant (or expired)"),
    405: ("method-not-allowed", "Method not allowed", "The route has no such method"),
    409: ("conflict", "Conflict", "The id or name is taken"),
    412: (
        "precondition-failed",
        "Precondition failed",
        "If-Match does not name the session's current version; nothing was changed",
    ),
    413: ("body-too-large", "Body too large", "The body is over http_max_body_bytes"),
    415: ("unsupported-media-type", "Unsupported media type", "The body's Content-Type"),
    422: ("invalid-input", "Invalid input", "A value was refused; `field` names it"),
    428: (
        "precondition-required",
        "Precondition required",
        "This server requires If-Match on writes (http_require_if_match)",
    ),
    429: (
        "rate-limited",
        "Too many requests",
        "A rate limit, a failed-authentication lockout or a budget; see Retry-After",
    ),
    500: ("internal-error", "Internal error", "A bug: please report it"),
    503: ("unavailable", "Service unavailable", "The storage engine failed or cannot be reached"),
}


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URN naming the kind of problem")
    title: str
    status: int
    detail: str = Field(description="What went wrong and what to do about it")
    field: str | None = Field(None, description="The input that was refused (422)")
    retry_after: float | None = Field(None, description="Seconds to wait before retrying (429)")
    errors: list[dict[str, Any]] | None = Field(
        None, description="Each validation error: loc, msg, type"
    )


class ProblemError(HTTPException):
    """An HTTP error raised by the service itself, with the problem it answers."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status, detail, headers)
        self.kind = kind
        self.extra = extra


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error codes, each a problem+json body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        description = _KINDS[code][2]
        entry: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if code == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Whole seconds to wait",
                    "schema": {"type": "integer"},
                }
            }
        responses[code] = entry
    return responses


def problem(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    slug, title, _ = _KINDS.get(status, ("error", "Error", ""))
    body = Problem(type=_TYPE + (kind or slug), title=title, status=status, detail=detail, **extra)
    if status == 429 and body.retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(body.retry_after)))}
    return Response(
        body.model_dump_json(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


async def _store_error(request: Request, exc: SessionKeeperError) -> Response:
    if isinstance(exc, InvalidInput):
        return problem(422, str(exc), field=exc.field)
    if isinstance(exc, NotFound):
        return problem(404, str(exc))
    if isinstance(exc, VersionConflict):
        if "if-match" in request.headers:
            return problem(412, str(exc), expected=exc.expected, actual=exc.actual)
        return problem(409, str(exc), kind="version-conflict")
    if isinstance(exc, AlreadyExists):
        return problem(409, str(exc))
    if isinstance(exc, BudgetExceeded):
        retry = None
        if exc.resets_at is not None:
            retry = max(exc.resets_at - time.time(), 0.0)
        return problem(429, str(exc), kind="budget-exceeded", retry_after=retry, scope=exc.scope)
    if isinstance(exc, RateLimited | LockedOut):
        kind = "rate-limited" if isinstance(exc, RateLimited) else "locked-out"
        return problem(429, str(exc), kind=kind, retry_after=exc.retry_after)
    if isinstance(exc, BackendUnavailable):
        request.app.state.service.metrics.engine_errors.inc()
        return problem(503, str(exc) or "the storage engine is unavailable")
    return problem(500, str(exc))


def _loc(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "malformed JSON")
        return problem(400, f"the body is not valid JSON: {reason}", kind="malformed-json")
    field = _loc(first.get("loc", ()))
    detail = f"{field}: {first.get('msg', 'is invalid')}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem(422, detail, field=field, errors=errors)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if isinstance(exc, ProblemError):
        return problem(exc.status_code, exc.detail, kind=exc.kind, headers=exc.headers, **exc.extra)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return problem(exc.status_code, detail, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return problem(500, "the server failed on this request; it has been logged")


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem+json."""
    app.add_exception_handler(SessionKeeperError, _store_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
