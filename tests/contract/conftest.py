"""The one contract suite runs against every engine, chosen by URL.

Engines that need a server carry the ``server`` marker and run against real servers: a
server that cannot be reached fails the tests, it never skips them. Each test gets a
namespace of its own (a temporary folder, a PostgreSQL schema, a Redis key prefix) that
is dropped afterwards. The next engine joins the whole suite by adding its URL to
ENGINE_URLS. Tests never branch on the engine.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from sessionkeeper import FrozenClock, SessionStore, Settings, SyncSessionStore, open_store
from sessionkeeper.sync import open_store_sync

from .namespaces import drop_namespace
from .redis_cluster import redis_cluster

__all__ = ["ENGINE_URLS", "SERVER_ENGINES", "SHARED_ENGINES", "redis_cluster"]

# name -> URL template: {tmp} a fresh folder, {ns} a fresh namespace name, {cluster} the
# address of the Redis Cluster the suite starts.
ENGINE_URLS: dict[str, str] = {
    "memory": "memory://",
    "files": "file://{tmp}/files",
    "sqlite": "sqlite:///{tmp}/store.db",
    "postgresql": "postgresql://127.0.0.1:5432/test?schema={ns}",
    "redis": "redis://127.0.0.1:6379/0?prefix={ns}:",
    "redis-cluster": "redis://{cluster}/0?cluster=true&prefix={ns}:",
}
SERVER_ENGINES: set[str] = {"postgresql", "redis", "redis-cluster"}
# Engines whose data other processes see and that keep it when the store is reopened.
# Tests use this as a capability ("run the writers as processes"), never as an engine name.
SHARED_ENGINES: set[str] = {"files", "sqlite", "postgresql", "redis", "redis-cluster"}


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
def url_factory(
    engine_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], str]]:
    """Makes URLs of this engine, each with a fresh namespace, all dropped at teardown."""
    template = ENGINE_URLS[engine_name]
    cluster = request.getfixturevalue("redis_cluster") if "{cluster}" in template else ""
    made: list[str] = []

    def make() -> str:
        namespace = f"sk_t_{secrets.token_hex(5)}"
        folder = tmp_path / namespace
        folder.mkdir()
        url = template.format(tmp=folder, ns=namespace, cluster=cluster)
        made.append(url)
        return url

    yield make
    for url in made:
        drop_namespace(url)


@pytest.fixture
def engine_url(url_factory: Callable[[], str]) -> str:
    return url_factory()


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
