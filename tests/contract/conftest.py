"""The one contract suite runs against every engine, chosen by URL.

Engines that need a server carry the ``server`` marker; the next engine joins the whole
suite by adding its URL to ENGINE_URLS. Tests never branch on the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sessionkeeper import FrozenClock, SessionStore, Settings, SyncSessionStore, open_store
from sessionkeeper.sync import open_store_sync

# name -> URL template; {tmp} is a fresh temporary directory per test.
ENGINE_URLS: dict[str, str] = {
    "memory": "memory://",
    "sqlite": "sqlite:///{tmp}/store.db",
}
SERVER_ENGINES: set[str] = set()
# Engines whose data other processes see and that keeps it when the store is reopened.
# Tests use this as a capability ("run the writers as processes"), never as an engine name.
SHARED_ENGINES: set[str] = {"sqlite"}


def engine_params() -> list[object]:
    return [
        pytest.param(name, id=name, marks=[pytest.mark.server] if name in SERVER_ENGINES else [])
        for name in ENGINE_URLS
    ]


@pytest.fixture(params=engine_params())
def engine_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def engine_url(engine_name: str, tmp_path: Path) -> str:
    return ENGINE_URLS[engine_name].format(tmp=tmp_path)


@pytest.fixture
def shared_engine(engine_name: str) -> bool:
    """Whether several processes can open this URL and see one another's data."""
    return engine_name in SHARED_ENGINES


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def settings(engine_url: str) -> Settings:
    return Settings(url=engine_url)


@pytest.fixture
async def store(
    engine_url: str, settings: Settings, clock: FrozenClock
) -> AsyncIterator[SessionStore]:
    async with open_store(engine_url, settings=settings, clock=clock) as opened:
        yield opened


@pytest.fixture
def sync_store(
    engine_url: str, settings: Settings, clock: FrozenClock
) -> Iterator[SyncSessionStore]:
    with open_store_sync(engine_url, settings=settings, clock=clock) as opened:
        yield opened
