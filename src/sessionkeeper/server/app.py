"""The FastAPI app: ``create_app`` puts the routes, auth, errors and limits over one store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi

from ..errors import InvalidInput
from ..keys import SERVER_TENANT
from ..maintenance import Sweeper
from ..settings import Settings
from ..store import SessionStore, open_store
from .auth import Service
from .limits import BodyLimit
from .metrics import AccessLog, Metrics
from .problems import Problem, install
from .routes import admin, folders, guards, operations, ops, sessions
from .routes import webhooks as webhook_routes
from .webhooks import Webhooks

__all__ = ["create_app"]

DESCRIPTION = """\
Durable session storage for chat apps and AI agents, over HTTP.

Every `/v1` route needs an API key (`Authorization: Bearer sk_...`), bound to one tenant:
a tenant key sees only its tenant; an admin key may name another with `?tenant=`. Make keys
with `sessionkeeper keys create`. Errors are RFC 9457 problem details
(`application/problem+json`). A session's `ETag` is its version: send it back as
`If-Match` to write only if nobody else wrote since (412 otherwise).
"""


def create_app(
    store: SessionStore | None = None,
    *,
    settings: Settings | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The HTTP service over ``store``, or over a store opened from ``settings`` (default:
    the environment) for the app's lifespan.

    A store given here is used as it is: open it before the first request and close it
    yourself. ``routers`` are included after the API's own routes (the admin page adds
    itself this way); their routes can use ``auth.Key``, ``auth.Tenant`` and
    ``auth.AdminStore`` as dependencies.
    """
    if store is not None and settings is not None:
        raise InvalidInput("settings", "give a store or settings, not both")
    owned = store is None
    if store is None:
        store = open_store(settings=settings or Settings())
    settings = store.settings
    limit = settings.http_rate_limit
    if limit is not None and limit > settings.max_rate_limit:
        raise InvalidInput(
            "http_rate_limit", f"must be at most max_rate_limit ({settings.max_rate_limit})"
        )
    metrics = Metrics()
    service = Service(store, store.for_tenant(SERVER_TENANT), settings, metrics)
    # with webhook_url, the app sends its store's change events while it runs
    webhooks = Webhooks(store) if settings.webhook_url is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sending: AbstractAsyncContextManager[object] = webhooks or nullcontext()
        if owned:  # the app's own store: it also runs the sweeper (sweep_interval; 0 = off)
            async with store, Sweeper(store), sending:
                yield
        else:
            async with sending:
                yield

    app = FastAPI(
        title="sessionkeeper",
        description=DESCRIPTION,
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.webhooks = webhooks
    install(app)
    for router in (
        sessions.router,
        folders.router,
        guards.router,
        admin.router,
        operations.router,
        ops.router,
    ):
        app.include_router(router)
    app.include_router(webhook_routes.router)
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.http_max_body_bytes)
    app.add_middleware(
        AccessLog,
        metrics=metrics,
        trusted_proxies=settings.trusted_proxies,
        enabled=settings.http_access_log,
    )

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sessionkeeper")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"
