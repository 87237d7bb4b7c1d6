"""Who am I, and the admin-only routes: tenants, purge, export."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from ... import transfer
from ...errors import NotFound
from ...store import SessionStore
from ..auth import AdminStore, Key
from ..http import AUTH, errors
from ..limits import JSONRoute
from ..schemas import Identity

__all__ = ["router"]

router = APIRouter(prefix="/v1", route_class=JSONRoute)

JSONL = "application/jsonl"
_PAGE = 200


class Tenants(BaseModel):
    tenants: list[str]


class Purged(BaseModel):
    purged: int


@router.get(
    "/me",
    response_model=Identity,
    responses=errors(401, 429, 503),
    tags=["keys"],
    summary="The API key of this request: its id, tenant and role",
)
async def me(key: Key) -> Identity:
    return Identity(key_id=key.id, tenant=key.tenant, role=key.role, name=key.name)


@router.get(
    "/admin/tenants",
    response_model=Tenants,
    responses=errors(*AUTH),
    tags=["admin"],
    summary="Every tenant with a live session or a folder",
)
async def tenants(store: AdminStore) -> Tenants:
    return Tenants(tenants=await store.list_tenants())


@router.post(
    "/admin/purge",
    response_model=Purged,
    responses=errors(*AUTH),
    tags=["admin"],
    summary="Delete expired sessions and their messages",
)
async def purge(
    store: AdminStore,
    all_tenants: Annotated[bool, Query(description="Every tenant's, not just one")] = False,
) -> Purged:
    return Purged(purged=await store.purge_expired(all_tenants=all_tenants))


async def _export_chunks(store: SessionStore, all_tenants: bool) -> AsyncIterator[bytes]:
    """The export format of ``transfer`` in chunks: the header with the first tenant's
    folders (so an engine that is down fails before the 200), then one session line at a
    time, read page by page, so memory stays flat however large the tenant, then the
    tenant's analytics counters."""
    names = await store.list_tenants() if all_tenants else [store.tenant]
    counts = {"tenants": 0, "folders": 0, "sessions": 0, "messages": 0, "daily": 0}
    chunk = _line({"format": transfer.FORMAT, "version": transfer.FORMAT_VERSION})
    for name in names:
        tenant = store.for_tenant(name)
        counts["tenants"] += 1
        folders = await tenant.export_folders()
        # transfer keeps the folder line's canonical form; it is not public there yet
        chunk += b"".join(transfer._folder_line(folder) for folder in folders)
        counts["folders"] += len(folders)
        yield chunk
        chunk = b""
        cursor: str | None = None
        while True:
            page = await tenant.list_sessions(
                order_by="created_at", descending=False, limit=_PAGE, cursor=cursor
            )
            for summary in page.items:
                try:
                    record, messages = await tenant.export_session(summary.id)
                except NotFound:  # expired or deleted since it was listed
                    continue
                yield transfer.session_line(record, messages)
                counts["sessions"] += 1
                counts["messages"] += len(messages)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        daily = await transfer.daily_lines(tenant)
        counts["daily"] += len(daily)
        chunk = b"".join(daily)
    yield chunk + _line({"type": "end", **counts})


def _line(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS) + b"\n"


@router.get(
    "/admin/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The export format (JSON Lines), streamed; a response cut short "
            "has no end line",
            "content": {JSONL: {"schema": {"type": "string"}}},
        },
        **errors(*AUTH),
    },
    tags=["admin"],
    summary="Export a tenant (or every tenant) as JSON Lines, streamed",
)
async def export(
    store: AdminStore,
    all_tenants: Annotated[bool, Query(description="Every tenant, not just one")] = False,
) -> Response:
    lines = _export_chunks(store, all_tenants)
    first = await anext(lines)  # the engine answers before the 200 is sent
    return StreamingResponse(_chain(first, lines), media_type=JSONL)


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for line in rest:
        yield line
