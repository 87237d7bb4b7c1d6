"""An app over a memory store, keys for two tenants and an admin, and clients of each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sessionkeeper import Settings, open_store
from sessionkeeper.keys import create_key
from sessionkeeper.server import create_app
from sessionkeeper.store import SessionStore


@dataclass
class Keys:
    alpha: str  # a tenant key of tenant "alpha"
    beta: str  # a tenant key of tenant "beta"
    admin: str  # an admin key bound to "alpha"


def settings(**overrides: Any) -> Settings:
    """Settings for a memory store; the access log is off unless asked for."""
    return Settings(**{"url": "memory://", "http_access_log": False, **overrides})


@pytest.fixture
async def store() -> AsyncIterator[SessionStore]:
    async with open_store("memory://", settings=settings()) as opened:
        yield opened


@pytest.fixture
async def keys(store: SessionStore) -> Keys:
    return Keys(
        alpha=(await create_key(store, tenant="alpha"))[1],
        beta=(await create_key(store, tenant="beta"))[1],
        admin=(await create_key(store, tenant="alpha", role="admin"))[1],
    )


@pytest.fixture
def app(store: SessionStore) -> FastAPI:
    return create_app(store)


async def app_with(store: SessionStore, **overrides: Any) -> FastAPI:
    """An app over the engine of ``store`` (so its keys and data), with some settings
    changed."""
    view = SessionStore(store.engine, tenant=store.tenant, settings=settings(**overrides))
    return create_app(await view.open())


def client_of(app: FastAPI, token: str | None = None) -> httpx.AsyncClient:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
    )


@pytest.fixture
async def alpha(app: FastAPI, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, keys.alpha) as client:
        yield client


@pytest.fixture
async def beta(app: FastAPI, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, keys.beta) as client:
        yield client


@pytest.fixture
async def admin(app: FastAPI, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, keys.admin) as client:
        yield client
