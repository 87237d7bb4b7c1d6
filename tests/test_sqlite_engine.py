"""SQLite-only facts: query plans on indexes, the schema version, and no reuse after fork."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from sessionkeeper import BackendUnavailable, FrozenClock, SessionStore, checks, open_store
from sessionkeeper.engines.sqlite import SCHEMA_VERSION, list_sql
from sessionkeeper.models import SessionQuery

QUERIES = {
    "all by created": SessionQuery(),
    "all by updated": SessionQuery(order_by="updated_at"),
    "owner": SessionQuery(owner="o1", owner_set=True),
    "owner by updated, after a cursor": SessionQuery(
        owner="o1", owner_set=True, order_by="updated_at", after_key=1.0, after_id="x"
    ),
    "no owner": SessionQuery(owner=None, owner_set=True),
    "folder": SessionQuery(folder="f", folder_set=True),
    "status": SessionQuery(status="completed"),
    "created range and title": SessionQuery(created_since=1.0, title_contains="x"),
}


@pytest.fixture
async def filled(tmp_path: Path) -> Path:
    path = tmp_path / "plan.db"
    async with open_store(f"sqlite:///{path}") as store:
        for i in range(200):
            await store.create_session(owner=f"o{i % 7}", title=f"t{i}")
    return path


@pytest.mark.parametrize("name", list(QUERIES))
def test_listing_runs_on_an_index_without_a_sort(filled: Path, name: str) -> None:
    sql, params = list_sql("default", QUERIES[name], 0.0)
    with sqlite3.connect(filled) as conn:
        conn.execute("ANALYZE")
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
    assert "SCAN" not in plan, plan


def test_listing_does_not_read_state_or_messages(filled: Path) -> None:
    sql, _ = list_sql("default", SessionQuery(), 0.0)
    assert "states" not in sql
    assert "messages" not in sql


async def test_schema_is_versioned_and_created_idempotently(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    for _ in range(2):
        async with open_store(url) as store:
            await store.create_session()
    with sqlite3.connect(tmp_path / "v.db") as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert mode == "wal"
    async with open_store(url) as store:
        assert await store.count_sessions() == 2


async def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    async with open_store(url):
        pass
    with sqlite3.connect(tmp_path / "new.db") as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(BackendUnavailable, match="upgrade sessionkeeper"):
        async with open_store(url):
            pass


async def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="does not exist"):
        async with open_store(f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}"):
            pass


def _use_after_fork(store: SessionStore, queue: multiprocessing.Queue[str]) -> None:
    import asyncio

    try:
        asyncio.run(store.count_sessions())
    except BackendUnavailable as exc:
        queue.put(str(exc))
    else:
        queue.put("used the parent's store")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_a_store_is_never_reused_across_fork(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    async with open_store(f"sqlite:///{tmp_path / 'f.db'}") as store:
        queue: multiprocessing.Queue[str] = context.Queue()
        child = context.Process(target=_use_after_fork, args=(store, queue))
        child.start()
        child.join(30)
        assert "before fork" in queue.get(timeout=5)
        assert await store.count_sessions() == 0


def _old_database(path: Path, version: int) -> None:
    """A database as the release of schema ``version`` left it, with sessions of two owners
    and none, three statuses, messages and one expired session not purged yet."""
    from sessionkeeper.engines.sqlite import _MIGRATIONS

    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("BEGIN")
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        for number in range(1, version + 1):
            for statement in _MIGRATIONS[number]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (number,))
        for i, (owner, status, expires_at) in enumerate(
            [
                ("ann", "active", None),
                ("ann", "completed", None),
                ("bob", "active", 5000.0),
                (None, "archived", None),
                ("bob", "active", 50.0),  # expired at 100
            ]
        ):
            conn.execute(
                "INSERT INTO sessions (tenant, id, owner, folder, title, status, step, "
                "metadata, version, created_at, updated_at, expires_at, idle_ttl, deadline, "
                "message_count, last_seq, input_tokens, output_tokens, cost) VALUES "
                "('default', ?, ?, NULL, 't', ?, NULL, '{}', 1, 10, 20, ?, NULL, NULL, ?, ?, ?, "
                "?, ?)",
                (f"s{i}", owner, status, expires_at, i, i, 10 * i, i, 0.25 * i),
            )
        conn.execute("INSERT INTO states SELECT pk, '{}' FROM sessions")
        conn.execute("COMMIT")


async def test_an_older_schema_gets_its_stats_totals_from_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_database(path, 2)
    async with open_store(f"sqlite:///{path}", clock=FrozenClock(100.0)) as store:
        stats = await store.stats()
        await store.append_message("s0", "user", "after", input_tokens=1, cost=0.5)
        after = await store.stats()
    with sqlite3.connect(path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
        totals = conn.execute(
            "SELECT owner_key, status, sessions, messages, input_tokens, cost FROM totals "
            "ORDER BY 1, 2"
        ).fetchall()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert (stats.total, stats.active, stats.completed, stats.archived) == (4, 2, 1, 1)
    assert (stats.messages, stats.input_tokens, stats.output_tokens) == (6, 60, 6)
    assert stats.cost == 1.5
    assert [(o.owner, o.sessions) for o in stats.top_owners] == [("ann", 2), (None, 1), ("bob", 1)]
    assert [(o.owner, o.cost) for o in stats.top_owners_by_cost] == [
        (None, 0.75),
        ("bob", 0.5),
        ("ann", 0.25),
    ]
    assert (after.messages, after.input_tokens, after.cost) == (7, 61, 2.0)
    # the expired session is still counted in the totals, until purge removes it
    assert totals == [
        ("", "archived", 1, 3, 30, 0.75),
        ("ann", "active", 1, 1, 1, 0.5),
        ("ann", "completed", 1, 1, 10, 0.25),
        ("bob", "active", 2, 6, 60, 1.5),
    ]


async def test_doctor_finds_the_totals_triggers_or_table_missing(tmp_path: Path) -> None:
    path = tmp_path / "doctor.db"
    url = f"sqlite:///{path}"
    async with open_store(url) as store:
        assert (await checks.doctor(store)).ok
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER totals_count")
    async with open_store(url) as store:
        warnings = (await checks.doctor(store)).report.warnings
    assert len(warnings) == 1
    assert "totals_count" in warnings[0]
    assert "check --repair" in warnings[0]
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE totals")
    async with open_store(url) as store:
        warnings = (await checks.doctor(store)).report.warnings
    assert ["table totals is missing" in warning for warning in warnings] == [True]
