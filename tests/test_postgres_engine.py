"""PostgreSQL-only facts: plans on indexes, migrations, URL options, durability warnings,
row locks under concurrency, and failing fast (then recovering) when the server is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import asyncpg
import pytest

from sessionkeeper import (
    AlreadyExists,
    BackendUnavailable,
    FrozenClock,
    InvalidInput,
    Message,
    NotFound,
    SessionStore,
    Settings,
    VersionConflict,
    checks,
    open_store,
)
from sessionkeeper.engines.postgres import (
    DEFAULT_SCHEMA,
    SCHEMA_VERSION,
    PostgresEngine,
    list_sql,
    migrate,
)
from sessionkeeper.engines.urls import engine_from_url
from sessionkeeper.models import SessionQuery
from tests.contract.namespaces import drop_namespace

pytestmark = pytest.mark.server

SERVER = "postgresql://127.0.0.1:5432/test"


def fresh_schema() -> str:
    return f"sk_t_{secrets.token_hex(5)}"


@pytest.fixture
def schema() -> Iterator[str]:
    name = fresh_schema()
    yield name
    drop_namespace(f"{SERVER}?schema={name}")


@pytest.fixture
def url(schema: str) -> str:
    return f"{SERVER}?schema={schema}"


def store_at(url: str, clock: FrozenClock | None = None, **settings: Any) -> SessionStore:
    return open_store(url, settings=Settings(url=url, **settings), clock=clock)


@pytest.fixture
async def raw() -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A plain connection of the test's own, beside the store's pool."""
    conn = await asyncpg.connect(SERVER)
    try:
        yield conn
    finally:
        await conn.close()


async def wait_for_lock_wait(raw: asyncpg.Connection[asyncpg.Record], app: str) -> None:
    """Until a backend of the store named ``app`` is waiting for a lock."""
    for _ in range(500):
        waiting = await raw.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = $1 AND wait_event_type = 'Lock'",
            app,
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the store never waited for the lock")


# --- query plans -----------------------------------------------------------------------

QUERIES = {
    "all by created": (SessionQuery(), "sessions_by_created"),
    "all by created, oldest first": (SessionQuery(descending=False), "sessions_by_created"),
    "all by updated": (SessionQuery(order_by="updated_at"), "activity_by_updated"),
    "owner": (SessionQuery(owner="o1", owner_set=True), "sessions_by_owner_created"),
    "owner by updated, after a cursor": (
        SessionQuery(
            owner="o1", owner_set=True, order_by="updated_at", after_key=1e12, after_id="x"
        ),
        "activity_by_owner_updated",
    ),
    "no owner by updated, oldest first": (
        SessionQuery(owner=None, owner_set=True, order_by="updated_at", descending=False),
        "activity_by_owner_updated",
    ),
    "no owner": (SessionQuery(owner=None, owner_set=True), "sessions_by_owner_created"),
    "folder": (SessionQuery(folder="f", folder_set=True), "sessions_by_folder"),
    "no folder, oldest first": (
        SessionQuery(folder=None, folder_set=True, descending=False),
        "sessions_by_folder",
    ),
    "status": (SessionQuery(status="completed"), "sessions_by_status"),
    "created range and title": (
        SessionQuery(created_since=1.0, title_contains="x"),
        "sessions_by_created",
    ),
}


@pytest.fixture(scope="module")
def filled() -> Iterator[str]:
    """A schema with 200 sessions of 6 owners and none, analysed."""
    name = fresh_schema()
    url = f"{SERVER}?schema={name}"

    async def fill() -> None:
        async with store_at(url) as store:
            for i in range(200):
                await store.create_session(owner=f"o{i % 7}" if i % 7 else None, title=f"t{i}")
        conn = await asyncpg.connect(SERVER)
        await conn.execute(f'ANALYZE "{name}".sessions, "{name}".activity')
        await conn.close()

    asyncio.run(fill())
    yield name
    drop_namespace(url)


async def plan_of(sql: str, params: list[Any]) -> str:
    """The plan PostgreSQL picks when any index at all beats a scan and a sort."""
    conn = await asyncpg.connect(SERVER)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off")
            rows = await conn.fetch(f"EXPLAIN {sql}", *params)
    finally:
        await conn.close()
    return "\n".join(row[0] for row in rows)


