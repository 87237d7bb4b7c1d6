"""An engine that stops answering gives 503 within the engine timeout, and the service
answers again when it is back."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from sessionkeeper import Settings, open_store
from sessionkeeper.keys import create_key
from sessionkeeper.server import create_app
from tests.test_redis_engine import Server

from .conftest import client_of

pytestmark = pytest.mark.server

TIMEOUT = 0.5


async def test_a_frozen_redis_is_503_within_the_timeout(tmp_path: Path) -> None:
    server = Server(tmp_path)
    settings = Settings(url=server.url(), server_timeout=TIMEOUT, http_access_log=False)
    try:
        async with open_store(settings=settings) as store:
            _, token = await create_key(store, tenant="alpha")
            app = create_app(store)
            async with client_of(app, token) as client, client_of(app) as anonymous:
                created = await client.post("/v1/sessions", json={})
                server.signal(signal.SIGSTOP)
                try:
                    for call in (
                        client.get(f"/v1/sessions/{created.json()['id']}"),
                        client.post("/v1/sessions", json={}),
                        anonymous.get("/healthz"),
                    ):
                        started = time.monotonic()
                        response = await call
                        assert response.status_code == 503, response.text
                        assert response.headers["content-type"] == "application/problem+json"
                        # the key check, then the call: each within the timeout
                        assert time.monotonic() - started < 2 * TIMEOUT + 1
                finally:
                    server.signal(signal.SIGCONT)
                assert (await anonymous.get("/healthz")).status_code == 200
                assert (await client.get(f"/v1/sessions/{created.json()['id']}")).is_success
    finally:
        server.stop()
