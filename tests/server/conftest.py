"""An app over a memory store, keys for two tenants and an admin, and clients of each."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


# --- a webhook receiver ----------------------------------------------------------------

SECRET = "whsec-test-3f9a"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1: answers each POST with the next of ``statuses``
    (200 when they run out) and keeps what it received."""

    url: str
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    delay: float = 0.0  # seconds each answer takes

    def events(self) -> list[str]:
        return [r.headers["x-sessionkeeper-event"] for r in self.received]

    def deliveries(self) -> list[str]:
        return [r.headers["x-sessionkeeper-delivery"] for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if state.delay:
                time.sleep(state.delay)
            with lock:
                state.received.append(
                    Received({k.lower(): v for k, v in self.headers.items()}, body)
                )
                status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
