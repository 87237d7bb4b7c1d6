"""Folders and statistics: ``/v1/folders``, ``/v1/stats``, ``/v1/analytics``."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import TypeAdapter

from ...analytics import Analytics, Grouping
from ...errors import InvalidInput
from ...models import UNSET, Folder, Stats, Unset
from ..auth import Tenant
from ..http import BODY, READ, WRITE, errors, json_response, list_response, require_media_type
from ..limits import JSONRoute
from ..schemas import FolderDeleted, FolderIn, FolderRename

__all__ = ["router"]

router = APIRouter(prefix="/v1", route_class=JSONRoute, tags=["folders"])

_JSON = require_media_type("application/json")
_folders = TypeAdapter(list[Folder])
FolderId = Annotated[str, Path(description="The folder id", max_length=128)]


@router.post(
    "/folders",
    status_code=201,
    response_model=Folder,
    dependencies=[_JSON],
    responses=errors(*READ, *BODY, 409),
    summary="Create a folder (names are unique per owner)",
)
async def create_folder(store: Tenant, body: FolderIn) -> Response:
    return json_response(await store.create_folder(body.name, owner=body.owner), 201)


@router.get(
    "/folders",
    response_model=list[Folder],
    responses=errors(*READ),
    summary="List folders by name, with their session counts",
)
async def list_folders(
    store: Tenant, owner: Annotated[str | None, Query(description="Folders of this owner")] = None
) -> Response:
    found = await store.list_folders(owner=UNSET if owner is None else owner)
    return list_response(_folders, found)


@router.get(
    "/folders/{folder_id}",
    response_model=Folder,
    responses=errors(*READ),
    summary="Get a folder",
)
async def get_folder(store: Tenant, folder_id: FolderId) -> Response:
    return json_response(await store.get_folder(folder_id))


@router.patch(
    "/folders/{folder_id}",
    response_model=Folder,
    dependencies=[_JSON],
    responses=errors(*WRITE),
    summary="Rename a folder",
)
async def rename_folder(store: Tenant, folder_id: FolderId, body: FolderRename) -> Response:
    return json_response(await store.rename_folder(folder_id, body.name))


@router.delete(
    "/folders/{folder_id}",
    response_model=FolderDeleted,
    responses=errors(*READ),
    summary="Delete a folder; its sessions move, are deleted, or are left in no folder",
)
async def delete_folder(
    store: Tenant,
    folder_id: FolderId,
    reassign_to: Annotated[str | None, Query(description="Move the sessions here")] = None,
    cascade: Annotated[bool, Query(description="Delete the sessions too")] = False,
) -> FolderDeleted:
    count = await store.delete_folder(folder_id, reassign_to=reassign_to, cascade=cascade)
    return FolderDeleted(sessions=count)


@router.get(
    "/stats",
    response_model=Stats,
    responses=errors(*READ),
    tags=["stats"],
    summary="Totals, status counts, recent activity, completion rate, tokens, cost, top owners",
)
async def stats(
    store: Tenant,
    top: Annotated[int, Query(ge=0, le=100)] = 5,
    active_hours: Annotated[
        float, Query(gt=0, le=8_784, description="The window of recently_active, in hours")
    ] = 24.0,
) -> Response:
    return json_response(await store.stats(top=top, active_hours=active_hours))


@router.get(
    "/analytics",
    response_model=Analytics,
    responses=errors(*READ),
    tags=["stats"],
    summary="Sessions created and completed, messages, tokens and cost per day, week or "
    "month, with the owners that cost most in each",
)
async def analytics(
    store: Tenant,
    days: Annotated[int, Query(ge=1, le=3_660, description="How many UTC days")] = 30,
    until: Annotated[date | None, Query(description="The last day (default: today, UTC)")] = None,
    group_by: Annotated[Grouping, Query(description="The period of each point")] = "day",
    owner: Annotated[str | None, Query(description="Only this owner's figures")] = None,
    no_owner: Annotated[
        bool, Query(description="Only the figures of sessions without an owner")
    ] = False,
    top: Annotated[int, Query(ge=0, le=1_000, description="Owners by cost per period")] = 10,
) -> Response:
    """Figures are history, read from daily counters (one row per day and owner), never
    from the sessions: a session deleted since still counts where it was counted."""
    if owner is not None and no_owner:
        raise InvalidInput("no_owner", "give either owner or no_owner, not both")
    who: str | Unset | None = None if no_owner else UNSET if owner is None else owner
    found = await store.analytics(days=days, until=until, group_by=group_by, owner=who, top=top)
    return json_response(found)
