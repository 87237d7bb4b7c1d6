"""The webhook delivery log, for admin keys: list deliveries, send one again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel

from ...store import SessionStore
from .. import webhooks
from ..auth import Key, service
from ..http import AUTH, READ, errors
from ..limits import JSONRoute
from ..problems import ProblemError
from ..webhooks import Delivery, DeliveryStatus

__all__ = ["router"]

router = APIRouter(prefix="/v1/admin/webhooks", route_class=JSONRoute, tags=["admin"])


class Deliveries(BaseModel):
    deliveries: list[Delivery]


async def _server_store(request: Request, key: Key) -> SessionStore:
    """The store of the service's own records, for admin keys only (403 for others)."""
    if key.role != "admin":
        raise ProblemError(403, "this route needs an admin key")
    return service(request).server


ServerStore = Annotated[SessionStore, Depends(_server_store)]


@router.get(
    "/deliveries",
    response_model=Deliveries,
    responses=errors(*AUTH),
    summary="Webhook deliveries, newest first, with every attempt",
)
async def deliveries(
    store: ServerStore,
    status: Annotated[DeliveryStatus | None, Query(description="Only those of this status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many")] = 100,
) -> Deliveries:
    return Deliveries(deliveries=await webhooks.list_deliveries(store, status=status, limit=limit))


@router.post(
    "/deliveries/{delivery_id}/redeliver",
    response_model=Delivery,
    responses=errors(*READ),
    summary="Send a delivered or failed delivery again (same id and body)",
)
async def redeliver(
    store: ServerStore,
    delivery_id: Annotated[str, Path(description="The delivery id", max_length=64)],
) -> Delivery:
    return await webhooks.redeliver(store, delivery_id)