@pytest.mark.parametrize("name", list(QUERIES))
def test_listing_runs_on_its_index_without_a_sort(filled: str, name: str) -> None:
    query, index = QUERIES[name]
    sql, params = list_sql(filled, "default", query, 0.0)
    plan = asyncio.run(plan_of(sql, params))
    assert f"Index Scan Backward using {index} " in plan or f"Index Scan using {index} " in plan, (
        plan
    )
    assert "Sort" not in plan, plan
    assert "Seq Scan" not in plan, plan


BATCH_ARGS: dict[str, list[Any]] = {
    "append_batch": [
        ["default"] * 2,
        ["a", "b"],
        [1.0, 1.0],
        [1, 1],
        [0, 0],
        [0, 0],
        [0.0, 0.0],
        [None, None],
        [1, 2],
        [1, 1],
        ["user", "user"],
        ['"x"', '"y"'],
        [0, 0],
        [0, 0],
        [0.0, 0.0],
        ["{}", "{}"],
    ],
    "read_last_batch": [["default"] * 2, ["a", "b"], [1.0, 1.0], [10, 10]],
    "read_after_batch": [["default"] * 2, ["a", "b"], [1.0, 1.0], [10, 10], [0, 5]],
}


@pytest.mark.parametrize("name", list(BATCH_ARGS))
async def test_batched_statements_find_every_row_on_an_index(filled: str, name: str) -> None:
    """The plan each connection keeps for a batch (a generic one) can reach the sessions
    and messages of its jobs on indexes (as plan_of: when any index beats a scan)."""
    engine = PostgresEngine(f"{SERVER}?schema={filled}", Settings())
    sql = engine._sql[name]
    conn = await asyncpg.connect(SERVER)
    try:
        async with conn.transaction():
            await conn.execute(
                "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off"
            )
            await conn.execute(f"PREPARE batch AS {sql}")
            args = ", ".join(_literal(value) for value in BATCH_ARGS[name])
            plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE batch({args})"))
    finally:
        await conn.close()
    assert "Seq Scan" not in plan, plan
    assert "Index Scan using sessions_by_id" in plan, plan


def _literal(values: list[Any]) -> str:
    """A SQL array literal for EXPLAIN EXECUTE, typed by its first value."""
    kind = {str: "text", int: "bigint", float: "float8"}.get(type(values[0]), "bigint")
    items = ", ".join(
        "NULL" if v is None else "'" + v.replace("'", "''") + "'" if isinstance(v, str) else repr(v)
        for v in values
    )
    return f"ARRAY[{items}]::{kind}[]"


def test_listing_reads_neither_state_nor_messages() -> None:
    sql, _ = list_sql("x", "default", SessionQuery(), 0.0)
    assert "states" not in sql
    assert "messages" not in sql


