"""Pieces every route shares: JSON responses, ETag and If-Match, body media types, and the
error responses each kind of route documents."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter

from ..models import Session
from .auth import service
from .problems import ProblemError, problem_responses

__all__ = [
    "AUTH",
    "BODY",
    "ETAG_HEADER",
    "IF_MATCH_DOC",
    "READ",
    "WRITE",
    "IfMatch",
    "errors",
    "etag",
    "json_response",
    "list_response",
    "require_media_type",
    "session_response",
]

#: errors of any authenticated route, of one that reads a session, of one with a body
AUTH = (401, 403, 422, 429, 503)
READ = (*AUTH, 404)
BODY = (400, 413, 415)
WRITE = (*READ, *BODY, 409, 412, 428)

ETAG_HEADER = {
    "ETag": {"description": 'The session\'s version, quoted: "7"', "schema": {"type": "string"}}
}

_ETAG = re.compile(r'\s*"(\d{1,19})"\s*')
_MAX_VERSION = 2**63 - 1


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return problem_responses(*sorted(set(codes)))


def etag(version: int) -> str:
    return f'"{version}"'


def json_response(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        model.model_dump_json(), status_code=status, media_type="application/json", headers=headers
    )


def list_response(adapter: TypeAdapter[Any], items: Any) -> Response:
    return Response(adapter.dump_json(items), media_type="application/json")


def session_response(session: Session, status: int = 200) -> Response:
    return json_response(session, status, {"ETag": etag(session.version)})


_IF_MATCH_DESCRIPTION = (
    'The session\'s ETag ("7"): the write happens only at that version, else 412 and '
    "nothing changes; `*` matches any version"
)
#: ``openapi_extra`` of a route that reads If-Match (read from the request, not declared as
#: a parameter: FastAPI's parameter parsing costs more than the header is worth)
IF_MATCH_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "If-Match",
            "in": "header",
            "required": False,
            "description": _IF_MATCH_DESCRIPTION,
            "schema": {"type": "string"},
        }
    ]
}


async def _if_match(request: Request) -> int | None:
    """The version ``If-Match`` names, None for ``*`` or none (428 when required)."""
    if_match = request.headers.get("if-match")
    if if_match is None:
        if service(request).settings.http_require_if_match:
            raise ProblemError(428, "this server requires If-Match on writes: send the ETag")
        return None
    if if_match.strip() == "*":
        return None
    if if_match.lstrip().startswith("W/"):
        raise ProblemError(412, "a weak ETag never matches: send the ETag as it came")
    found = _ETAG.fullmatch(if_match)
    if found is None:
        raise ProblemError(400, 'If-Match must be one ETag as the server sent it, like "7"')
    version = int(found.group(1))
    if not 1 <= version <= _MAX_VERSION:
        raise ProblemError(412, f"If-Match {if_match.strip()} names no version of any session")
    return version


IfMatch = Annotated[int | None, Depends(_if_match)]


def require_media_type(*types: str) -> Any:
    """A dependency refusing a body whose Content-Type is not one of ``types`` (415)."""

    async def check(request: Request) -> None:
        given = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if given not in types:
            raise ProblemError(
                415,
                f"send the body as {' or '.join(types)}, not {given or 'no Content-Type'}",
            )

    return Depends(check)
