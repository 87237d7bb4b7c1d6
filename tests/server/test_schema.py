"""schemathesis against the app's own OpenAPI schema: no server error, and no response that
breaks the schema (status code, content type, headers, body), on every operation."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from sessionkeeper import Settings, open_store
from sessionkeeper.keys import create_key
from sessionkeeper.server import create_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# The app is made here (no I/O until its first request opens the store) so that
# schemathesis can read its schema when tests are collected.
_FOLDER = Path(tempfile.mkdtemp(prefix="sessionkeeper-schema-"))
_URL = f"sqlite:///{_FOLDER / 'api.db'}"
app = create_app(settings=Settings(url=_URL, http_access_log=False))
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app  # calls go to the app in-process, as from_asgi would set up


async def _seed() -> str:
    async with open_store(_URL, settings=Settings(url=_URL)) as store:
        session = await store.create_session(owner="alice", title="seeded")
        await store.append_message(session.id, "user", "hello")
        await store.create_folder("work", owner="alice")
        return (await create_key(store, tenant="default", role="admin"))[1]


@pytest.fixture(scope="module")
def token() -> Iterator[str]:
    yield asyncio.run(_seed())
    shutil.rmtree(_FOLDER, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_operation_keeps_to_the_schema(case: Any, token: str) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)
