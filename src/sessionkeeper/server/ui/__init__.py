"""The admin page at ``/ui``: one static page, and the one JSON route the API lacks for it.

Include it with ``create_app(store, routers=[ui.router])`` (``sessionkeeper serve`` does).
The page (``static/``: HTML, plain JavaScript and CSS, nothing to build, nothing fetched
from elsewhere) signs in with an API key, keeps it in ``sessionStorage`` and sends it as
``Authorization: Bearer`` to the same ``/v1`` routes any client calls, so it sees exactly
what the key may see. The only route of its own is ``GET /ui/api/daily``: sessions created
and completed per day, counted with one indexed ``count_sessions`` per day and figure.

Views are tabs: Sessions (stats, the chart, the list, a conversation) and, for admin keys
only, Operations (doctor, check and repair, archive and purge with a dry run first,
restore), over the ``/v1/admin`` operations routes.
"""

from __future__ import annotations

import asyncio
import time
from datetime import date, datetime, timedelta, timezone
from functools import cache
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from ...store import SessionStore
from ..auth import Tenant
from ..http import AUTH, errors

__all__ = ["router"]

router = APIRouter(tags=["admin page"])

# The page loads its own files only and talks only to this server.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
_DAY = timedelta(days=1)


@cache
def _read(name: str) -> bytes:
    return files(__package__).joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=_FILES[name], headers=_HEADERS)


@router.get("/ui", include_in_schema=False)
async def page_redirect() -> Response:
    # the page's links are relative ("app.js", "../v1/me"), so it works mounted anywhere
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/", include_in_schema=False)
async def page() -> Response:
    return _file("index.html")


@router.get("/ui/app.js", include_in_schema=False)
async def script() -> Response:
    return _file("app.js")


@router.get("/ui/app.css", include_in_schema=False)
async def style() -> Response:
    return _file("app.css")


class Day(BaseModel):
    day: date = Field(description="The day, in the time zone of utc_offset")
    created: int = Field(description="Live sessions created that day")
    completed: int = Field(description="Live sessions now completed whose last change was that day")


class Daily(BaseModel):
    utc_offset: int = Field(description="Minutes east of UTC the days are counted in")
    days: list[Day] = Field(description="Oldest first; the last one is today")


async def _day(store: SessionStore, start: datetime) -> Day:
    end = start + _DAY
    created, completed = await asyncio.gather(
        store.count_sessions(created_since=start, created_before=end),
        store.count_sessions(status="completed", updated_since=start, updated_before=end),
    )
    return Day(day=start.date(), created=created, completed=completed)


@router.get(
    "/ui/api/daily",
    response_model=Daily,
    responses=errors(*AUTH),
    summary="Sessions created and completed per day, for the admin page's chart",
)
async def daily(
    store: Tenant,
    days: Annotated[int, Query(ge=1, le=90, description="How many days, today included")] = 14,
    utc_offset: Annotated[
        int, Query(ge=-840, le=840, description="Minutes east of UTC of the days' time zone")
    ] = 0,
) -> Daily:
    """Two counts per day (indexed by creation and update time), never a listing: a
    session completed is one whose status is ``completed`` now, counted on the day of its
    last change (the store keeps no separate completion time)."""
    zone = timezone(timedelta(minutes=utc_offset))
    today = datetime.fromtimestamp(time.time(), zone).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    starts = [today - _DAY * back for back in range(days - 1, -1, -1)]
    found = await asyncio.gather(*(_day(store, start) for start in starts))
    return Daily(utc_offset=utc_offset, days=list(found))
