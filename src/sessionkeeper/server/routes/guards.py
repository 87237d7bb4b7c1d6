"""The guards of a tenant, for its app: rate limits, failed logins, budgets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import TypeAdapter

from ...models import BudgetUsage, LoginStatus, RateLimitResult
from ..auth import Tenant
from ..http import AUTH, BODY, errors, json_response, list_response, require_media_type
from ..limits import JSONRoute
from ..schemas import BudgetIn, HitIn, LoginIn, Removed

__all__ = ["router"]

router = APIRouter(prefix="/v1", route_class=JSONRoute, tags=["guards"])

_JSON = require_media_type("application/json")
_statuses = TypeAdapter(list[LoginStatus])
_WRITE = errors(*AUTH, *BODY)


@router.post(
    "/rate-limits/hit",
    response_model=RateLimitResult,
    dependencies=[_JSON],
    responses=_WRITE,
    summary="Count a hit on a sliding-window rate limit; says whether it was allowed",
)
async def hit(store: Tenant, body: HitIn) -> Response:
    return json_response(await store.hit(body.key, body.limit, body.window, cost=body.cost))


@router.post(
    "/logins/failed",
    response_model=LoginStatus,
    dependencies=[_JSON],
    responses=_WRITE,
    summary="Record a failed login of a client IP and/or an account",
)
async def login_failed(store: Tenant, body: LoginIn) -> Response:
    return json_response(await store.login_failed(ip=body.ip, account=body.account))


@router.post(
    "/logins/succeeded",
    status_code=204,
    response_class=Response,
    dependencies=[_JSON],
    responses=_WRITE,
    summary="Record a successful login: forget the failures of the IP and the account",
)
async def login_succeeded(store: Tenant, body: LoginIn) -> Response:
    await store.login_succeeded(ip=body.ip, account=body.account)
    return Response(status_code=204)


@router.post(
    "/logins/unlock",
    response_model=Removed,
    dependencies=[_JSON],
    responses=_WRITE,
    summary="Lift a lockout and forget the failures of an IP and/or an account",
)
async def unlock_login(store: Tenant, body: LoginIn) -> Removed:
    return Removed(removed=await store.unlock_login(ip=body.ip, account=body.account))


@router.get(
    "/logins/status",
    response_model=LoginStatus,
    responses=errors(*AUTH),
    summary="Whether a client IP or an account is locked out (the worse of the two)",
)
async def login_status(
    store: Tenant,
    ip: Annotated[str | None, Query(description="The client's address")] = None,
    account: str | None = None,
) -> Response:
    return json_response(await store.login_status(ip=ip, account=account))


@router.get(
    "/logins",
    response_model=list[LoginStatus],
    responses=errors(*AUTH),
    summary="Clients and accounts with failed logins on record, latest first",
)
async def list_logins(
    store: Tenant, locked_only: Annotated[bool, Query(description="Only locked ones")] = False
) -> Response:
    return list_response(_statuses, await store.list_logins(locked_only=locked_only))


@router.put(
    "/budgets",
    response_model=BudgetUsage,
    dependencies=[_JSON],
    responses=_WRITE,
    summary="Give an owner or a session a token and cost budget of its own",
)
async def set_budget(store: Tenant, body: BudgetIn) -> Response:
    usage = await store.set_budget(
        owner=body.owner,
        session_id=body.session_id,
        tokens=body.tokens,
        cost=body.cost,
        period=body.period,
    )
    return json_response(usage)


@router.get(
    "/budgets",
    response_model=BudgetUsage,
    responses=errors(*AUTH),
    summary="What an owner or a session used in the current period, and its limits",
)
async def budget_usage(
    store: Tenant,
    owner: Annotated[str | None, Query(description="Give an owner or a session_id")] = None,
    session_id: str | None = None,
) -> Response:
    return json_response(await store.budget_usage(owner=owner, session_id=session_id))
