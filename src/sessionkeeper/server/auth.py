"""Who is calling, and which tenant's store a request gets.

Every ``/v1`` route depends on ``api_key`` (directly or through ``tenant_store``):

1. a client IP locked out by failed authentications gets 429 with ``Retry-After``, before
   its key is looked at;
2. no key, or a wrong, unknown or revoked one, gets 401, and a wrong one counts as a
   failed login of the client IP (``store.login_failed``, in the ``_server`` tenant);
3. with ``http_rate_limit`` set, each key gets that many requests per sliding minute.

``tenant_store`` then gives the store of the key's tenant; an admin key may name another
with ``?tenant=``. A tenant key never reaches another tenant: naming one is 403, and another
tenant's session is simply not in its store (404, as if it did not exist).

Each server keeps what it read of keys and of clients' lockouts for
``http_auth_cache_seconds`` (1 s by default), so a busy key costs no read per request: a
key revoked, or a client locked by another server, is refused by this one within that
time. A lockout this server records applies here at once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import keys, rules
from ..keys import ApiKey
from ..settings import Settings
from ..store import SessionStore
from .metrics import Metrics, client_ip
from .problems import ProblemError

__all__ = ["AdminStore", "Key", "Service", "Tenant", "api_key", "service", "tenant_store"]

_bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="sk_<key id>_<secret>",
    description="An API key from `sessionkeeper keys create` (or the one `serve` printed)",
)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sessionkeeper"'}


_MAX_CACHED = 10_000  # entries per cache; past that it starts again empty


class AuthCache:
    """Key checks and client lockout statuses read recently, each kept ``ttl`` seconds."""

    __slots__ = ("clients", "keys", "ttl")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        # sha256(token) -> (read at, key); the token itself is never kept
        self.keys: dict[bytes, tuple[float, ApiKey]] = {}
        # client ip -> (read at, locked until, both on the monotonic clock)
        self.clients: dict[str, tuple[float, float]] = {}

    def key(self, digest: bytes, now: float) -> ApiKey | None:
        found = self.keys.get(digest)
        return found[1] if found is not None and now - found[0] < self.ttl else None

    def put_key(self, digest: bytes, key: ApiKey, now: float) -> None:
        if self.ttl:
            if len(self.keys) >= _MAX_CACHED:
                self.keys.clear()
            self.keys[digest] = (now, key)

    def locked_for(self, ip: str, now: float) -> float | None:
        """Seconds the client is still locked (0: not locked), or None if not known."""
        found = self.clients.get(ip)
        if found is None or now - found[0] >= self.ttl:
            return None
        return max(found[1] - now, 0.0)

    def put_client(self, ip: str, retry_after: float, now: float) -> None:
        if self.ttl:
            if len(self.clients) >= _MAX_CACHED:
                self.clients.clear()
            self.clients[ip] = (now, now + retry_after)


@dataclass(slots=True)
class Service:
    """What every request shares: the store (for the default tenant), the store of the
    service's own records, the settings, the metrics and the auth cache."""

    store: SessionStore
    server: SessionStore
    settings: Settings
    metrics: Metrics
    cache: AuthCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = AuthCache(self.settings.http_auth_cache_seconds)


def service(request: Request) -> Service:
    found: Service = request.app.state.service
    return found


async def api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> ApiKey:
    """The caller's active API key; 429 for a locked-out client, 401 without a good key."""
    svc = service(request)
    cache = svc.cache
    ip = client_ip(request.scope, svc.settings.trusted_proxies)
    now = time.monotonic()
    locked_for = cache.locked_for(ip, now)
    if locked_for is None:
        status = await svc.server.login_status(ip=ip)
        locked_for = status.retry_after if status.locked else 0.0
        cache.put_client(ip, locked_for, now)
    if locked_for:
        raise _locked_out(ip, locked_for)
    if credentials is None:
        raise ProblemError(401, "send an API key: Authorization: Bearer sk_...", headers=_CHALLENGE)
    digest = hashlib.sha256(credentials.credentials.encode()).digest()
    key = cache.key(digest, now)
    if key is None:
        key = await keys.authenticate(svc.store, credentials.credentials)
        if key is None:
            status = await svc.server.login_failed(ip=ip)
            if status.locked:
                cache.put_client(ip, status.retry_after, now)
            raise ProblemError(401, "the API key is wrong, unknown or revoked", headers=_CHALLENGE)
        cache.put_key(digest, key, now)
    request.state.key_id = key.id
    limit = svc.settings.http_rate_limit
    if limit is not None:
        result = await svc.server.hit(f"apikey:{key.id}", limit, 60.0)
        if not result.allowed:
            raise ProblemError(
                429,
                f"this key may make {limit} requests per minute; retry after "
                f"{result.retry_after:.1f} s",
                kind="rate-limited",
                retry_after=result.retry_after,
            )
    return key


def _locked_out(ip: str, retry_after: float) -> ProblemError:
    return ProblemError(
        429,
        f"too many failed authentications from {ip}; retry after {retry_after:.0f} s",
        kind="locked-out",
        retry_after=retry_after,
    )


Key = Annotated[ApiKey, Depends(api_key)]


async def tenant_store(
    request: Request,
    key: Key,
    tenant: Annotated[
        str | None,
        Query(
            description="Admin keys only: the tenant to act on (default: the key's own)",
            max_length=128,
        ),
    ] = None,
) -> SessionStore:
    """The store of the key's tenant, or for an admin key of the ``tenant`` it names."""
    chosen = key.tenant
    if tenant is not None and tenant != key.tenant:
        if key.role != "admin":
            raise ProblemError(403, "a tenant key acts only in its own tenant")
        chosen = rules.check_id(tenant, "tenant")
    request.state.tenant = chosen
    return service(request).store.for_tenant(chosen)


Tenant = Annotated[SessionStore, Depends(tenant_store)]


async def admin_store(store: Tenant, key: Key) -> SessionStore:
    """``tenant_store``, for admin keys only (403 for others)."""
    if key.role != "admin":
        raise ProblemError(403, "this route needs an admin key")
    return store


AdminStore = Annotated[SessionStore, Depends(admin_store)]
