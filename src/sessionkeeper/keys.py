"""API keys of the HTTP service: created, listed, revoked and checked through a store.

A key is shown once, as a token ``sk_<key id>_<secret>``: 16 hex digits of id, then 256
random bits from ``secrets``. The store keeps only the SHA-256 of the token (a fast hash is
right for random secrets: there is nothing to guess), compared with
``hmac.compare_digest``. Each key is bound to one tenant and has a role: ``tenant`` (that
tenant only) or ``admin`` (any tenant, and the admin-only calls).

Keys are guards of the reserved tenant ``_server`` (``apikey:<key id>`` -> JSON), in the
same engine as the sessions, so every server in front of one store sees the same keys and
checking one is one read. The HTTP service keeps its own failed-authentication lockouts
and per-key rate limits in that tenant too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from . import rules
from .errors import AlreadyExists, InvalidInput, NotFound
from .store import SessionStore

__all__ = [
    "ROLES",
    "SERVER_TENANT",
    "ApiKey",
    "Role",
    "authenticate",
    "bootstrap_admin",
    "create_key",
    "list_keys",
    "revoke_key",
]

Role = Literal["tenant", "admin"]
ROLES: tuple[str, ...] = ("tenant", "admin")
#: The tenant that holds the service's own records: keys, auth lockouts, key rate limits.
SERVER_TENANT = "_server"

_KEY = "apikey:"
_BOOTSTRAP = "apikey-bootstrap"
_TOKEN = re.compile(r"sk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})", re.ASCII)
_MAX_NAME = 200


class ApiKey(BaseModel):
    """An API key as listed: never its secret, which is shown only when it is created."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="The key id: the part of the token after sk_")
    tenant: str = Field(description="The tenant the key is bound to")
    role: Role
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _key_of(key_id: str, value: str) -> ApiKey:
    record = orjson.loads(value)
    return ApiKey(
        id=key_id,
        tenant=record["tenant"],
        role=record["role"],
        name=record["name"],
        created_at=datetime.fromtimestamp(record["created_at"], UTC),
        revoked_at=_utc(record["revoked_at"]),
    )


def _check_tenant(tenant: object) -> str:
    checked = rules.check_id(tenant, "tenant")
    if checked == SERVER_TENANT:
        raise InvalidInput("tenant", f"{SERVER_TENANT!r} is reserved for the service itself")
    return checked


async def create_key(
    store: SessionStore, *, tenant: str, role: str = "tenant", name: str = ""
) -> tuple[ApiKey, str]:
    """Make a key for ``tenant`` with ``role``; returns it and its token, which is shown
    this once and stored only as a hash."""
    checked_tenant = _check_tenant(tenant)
    if role not in ROLES:
        raise InvalidInput("role", f"must be one of {', '.join(ROLES)}, not {role!r}")
    if not isinstance(name, str) or len(name) > _MAX_NAME or not name.isprintable():
        raise InvalidInput("name", f"must be at most {_MAX_NAME} printable characters")
    key_id = secrets.token_hex(8)
    token = f"sk_{key_id}_{secrets.token_urlsafe(32)}"
    now = store.clock.now()
    record = {
        "tenant": checked_tenant,
        "role": role,
        "name": name,
        "hash": _hash(token),
        "created_at": now,
        "revoked_at": None,
    }
    text = orjson.dumps(record).decode()

    def insert(value: str | None) -> tuple[str | None, None, bool]:
        return (value, None, False) if value is not None else (text, None, True)

    if not await store.engine.update_guard(SERVER_TENANT, _KEY + key_id, insert, now):
        raise AlreadyExists(f"key id {key_id!r} is taken; try again")
    return _key_of(key_id, text), token


async def list_keys(store: SessionStore, *, tenant: str | None = None) -> list[ApiKey]:
    """Every key (of ``tenant``, if given), revoked ones too, oldest first."""
    wanted = None if tenant is None else rules.check_id(tenant, "tenant")
    guards = await store.engine.list_guards(SERVER_TENANT, _KEY, store.clock.now())
    keys = [_key_of(g.key.removeprefix(_KEY), g.value) for g in guards]
    keys = [k for k in keys if wanted is None or k.tenant == wanted]
    return sorted(keys, key=lambda k: (k.created_at, k.id))


async def revoke_key(store: SessionStore, key_id: str) -> ApiKey:
    """Revoke a key: every server refuses it within ``http_auth_cache_seconds``. Revoking
    twice keeps the first time. Raises NotFound."""
    if not isinstance(key_id, str) or re.fullmatch(r"[0-9a-f]{16}", key_id) is None:
        raise InvalidInput("key_id", "must be the 16 hex digits after sk_ in the token")
    now = store.clock.now()

    def revoke(value: str | None) -> tuple[str | None, None, str | None]:
        if value is None:
            return None, None, None
        record: dict[str, Any] = orjson.loads(value)
        if record["revoked_at"] is None:
            record["revoked_at"] = now
        text = orjson.dumps(record).decode()
        return text, None, text

    text = await store.engine.update_guard(SERVER_TENANT, _KEY + key_id, revoke, now)
    if text is None:
        raise NotFound(f"no key {key_id!r}")
    return _key_of(key_id, text)


async def authenticate(store: SessionStore, token: str) -> ApiKey | None:
    """The active key whose token this is, or None (malformed, unknown, revoked or wrong
    secret: the caller cannot tell which)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    key_id = match.group(1)
    value = await store.engine.get_guard(SERVER_TENANT, _KEY + key_id, store.clock.now())
    if value is None:
        return None
    record = orjson.loads(value)
    if not hmac.compare_digest(record["hash"], _hash(token)) or record["revoked_at"] is not None:
        return None
    return _key_of(key_id, value)


async def bootstrap_admin(store: SessionStore, *, tenant: str | None = None) -> str | None:
    """On a new store (no key was ever made), make an admin key for ``tenant`` (default:
    the store's) and return its token; else None. Only one caller ever gets a token, also
    when several servers start at once on a new store."""
    now = store.clock.now()

    def claim(value: str | None) -> tuple[str, None, bool]:
        return (value or orjson.dumps({"at": now}).decode()), None, value is None

    if not await store.engine.update_guard(SERVER_TENANT, _BOOTSTRAP, claim, now):
        return None
    if await list_keys(store):  # made with `keys create` before the first serve
        return None
    _, token = await create_key(store, tenant=tenant or store.tenant, role="admin", name="first")
    return token