async def test_text_columns_sort_by_code_point(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Every compared or sorted text column is COLLATE "C", whatever the database locale,
    so ties and folder names order as on the other engines."""
    async with store_at(url):
        pass
    other = await raw.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name IN ('sessions', 'activity', 'folders') "
        "AND data_type = 'text' AND collation_name IS DISTINCT FROM 'C'",
        schema,
    )
    assert other == []


async def test_title_search_folds_ascii_letters_only(url: str) -> None:
    async with store_at(url) as store:
        await store.create_session(title="ÉCOLE Trip")
        assert await store.count_sessions(title_contains="trip") == 1
        assert await store.count_sessions(title_contains="École") == 1
        assert await store.count_sessions(title_contains="école") == 0


# --- migrations ------------------------------------------------------------------------


async def versions(raw: asyncpg.Connection[asyncpg.Record], schema: str) -> list[int]:
    rows = await raw.fetch(f'SELECT version FROM "{schema}".schema_version ORDER BY version')
    return [row[0] for row in rows]


async def test_schema_is_versioned_and_created_once(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    for _ in range(2):
        async with store_at(url) as store:
            await store.create_session()
    assert await versions(raw, schema) == list(range(1, SCHEMA_VERSION + 1))
    async with store_at(url) as store:
        assert await store.count_sessions() == 2


async def test_first_opens_from_many_connections_at_once_take_turns(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    stores = [store_at(url) for _ in range(8)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        await asyncio.gather(*(store.create_session() for store in stores))
        assert await stores[0].count_sessions() == 8
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    assert await versions(raw, schema) == list(range(1, SCHEMA_VERSION + 1))


async def test_a_newer_schema_is_refused_with_the_fix(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with store_at(url):
        pass
    await raw.execute(f'INSERT INTO "{schema}".schema_version VALUES ($1, 0)', SCHEMA_VERSION + 1)
    with pytest.raises(BackendUnavailable, match="upgrade sessionkeeper"):
        async with store_at(url):
            pass


async def test_an_older_schema_is_upgraded_in_place_with_its_data(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A database made by the first release, with data it wrote, opened by this one."""
    async with asyncpg.create_pool(SERVER, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        await migrate(conn, schema, target=1)
    s = f'"{schema}"'
    await raw.execute(f"INSERT INTO {s}.folders VALUES ('default', 'f1', 'ann', 'Work', 10)")
    pk = await raw.fetchval(
        f"INSERT INTO {s}.sessions (tenant, id, owner, folder, title, status, step, metadata, "
        "version, created_at, updated_at, expires_at, idle_ttl, deadline, message_count, "
        "last_seq, input_tokens, output_tokens, cost) VALUES ('default', 'old', 'ann', 'f1', "
        "'Before', 'active', NULL, '{\"k\": 1}', 3, 10, 20, NULL, NULL, NULL, 2, 2, 5, 7, 0.5) "
        "RETURNING pk"
    )
    await raw.execute(f"INSERT INTO {s}.states VALUES ($1, '{{\"draft\": [1, 2]}}')", pk)
    await raw.execute(
        f"INSERT INTO {s}.messages VALUES ($1, 1, 'user', '\"hi\"', 5, 0, 0.5, '{{}}', 15), "
        "($1, 2, 'assistant', '{\"text\": \"yo\"}', 0, 7, 0, '{}', 20)",
        pk,
    )
    assert await versions(raw, schema) == [1]

    async with store_at(url, FrozenClock(100.0)) as store:
        old = await store.get_session("old")
        assert (old.state, old.metadata, old.version, old.folder) == (
            {"draft": [1, 2]},
            {"k": 1},
            3,
            "f1",
        )
        assert [m.content for m in await store.read_messages("old")] == ["hi", {"text": "yo"}]
        assert (await store.append_message("old", "user", "after")).seq == 3
        await store.update_state("old", {"draft": None, "done": True}, expected_version=4)
        assert [s.id for s in (await store.list_sessions(folder="f1")).items] == ["old"]
        assert (await store.get_folder("f1")).session_count == 1
    assert await versions(raw, schema) == list(range(1, SCHEMA_VERSION + 1))
    indexes = await raw.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", schema)
    names = {row[0] for row in indexes}
    assert {"sessions_by_tenant_expiry", "activity_by_updated"} <= names
    assert "sessions_by_updated" not in names
    async with store_at(url, FrozenClock(200.0)) as store:
        # the activity row copied from the old session row, then moved by the append
        listed = await store.list_sessions(order_by="updated_at", owner="ann")
        assert [(s.id, s.updated_at.timestamp()) for s in listed.items] == [("old", 100.0)]


async def test_an_older_schema_gets_its_stats_totals_from_its_rows(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A schema of version 4 (before the totals) with sessions of two owners and none, three
    statuses and one expired session not purged yet: the upgrade counts them all, and the
    stats leave out the expired one."""
    async with asyncpg.create_pool(SERVER, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        await migrate(conn, schema, target=4)
    s = f'"{schema}"'
    rows = [
        ("ann", "active", None),
        ("ann", "completed", None),
        ("bob", "active", 5000.0),
        (None, "archived", None),
        ("bob", "active", 50.0),  # expired at 100
    ]
    for i, (owner, status, expires_at) in enumerate(rows):
        await raw.execute(
            f"WITH s AS (INSERT INTO {s}.sessions (tenant, id, owner, folder, title, status, "
            "step, metadata, version, created_at, updated_at, expires_at, idle_ttl, deadline, "
            "message_count, last_seq, input_tokens, output_tokens, cost) VALUES ('default', "
            "$1, $2, NULL, 't', $3, NULL, '{}', 1, 10, 20, $4, NULL, NULL, $5, $5, $6, $5, $7) "
            f"RETURNING pk, tenant, owner, id, updated_at), st AS (INSERT INTO {s}.states "
            f"SELECT pk, '{{}}' FROM s) INSERT INTO {s}.activity SELECT pk, tenant, "
            "coalesce(owner, ''), id, updated_at FROM s",
            f"s{i}",
            owner,
            status,
            expires_at,
            i,
            10 * i,
            0.25 * i,
        )
    assert await versions(raw, schema) == [1, 2, 3, 4]

    async with store_at(url, FrozenClock(100.0)) as store:
        stats = await store.stats()
        await store.append_message("s0", "user", "after", input_tokens=1, cost=0.5)
        after = await store.stats()
    assert await versions(raw, schema) == list(range(1, SCHEMA_VERSION + 1))
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
    totals = await raw.fetch(
        f"SELECT owner_key, status, sum(sessions)::int, sum(messages)::int, sum(cost) "
        f"FROM {s}.totals GROUP BY 1, 2 ORDER BY 1, 2"
    )
    # the expired session is still counted in the totals, until purge removes it
    assert [tuple(row) for row in totals] == [
        ("", "archived", 1, 3, 0.75),
        ("ann", "active", 1, 1, 0.5),
        ("ann", "completed", 1, 1, 0.25),
        ("bob", "active", 2, 6, 1.5),
    ]


async def test_totals_take_row_locks_in_one_order_and_drop_emptied_shards(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Concurrent creates, appends, moves and deletes of one owner's sessions (which share
    the owner's few totals rows) neither deadlock nor lose a count; a shard whose sessions
    are all gone is deleted."""
    async with store_at(url, pool_size=8) as store:
        ids = [(await store.create_session(owner="ann")).id for _ in range(24)]

        async def work(i: int) -> None:
            for n in range(5):
                await store.append_message(ids[i], "user", f"m{n}", cost=0.25)
            if i % 3 == 0:
                await store.update_session(ids[i], status="completed")
            if i % 4 == 0:
                await store.delete_session(ids[i])

        await asyncio.gather(*(work(i) for i in range(24)))
        stats = await store.stats()
        assert (stats.total, stats.completed, stats.messages) == (18, 6, 90)
        assert stats.cost == 22.5
        for session_id in ids[1::4] + ids[2::4] + ids[3::4]:
            await store.delete_session(session_id)
        assert (await store.stats()).total == 0
    assert await raw.fetchval(f'SELECT count(*) FROM "{schema}".totals') == 0


async def test_doctor_finds_the_totals_triggers_or_table_missing(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with store_at(url) as store:
        assert (await checks.doctor(store)).ok
        await raw.execute(f'ALTER TABLE "{schema}".sessions DISABLE TRIGGER totals_update')
        warnings = (await checks.doctor(store)).report.warnings
        assert len(warnings) == 1
        assert "totals_update" in warnings[0]
        assert "check --repair" in warnings[0]
        await raw.execute(f'DROP TABLE "{schema}".totals')
        warnings = (await checks.doctor(store)).report.warnings
        assert ["table totals is missing" in warning for warning in warnings] == [True]


async def test_appends_leave_every_index_of_sessions_alone(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    """An append writes only unindexed columns of its session row (so PostgreSQL can
    update it in place, a HOT update), and moves the session's activity row, which the
    listings by updated_at read."""
    async with store_at(url) as store:
        await store.create_session(session_id="a", owner="ann")
        await store.create_session(session_id="b", owner="bob")
        await store.append_message("a", "user", "hi")
        defs = await raw.fetch(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = 'sessions'",
            schema,
        )
        assert all(
            column not in row[0]
            for row in defs
            for column in ("updated_at", "version", "message_count", "last_seq")
        )
        options = await raw.fetchval(
            "SELECT reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = 'sessions'",
            schema,
        )
        assert options == ["fillfactor=75"]
        by_updated = await store.list_sessions(order_by="updated_at")
        assert [s.id for s in by_updated.items] == ["a", "b"]
        await store.update_session("b", owner="cy")
        assert [s.id for s in (await store.list_sessions(order_by="updated_at")).items] == [
            "b",
            "a",
        ]
        cy = await store.list_sessions(order_by="updated_at", owner="cy")
        assert [s.id for s in cy.items] == ["b"]
        assert (await store.list_sessions(order_by="updated_at", owner="bob")).items == []
        await store.delete_session("a")
        rows = await raw.fetch(f'SELECT id, owner_key FROM "{schema}".activity')
        assert [tuple(row) for row in rows] == [("b", "cy")]


# --- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("schema=x&colour=blue", "'colour'"),
        ("schema=pg_catalog", "schema"),
        ("schema=1abc", "schema"),
        ('schema=a"b', "schema"),
        ("schema=a-b", "schema"),
        (f"schema={'x' * 64}", "schema"),
        ("schema=a&schema=b", "twice"),
        ("durable=yes", "durable"),
    ],
)
def test_bad_url_options_name_the_option(query: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        open_store(f"{SERVER}?{query}")
    assert caught.value.field == "url"


def test_both_schemes_and_the_default_schema() -> None:
    for scheme in ("postgresql", "postgres"):
        engine = engine_from_url(f"{scheme}://127.0.0.1:5432/test", Settings())
        assert isinstance(engine, PostgresEngine)
        assert engine.schema == DEFAULT_SCHEMA


async def test_driver_options_reach_the_driver(
    schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    url = f"{SERVER}?schema={schema}&sslmode=disable&application_name={schema}"
    async with store_at(url) as store:
        await store.create_session()
        names = await raw.fetch(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = $1", schema
        )
        assert names


# --- durability ------------------------------------------------------------------------


async def test_durable_is_quiet_when_commits_are_flushed(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sessionkeeper"):
        async with store_at(f"{url}&durable=true"):
            pass
    assert caplog.records == []


async def test_durable_warns_what_an_acknowledged_write_does_not_survive(
    raw: asyncpg.Connection[asyncpg.Record], caplog: pytest.LogCaptureFixture
) -> None:
    """A role whose sessions commit asynchronously (synchronous_commit = off)."""
    role = fresh_schema()
    await raw.execute(f'CREATE ROLE "{role}" LOGIN')
    await raw.execute(f'ALTER ROLE "{role}" SET synchronous_commit = off')
    await raw.execute(f'GRANT CREATE ON DATABASE test TO "{role}"')
    try:
        url = f"postgresql://{role}@127.0.0.1:5432/test?schema={role}&durable=true"
        with caplog.at_level(logging.WARNING, logger="sessionkeeper"):
            async with store_at(url) as store:
                await store.create_session()
        [record] = caplog.records
        assert "synchronous_commit is off" in record.message
        assert "server crashes or its machine loses power" in record.message
    finally:
        await raw.execute(f'DROP SCHEMA IF EXISTS "{role}" CASCADE')
        await raw.execute(f'REVOKE CREATE ON DATABASE test FROM "{role}"')
        await raw.execute(f'DROP ROLE "{role}"')


# --- JSON ------------------------------------------------------------------------------


async def test_json_that_jsonb_cannot_hold_is_invalid_input(url: str) -> None:
    async with store_at(url) as store:
        with pytest.raises(InvalidInput, match="u0000") as caught:
            await store.create_session(session_id="nul", state={"a": "x\x00y"})
        assert caught.value.field == "state"
        session = await store.create_session(session_id="ok")
        with pytest.raises(InvalidInput) as caught:
            await store.update_session(session.id, metadata={"a": "\x00"})
        assert caught.value.field == "metadata"
        assert (await store.get_session("ok")).version == 1
        assert await store.count_sessions() == 1
        message = await store.append_message("ok", "user", {"text": "\x00 is fine here"})
        assert (await store.read_messages("ok"))[0] == message


async def test_state_numbers_keep_their_decimal_value(url: str) -> None:
    """jsonb keeps a number as a decimal: a float that Python writes in exponent form comes
    back written out in full, and reads back as the same float (integers past 64 bits are
    refused on input, so a number that long is a float). Message content is text, kept
    byte for byte."""
    async with store_at(url) as store:
        session = await store.create_session(state={"small": 0.1, "big": 1e300})
        state = (await store.get_session(session.id)).state
        assert state == {"small": 0.1, "big": 1e300}
        await store.append_message(session.id, "user", {"big": 1e300})
        assert (await store.read_messages(session.id))[0].content == {"big": 1e300}


# --- row locks under concurrency -------------------------------------------------------


async def test_one_of_many_creates_of_one_id_wins(url: str) -> None:
    clock = FrozenClock()
    async with store_at(url, clock) as store:
        for ttl in (1, None):  # a free id, then one whose session has just expired
            outcomes = await asyncio.gather(
                *(store.create_session(session_id="same", ttl=ttl) for _ in range(8)),
                return_exceptions=True,
            )
            assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
            assert all(isinstance(o, AlreadyExists) for o in outcomes if isinstance(o, Exception))
            clock.advance(1)
        assert await store.count_sessions() == 1


async def test_concurrent_patches_without_versions_all_land(url: str) -> None:
    """The state row is locked with the session's, so no patch merges into a stale state."""
    async with store_at(url) as store:
        session = await store.create_session()

        async def patch(writer: int) -> None:
            for i in range(20):
                await store.update_state(session.id, {f"w{writer}": {str(i): i}})

        await asyncio.gather(*(patch(w) for w in range(8)))
        final = await store.get_session(session.id)
    assert final.state == {f"w{w}": {str(i): i for i in range(20)} for w in range(8)}
    assert final.version == 1 + 8 * 20


async def test_a_deadlock_victim_runs_again(
    schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    """The store deletes folder A into B while another transaction deletes B and then
    wants A: PostgreSQL aborts the store's transaction, which then runs again and lands."""
    url = f"{SERVER}?schema={schema}&application_name={schema}"
    async with store_at(url) as store:
        a = await store.create_folder("A", owner="ann")
        b = await store.create_folder("B", owner="ann")
        session = await store.create_session(owner="ann", folder=a.id)
        await raw.execute("SET deadlock_timeout = '10s'")  # so the store is the victim
        other = raw.transaction()
        await other.start()
        await raw.execute(f'DELETE FROM "{schema}".folders WHERE id = $1', b.id)
        deleting = asyncio.ensure_future(store.delete_folder(a.id, reassign_to=b.id))
        await wait_for_lock_wait(raw, schema)
        # Waits for the store's lock on A until PostgreSQL aborts the store's transaction.
        await raw.execute(f'SELECT 1 FROM "{schema}".folders WHERE id = $1 FOR KEY SHARE', a.id)
        await other.rollback()  # B is back
        assert await deleting == 1
        assert (await store.get_session(session.id)).folder == b.id


async def test_purge_skips_sessions_another_transaction_holds(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    clock = FrozenClock()
    async with store_at(url, clock) as store:
        for i in range(3):
            await store.create_session(session_id=f"e{i}", ttl=1)
        clock.advance(1)
        async with raw.transaction():
            await raw.execute(f"SELECT 1 FROM \"{schema}\".sessions WHERE id = 'e1' FOR UPDATE")
            started = time.perf_counter()
            assert await store.purge_expired() == 2
            assert time.perf_counter() - started < 1
        assert await store.purge_expired() == 1


# --- batches -----------------------------------------------------------------------------


async def test_appends_in_one_turn_share_a_statement_and_keep_their_own_results(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent appends to many sessions go out in batches; an append to a missing
    session or at a stale version fails alone, and two appends to one session in one
    turn both land, in order."""
    batched: list[int] = []
    original = PostgresEngine._append_batch

    async def spy(self: PostgresEngine, conn: Any, jobs: list[Any]) -> None:
        batched.append(len(jobs))
        await original(self, conn, jobs)

    monkeypatch.setattr(PostgresEngine, "_append_batch", spy)
    async with store_at(url) as store:
        ids = [(await store.create_session(session_id=f"s{i}")).id for i in range(12)]

        async def writer(sid: str) -> list[int]:
            seqs = []
            for i in range(10):
                appended = await store.append_message(sid, "user", i, input_tokens=i, cost=0.5)
                seqs.append(appended.seq)
            return seqs

        outcomes = await asyncio.gather(
            *(writer(sid) for sid in ids),
            store.append_message("missing", "user", "x"),
            store.append_message(ids[0], "user", "stale", expected_version=1),
            store.append_messages(ids[1], [{"role": "user", "content": "a"}] * 2),
            store.append_message(ids[1], "user", "b"),
            return_exceptions=True,
        )
        assert max(batched) > 1, "the appends never shared a statement"
        assert isinstance(outcomes[12], NotFound)
        assert isinstance(outcomes[13], VersionConflict)
        pair, one = cast("list[Message]", outcomes[14]), cast("Message", outcomes[15])
        assert pair[1].seq == pair[0].seq + 1 != one.seq  # one call, consecutive seqs
        for sid, seqs in zip(ids, cast("list[list[int]]", outcomes[:12]), strict=True):
            assert seqs == sorted(seqs)
            session = await store.get_session(sid)
            extra = 3 if sid == ids[1] else 0
            assert (session.message_count, session.last_seq) == (10 + extra, 10 + extra)
            assert (session.version, session.input_tokens) == (1 + 10 + (2 if extra else 0), 45)
            assert session.cost == 5.0
            messages = await store.read_messages(sid)
            assert [m.seq for m in messages] == list(range(1, 11 + extra))
            assert [m.content for m in messages if m.content in range(10)] == list(range(10))


async def test_a_locked_session_holds_up_only_its_own_appends(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with store_at(url) as store:
        held = await store.create_session()
        free = [await store.create_session() for _ in range(4)]
        async with raw.transaction():
            await raw.execute(
                f'SELECT 1 FROM "{schema}".sessions WHERE id = $1 FOR UPDATE', held.id
            )
            waiting = asyncio.ensure_future(store.append_message(held.id, "user", "later"))
            started = time.perf_counter()
            done = await asyncio.gather(*(store.append_message(s.id, "user", "now") for s in free))
            assert time.perf_counter() - started < 1
            assert [m.seq for m in done] == [1, 1, 1, 1]
            assert not waiting.done()
        assert (await waiting).seq == 1


async def test_reads_in_one_turn_share_a_statement_and_keep_their_own_results(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batched: list[int] = []
    original = PostgresEngine._read_batch

    async def spy(self: PostgresEngine, conn: Any, jobs: list[Any]) -> None:
        batched.append(len(jobs))
        await original(self, conn, jobs)

    monkeypatch.setattr(PostgresEngine, "_read_batch", spy)
    clock = FrozenClock()
    async with store_at(url, clock) as store:
        ids = []
        for i in range(6):
            session = await store.create_session(idle_ttl=60 if i == 0 else None)
            if i:
                drafts = [{"role": "user", "content": j} for j in range(i * 3)]
                await store.append_messages(session.id, drafts)
            ids.append(session.id)
        gone = await store.create_session(ttl=10)
        clock.advance(10)
        lasts = await asyncio.gather(
            *(store.last_messages(sid, 4) for sid in ids),
            store.last_messages(gone.id),
            store.last_messages("missing"),
            return_exceptions=True,
        )
        pages = await asyncio.gather(
            *(store.read_messages(sid, after_seq=2, limit=5) for sid in ids)
        )
        assert sorted(batched, reverse=True)[:2] == [8, 6]
        found = cast("list[list[Message]]", lasts[:6])
        for i, (last, page) in enumerate(zip(found, pages, strict=True)):
            count = i * 3
            assert [m.seq for m in last] == list(range(max(1, count - 3), count + 1))
            assert [m.seq for m in page] == list(range(3, min(count, 7) + 1))
        assert isinstance(lasts[6], NotFound)
        assert isinstance(lasts[7], NotFound)
        # the idle session was renewed by the batched reads (at now + 60 from the clock)
        renewed = await store.get_session(ids[0])
        assert renewed.expires_at is not None
        assert renewed.expires_at.timestamp() == clock.now() + 60


# --- a server that is gone, or does not answer -----------------------------------------


async def test_an_unreachable_server_fails_at_open_quickly() -> None:
    started = time.perf_counter()
    with pytest.raises(BackendUnavailable, match=re.escape("at 127.0.0.1:1:")):
        async with store_at("postgresql://127.0.0.1:1/test?schema=x", server_timeout=1.0):
            pass
    assert time.perf_counter() - started < 1.5


async def test_a_server_that_never_answers_fails_within_the_timeout() -> None:
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # accept, then say nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.perf_counter()
        with pytest.raises(BackendUnavailable, match=re.escape("no answer within 0.5 s")):
            async with store_at(f"postgresql://127.0.0.1:{port}/test", server_timeout=0.5):
                pass
        assert time.perf_counter() - started < 1.5
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_call_that_waits_too_long_fails_and_changes_nothing(
    url: str, schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with store_at(url, server_timeout=0.5) as store:
        session = await store.create_session()
        await store.append_message(session.id, "user", "one")
        async with raw.transaction():  # holds the session's row lock
            await raw.execute(f'SELECT 1 FROM "{schema}".sessions FOR UPDATE')
            started = time.perf_counter()
            with pytest.raises(BackendUnavailable, match=re.escape("no answer within 0.5 s")):
                await store.append_message(session.id, "user", "stuck")
            assert time.perf_counter() - started < 1.5
        assert (await store.append_message(session.id, "user", "two")).seq == 2
        assert [m.content for m in await store.read_messages(session.id)] == ["one", "two"]


async def test_a_call_that_finds_every_connection_busy_fails_within_the_timeout(
    url: str,
) -> None:
    """The wait for a pooled connection is bounded too: here the pool's only connection
    is held (by a job that outlasts the timeout) while another call wants one."""
    engine = PostgresEngine(url, Settings(url=url, server_timeout=0.5, pool_size=1))
    await engine.open()
    try:
        release = asyncio.Event()

        async def hold(conn: object) -> None:
            await release.wait()

        holder = asyncio.ensure_future(engine._run(hold))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(BackendUnavailable, match=re.escape("no answer within 0.5 s")):
            await engine.count_sessions("default", SessionQuery(), 0.0)
        assert 0.4 < time.perf_counter() - started < 1.0
        release.set()
        await holder
        assert await engine.count_sessions("default", SessionQuery(), 0.0) == 0
    finally:
        await engine.close()


async def terminate(raw: asyncpg.Connection[asyncpg.Record], app: str) -> int:
    killed: int = await raw.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        app,
    )
    return killed


async def test_the_pool_recovers_from_terminated_backends(
    schema: str, raw: asyncpg.Connection[asyncpg.Record]
) -> None:
    """After pg_terminate_backend on every connection of the store, the next call either
    works on a fresh connection or raises BackendUnavailable; the one after works."""
    url = f"{SERVER}?schema={schema}&application_name={schema}"
    async with store_at(url) as store:
        session = await store.create_session()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.append_message(session.id, "user", "x"),
            lambda: store.get_session(session.id),
            lambda: store.last_messages(session.id),
            lambda: store.update_state(session.id, {"n": 1}),
            lambda: store.count_sessions(),
        ]
        for call in calls:
            # several connections open, then every one of them killed
            await asyncio.gather(*(store.get_session(session.id) for _ in range(4)))
            assert await terminate(raw, schema) >= 1
            with contextlib.suppress(BackendUnavailable):
                await call()
            await call()
        messages = await store.read_messages(session.id)
    assert [m.seq for m in messages] == list(range(1, len(messages) + 1))


# --- fork ------------------------------------------------------------------------------


def _use_after_fork(store: SessionStore, queue: multiprocessing.Queue[str]) -> None:
    try:
        asyncio.run(store.count_sessions())
    except BackendUnavailable as exc:
        queue.put(str(exc))
    else:
        queue.put("used the parent's store")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_a_store_is_never_reused_across_fork(url: str) -> None:
    context = multiprocessing.get_context("fork")
    async with store_at(url) as store:
        queue: multiprocessing.Queue[str] = context.Queue()
        child = context.Process(target=_use_after_fork, args=(store, queue))
        child.start()
        child.join(30)
        assert "before fork" in queue.get(timeout=5)
        assert await store.count_sessions() == 0  # the parent's connections still work
