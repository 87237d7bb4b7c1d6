"""For operators: ``/healthz`` and ``/metrics``, without a key."""

from __future__ import annotations

from contextlib import suppress

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from ...errors import NotFound
from ..auth import service
from ..http import errors

__all__ = ["router"]

router = APIRouter(tags=["operations"])

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class Health(BaseModel):
    status: str
    engine: str


@router.get(
    "/healthz",
    response_model=Health,
    responses=errors(503),
    summary="Whether the service can reach its storage engine",
)
async def healthz(request: Request) -> Health:
    store = service(request).server
    with suppress(NotFound):  # one read of the engine (BackendUnavailable becomes 503)
        await store.get_session("healthz")
    return Health(status="ok", engine=store.engine.name)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {_PROMETHEUS: {}}}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.exposition(), media_type=_PROMETHEUS)
