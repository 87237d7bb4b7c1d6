"""Sessions, their state and messages: ``/v1/sessions``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter

from ...models import UNSET, ChangeResult, Message, Page, Session, SessionSummary, Status
from ..auth import Tenant, service
from ..http import (
    ETAG_HEADER,
    IF_MATCH_DOC,
    READ,
    WRITE,
    IfMatch,
    errors,
    json_response,
    list_response,
    require_media_type,
    session_response,
)
from ..limits import JSONRoute
from ..schemas import AppendIn, ChangeIn, Count, Removed, SessionIn, SessionPatch

__all__ = ["router"]

router = APIRouter(prefix="/v1", route_class=JSONRoute, tags=["sessions"])

_JSON = require_media_type("application/json")
_MERGE_PATCH = require_media_type("application/merge-patch+json")
_messages = TypeAdapter(list[Message])

SessionId = Annotated[str, Path(description="The session id", max_length=128)]
_SESSION: dict[int | str, dict[str, Any]] = {200: {"headers": ETAG_HEADER}}


def _created(session: Session) -> Response:
    response = session_response(session, 201)
    response.headers["Location"] = f"/v1/sessions/{session.id}"
    return response


@router.post(
    "/sessions",
    status_code=201,
    response_model=Session,
    dependencies=[_JSON],
    responses={201: {"headers": ETAG_HEADER}, **errors(*WRITE)},
    summary="Create a session",
)
async def create_session(request: Request, store: Tenant, body: SessionIn) -> Response:
    session = await store.create_session(
        session_id=body.id,
        owner=body.owner,
        folder=body.folder,
        title=body.title,
        status=body.status,
        step=body.step,
        state=body.state,
        metadata=body.metadata,
        ttl=body.ttl,
        idle_ttl=body.idle_ttl,
    )
    service(request).metrics.sessions_created.inc()
    return _created(session)


async def _filters(
    owner: Annotated[str | None, Query(description="Sessions of this owner")] = None,
    folder: Annotated[str | None, Query(description="Sessions in this folder")] = None,
    status: Status | None = None,
    created_since: Annotated[
        datetime | None, Query(description="ISO 8601 with a zone; included")
    ] = None,
    created_before: Annotated[datetime | None, Query(description="excluded")] = None,
    updated_since: datetime | None = None,
    updated_before: datetime | None = None,
    title_contains: Annotated[str | None, Query(description="ASCII case ignored")] = None,
) -> dict[str, Any]:
    """The filters of a listing or a count, from query parameters."""
    return {
        "owner": UNSET if owner is None else owner,
        "folder": UNSET if folder is None else folder,
        "status": status,
        "created_since": created_since,
        "created_before": created_before,
        "updated_since": updated_since,
        "updated_before": updated_before,
        "title_contains": title_contains,
    }


Filters = Annotated[dict[str, Any], Depends(_filters)]


@router.get(
    "/sessions",
    response_model=Page[SessionSummary],
    responses=errors(*READ),
    summary="List sessions, a page at a time",
)
async def list_sessions(
    store: Tenant,
    filters: Filters,
    order_by: Literal["created_at", "updated_at"] = "created_at",
    descending: bool = True,
    limit: Annotated[int, Query(ge=1)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the page before")] = None,
) -> Response:
    page = await store.list_sessions(
        **filters,
        order_by=order_by,
        descending=descending,
        limit=limit,
        cursor=cursor,
    )
    return json_response(page)


@router.get(
    "/session-count",
    response_model=Count,
    responses=errors(*READ),
    summary="Count sessions matching the filters of a listing",
)
async def count_sessions(store: Tenant, filters: Filters) -> Count:
    return Count(count=await store.count_sessions(**filters))


@router.get(
    "/sessions/{session_id}",
    response_model=Session,
    responses={**_SESSION, **errors(*READ)},
    summary="Get a session with its state",
)
async def get_session(store: Tenant, session_id: SessionId) -> Response:
    return session_response(await store.get_session(session_id))


def _fields(body: SessionPatch) -> dict[str, Any]:
    names = ("title", "owner", "folder", "status", "step", "metadata")
    return {name: getattr(body, name) for name in names if name in body.model_fields_set}


@router.patch(
    "/sessions/{session_id}",
    response_model=Session,
    dependencies=[_JSON],
    responses={**_SESSION, **errors(*WRITE)},
    openapi_extra=IF_MATCH_DOC,
    summary="Set fields of a session",
)
async def update_session(
    store: Tenant, session_id: SessionId, body: SessionPatch, version: IfMatch
) -> Response:
    session = await store.update_session(session_id, **_fields(body), expected_version=version)
    return session_response(session)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    responses=errors(*READ, 400, 409, 412, 428),
    openapi_extra=IF_MATCH_DOC,
    summary="Delete a session and its messages",
)
async def delete_session(store: Tenant, session_id: SessionId, version: IfMatch) -> Response:
    await store.delete_session(session_id, expected_version=version)
    return Response(status_code=204)


@router.patch(
    "/sessions/{session_id}/state",
    response_model=Session,
    dependencies=[_MERGE_PATCH],
    responses={**_SESSION, **errors(*WRITE)},
    openapi_extra=IF_MATCH_DOC,
    summary="Merge a JSON Merge Patch (RFC 7396) into the state",
)
async def patch_state(
    store: Tenant,
    session_id: SessionId,
    patch: Annotated[dict[str, Any], Body(media_type="application/merge-patch+json")],
    version: IfMatch,
) -> Response:
    session = await store.update_state(session_id, patch, expected_version=version)
    return session_response(session)


@router.put(
    "/sessions/{session_id}/state",
    response_model=Session,
    dependencies=[_JSON],
    responses={**_SESSION, **errors(*WRITE)},
    openapi_extra=IF_MATCH_DOC,
    summary="Replace the state whole",
)
async def replace_state(
    store: Tenant,
    session_id: SessionId,
    state: Annotated[dict[str, Any], Body()],
    version: IfMatch,
) -> Response:
    session = await store.update_state(session_id, state, replace=True, expected_version=version)
    return session_response(session)


@router.post(
    "/sessions/{session_id}/change",
    response_model=ChangeResult,
    dependencies=[_JSON],
    responses={**_SESSION, **errors(*WRITE)},
    openapi_extra=IF_MATCH_DOC,
    summary="One atomic change: state, fields and messages, all or nothing",
)
async def change_session(
    request: Request, store: Tenant, session_id: SessionId, body: ChangeIn, version: IfMatch
) -> Response:
    result = await store.change_session(
        session_id,
        state_patch=body.state_patch,
        state=body.state,
        **_fields(body),
        messages=body.messages,
        expected_version=version,
    )
    if result.messages:
        service(request).metrics.messages_appended.inc(len(result.messages))
    return json_response(result, headers={"ETag": f'"{result.session.version}"'})


# --- messages --------------------------------------------------------------------------


@router.post(
    "/sessions/{session_id}/messages",
    status_code=201,
    response_model=list[Message],
    dependencies=[_JSON],
    responses=errors(*WRITE),
    openapi_extra=IF_MATCH_DOC,
    summary="Append messages",
)
async def append_messages(
    request: Request, store: Tenant, session_id: SessionId, body: AppendIn, version: IfMatch
) -> Response:
    appended = await store.append_messages(session_id, body.messages, expected_version=version)
    service(request).metrics.messages_appended.inc(len(appended))
    response = list_response(_messages, appended)
    response.status_code = 201
    return response


@router.get(
    "/sessions/{session_id}/messages",
    response_model=list[Message],
    responses=errors(*READ),
    summary="Read messages, oldest first: a page after a seq, or the last n",
)
async def read_messages(
    store: Tenant,
    session_id: SessionId,
    after_seq: Annotated[int, Query(ge=0, description="Messages after this seq")] = 0,
    limit: Annotated[int, Query(ge=1, description="At most this many")] = 100,
    last: Annotated[
        int | None, Query(ge=1, description="Instead: the newest `last` messages")
    ] = None,
) -> Response:
    if last is not None:
        found = await store.last_messages(session_id, last)
    else:
        found = await store.read_messages(session_id, after_seq=after_seq, limit=limit)
    return list_response(_messages, found)


@router.delete(
    "/sessions/{session_id}/messages/last",
    response_model=Message,
    responses={
        204: {"description": "The session has no message"},
        **errors(*READ, 400, 409, 412, 428),
    },
    openapi_extra=IF_MATCH_DOC,
    summary="Remove and return the newest message",
)
async def pop_message(store: Tenant, session_id: SessionId, version: IfMatch) -> Response:
    popped = await store.pop_message(session_id, expected_version=version)
    if popped is None:
        return Response(status_code=204)
    return json_response(popped)


@router.delete(
    "/sessions/{session_id}/messages",
    response_model=Removed,
    responses=errors(*READ, 400, 409, 412, 428),
    openapi_extra=IF_MATCH_DOC,
    summary="Remove every message (seqs are not reused)",
)
async def clear_messages(store: Tenant, session_id: SessionId, version: IfMatch) -> Removed:
    return Removed(removed=await store.clear_messages(session_id, expected_version=version))
