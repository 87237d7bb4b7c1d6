"""An app that opens its own store also runs the sweeper over it; one given a store does not."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sessionkeeper import Settings, open_store
from sessionkeeper.server import create_app


def rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        count: int = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
        return count


async def seed(url: str) -> str:
    """One session that expires a moment later, and one kept; the id of the kept one."""
    async with open_store(url) as store:
        await store.create_session(ttl=0.001)
        kept = await store.create_session()
    await asyncio.sleep(0.01)  # real time: the app reads the system clock
    return kept.id


async def test_the_apps_own_store_is_swept_at_start(tmp_path: Path) -> None:
    db = tmp_path / "swept.db"
    url = f"sqlite:///{db}"
    kept = await seed(url)
    assert rows(db) == 2
    app = create_app(settings=Settings(url=url, http_access_log=False, sweep_interval=3600))
    async with app.router.lifespan_context(app):  # opens the store; a first pass at once
        for _ in range(1000):  # the pass runs on its own task: wait up to 10 s for it
            if rows(db) == 1:
                break
            await asyncio.sleep(0.01)
    assert rows(db) == 1
    async with open_store(url) as store:
        assert (await store.get_session(kept)).id == kept


async def test_no_sweeper_when_the_interval_is_zero(tmp_path: Path) -> None:
    db = tmp_path / "kept.db"
    url = f"sqlite:///{db}"
    await seed(url)
    app = create_app(settings=Settings(url=url, http_access_log=False, sweep_interval=0))
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.05)
    assert rows(db) == 2  # the expired one is absent to every call, but not purged
