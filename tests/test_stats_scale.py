"""Stats over 100,000 sessions on SQLite and PostgreSQL: exactly what a full aggregate of
the live sessions says, from statements whose plans never scan the sessions table.

The sessions are written in bulk with SQL (the engines' triggers keep the totals as for
any other write), of 1,000 owners and none, three statuses, some recently updated, some
expired and not purged yet, beside another tenant's.
"""

from __future__ import annotations

import collections
import contextlib
import random
import re
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sessionkeeper import FrozenClock, NotFound, SessionStore, Stats, checks, open_store
from sessionkeeper.engines import postgres
from sessionkeeper.engines.sqlite import STATS_SQL
from tests.contract.namespaces import drop_namespace

SESSIONS = 100_000
NOW = 1_700_000_000.0
DAY = 86_400.0
TOP = 10
SERVER = "postgresql://127.0.0.1:5432/test"

# Row i of the bulk insert: owner o(i % 1000), or none for every 50th; status by i % 3;
# updated up to 1,000 hours ago (about 2.4% within the last day); every 100th expired
# a little before NOW, every 100th another a little after.
_COLUMNS = (
    "tenant, id, owner, folder, title, status, step, metadata, version, created_at, "
    "updated_at, expires_at, idle_ttl, deadline, message_count, last_seq, input_tokens, "
    "output_tokens, cost"
)
_ROW = (
    "'default', 's' || i, CASE WHEN i % 50 = 0 THEN NULL ELSE 'o' || (i % 1000) END, NULL, "
    "'t', CASE i % 3 WHEN 0 THEN 'active' WHEN 1 THEN 'completed' ELSE 'archived' END, "
    "NULL, '{{}}', 1, {now} - i, {now} - (i % 1000) * 3600.0, "
    "CASE i % 100 WHEN 7 THEN {now} - 5 - i % 13 WHEN 8 THEN {now} + 1000 ELSE NULL END, "
    "NULL, NULL, i % 20, i % 20, (i % 7) * 10, (i % 5) * 3, (i % 11) * 0.125"
)


def expected_sql(table: str, tenant: str, now: float, top: int = TOP) -> list[str]:
    """The figures straight from the sessions (every row read), as stats compute them."""
    where = f"tenant = '{tenant}' AND (expires_at IS NULL OR expires_at > {now})"
    return [
        "SELECT count(*), coalesce(sum(CASE WHEN status = 'active' THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN status = 'archived' THEN 1 ELSE 0 END), 0), "
        f"coalesce(sum(CASE WHEN updated_at >= {now - DAY} THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(message_count), 0), coalesce(sum(input_tokens), 0), "
        f"coalesce(sum(output_tokens), 0), coalesce(sum(cost), 0) FROM {table} WHERE {where}",
        f"SELECT owner, count(*) AS n FROM {table} WHERE {where} GROUP BY owner "
        f"ORDER BY n DESC, coalesce(owner, '') LIMIT {top}",
        f"SELECT owner, sum(cost) AS c FROM {table} WHERE {where} GROUP BY owner "
        f"ORDER BY c DESC, coalesce(owner, '') LIMIT {top}",
    ]


def assert_exact(stats: Stats, figures: Any, owners: Any, costs: Any) -> None:
    total, active, completed, archived, recent, messages, tokens_in, tokens_out, cost = figures
    assert (stats.total, stats.active, stats.completed, stats.archived) == (
        total,
        active,
        completed,
        archived,
    )
    assert stats.recently_active == recent
    assert (stats.messages, stats.input_tokens, stats.output_tokens) == (
        messages,
        tokens_in,
        tokens_out,
    )
    assert stats.cost == pytest.approx(cost, rel=1e-12)
    assert [(o.owner, o.sessions) for o in stats.top_owners] == [tuple(row) for row in owners]
    assert [(o.owner, pytest.approx(o.cost, rel=1e-12)) for o in stats.top_owners_by_cost] == [
        tuple(row) for row in costs
    ]


# --- SQLite ----------------------------------------------------------------------------


def fill_sqlite(path: Path) -> None:
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n "
            f"WHERE i < {SESSIONS - 1}) "
            f"INSERT INTO sessions ({_COLUMNS}) SELECT {_ROW.format(now=NOW)} FROM n"
        )
        conn.execute(
            f"INSERT INTO sessions ({_COLUMNS}) SELECT 'other', id, owner, folder, title, "
            "status, step, metadata, version, created_at, updated_at, NULL, idle_ttl, "
            "deadline, message_count, last_seq, input_tokens, output_tokens, cost "
            "FROM sessions WHERE tenant = 'default' LIMIT 500"
        )
        conn.execute("INSERT INTO states SELECT pk, '{}' FROM sessions")
        conn.execute("COMMIT")
        conn.execute("ANALYZE")


async def test_sqlite_stats_over_100k_sessions_are_exact_and_never_scan_sessions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "scale.db"
    url = f"sqlite:///{path}"
    async with open_store(url):
        pass  # the schema
    fill_sqlite(path)
    async with open_store(url, clock=FrozenClock(NOW)) as store:
        stats = await store.stats(top=TOP)
    with sqlite3.connect(path) as conn:
        figures_sql, owners_sql, costs_sql = expected_sql("sessions", "default", NOW)
        figures = conn.execute(figures_sql).fetchone()
        owners = conn.execute(owners_sql).fetchall()
        costs = conn.execute(costs_sql).fetchall()
        params = {"tenant": "default", "now": NOW, "since": NOW - DAY, "top": TOP}
        plans = {
            name: [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            for name, sql in STATS_SQL.items()
        }
    assert figures[0] == SESSIONS - SESSIONS // 100
    assert 0 < figures[4] < figures[0] // 10  # a few recently updated
    assert_exact(stats, figures, owners, costs)
    for name, plan in plans.items():
        text = " | ".join(plan)
        # Every step on sessions is a SEARCH of an index range, never a SCAN of the table.
        on_sessions = [step for step in plan if re.search(r"\b(sessions|s)\b", step)]
        assert all(step.startswith("SEARCH") for step in on_sessions), (name, text)
        assert not re.search(r"SCAN (sessions|s)\b", text), (name, text)
    assert any("sessions_by_tenant_expiry" in step for step in plans["by_status"])
    assert any("sessions_by_updated" in step for step in plans["recent"])


# --- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
def pg_schema() -> Iterator[str]:
    name = f"sk_t_{secrets.token_hex(5)}"
    yield name
    drop_namespace(f"{SERVER}?schema={name}")


@pytest.mark.server
async def test_postgresql_stats_over_100k_sessions_are_exact_and_never_scan_sessions(
    pg_schema: str,
) -> None:
    url = f"{SERVER}?schema={pg_schema}"
    s = f'"{pg_schema}"'
    row = _ROW.format(now=NOW).replace("'{}'", "'{}'::jsonb")
    async with open_store(url):
        pass  # the schema
    conn = await asyncpg.connect(SERVER)
    try:
        async with conn.transaction():
            await conn.execute(
                f"INSERT INTO {s}.sessions ({_COLUMNS}) SELECT {row} "
                f"FROM generate_series(0, {SESSIONS - 1}) AS g(i)"
            )
            await conn.execute(
                f"INSERT INTO {s}.sessions ({_COLUMNS}) SELECT 'other', id, owner, folder, "
                "title, status, step, metadata, version, created_at, updated_at, NULL, "
                "idle_ttl, deadline, message_count, last_seq, input_tokens, output_tokens, "
                f"cost FROM {s}.sessions WHERE tenant = 'default' LIMIT 500"
            )
            await conn.execute(f"INSERT INTO {s}.states SELECT pk, '{{}}' FROM {s}.sessions")
            await conn.execute(
                f"INSERT INTO {s}.activity SELECT pk, tenant, coalesce(owner, ''), id, "
                f"updated_at FROM {s}.sessions"
            )
        await conn.execute(f"ANALYZE {s}.sessions, {s}.activity, {s}.totals")
        async with open_store(url, clock=FrozenClock(NOW)) as store:
            stats = await store.stats(top=TOP)
        figures_sql, owners_sql, costs_sql = expected_sql(f"{s}.sessions", "default", NOW)
        figures = await conn.fetchrow(figures_sql)
        assert figures is not None
        owners = await conn.fetch(owners_sql)
        costs = await conn.fetch(costs_sql)
        sql = postgres.stats_sql(pg_schema)
        plan = "\n".join(
            row[0]
            for row in await conn.fetch(
                f"EXPLAIN {sql}".replace("$1", "'default'")
                .replace("$2", f"{NOW}::float8")
                .replace("$3", f"{NOW - DAY}::float8")
                .replace("$4", str(TOP))
            )
        )
    finally:
        await conn.close()
    assert figures[0] == SESSIONS - SESSIONS // 100
    assert 0 < figures[4] < figures[0] // 10  # a few recently updated
    assert_exact(stats, figures, owners, costs)
    assert "Seq Scan on sessions" not in plan, plan
    assert "sessions_by_tenant_expiry" in plan, plan
    assert "activity_by_updated" in plan, plan


# --- every kind of write, at random ----------------------------------------------------

OWNERS = [None, "ann", "bob", "cy"]
COSTS = [0.0, 0.25, 0.5, 1.0, 2.0]  # sums of these are exact, so ties rank alike


async def random_writes(store: SessionStore, clock: FrozenClock, check_now: Any) -> None:
    """A few hundred writes of every kind that moves the totals (creates with and without
    expiry, appends, atomic changes, pops, clears, owner and status moves, deletes, loads
    that replace, idle renewals, expiry and purge), each few of them checked against the
    sessions themselves; then check finds the totals sound."""
    rng = random.Random(7)
    ids: list[str] = []
    done: collections.Counter[str] = collections.Counter()

    async def live_id() -> str | None:
        while ids:
            session_id = rng.choice(ids)
            try:
                await store.get_session(session_id)  # renews an idle one
            except NotFound:
                ids.remove(session_id)
                continue
            return session_id
        return None

    for step in range(400):
        kind = rng.choice(
            ["create"] * 3
            + ["append"] * 5
            + ["change", "pop", "clear", "move", "delete", "load"]
            + ["advance", "purge"]
        )
        session_id = None if kind in ("create", "advance", "purge") else await live_id()
        if kind == "create" or (session_id is None and kind not in ("advance", "purge")):
            ttl = rng.choice([None, None, 30.0, 300.0])
            idle = rng.choice([None, None, 60.0])
            session = await store.create_session(owner=rng.choice(OWNERS), ttl=ttl, idle_ttl=idle)
            ids.append(session.id)
        elif kind == "append":
            assert session_id is not None
            await store.append_messages(
                session_id,
                [
                    {
                        "role": "user",
                        "content": "x",
                        "input_tokens": rng.randrange(10),
                        "output_tokens": rng.randrange(10),
                        "cost": rng.choice(COSTS),
                    }
                    for _ in range(rng.randrange(1, 4))
                ],
            )
        elif kind == "change":
            assert session_id is not None
            await store.change_session(
                session_id,
                status=rng.choice(["active", "completed", "archived"]),
                messages=[{"role": "user", "content": "y", "cost": rng.choice(COSTS)}],
            )
        elif kind == "pop":
            assert session_id is not None
            await store.pop_message(session_id)
        elif kind == "clear":
            assert session_id is not None
            await store.clear_messages(session_id)
        elif kind == "move":
            assert session_id is not None
            await store.update_session(session_id, owner=rng.choice(OWNERS))
        elif kind == "delete":
            assert session_id is not None
            await store.delete_session(session_id)
            ids.remove(session_id)
        elif kind == "load":  # the same session again, as another owner's
            assert session_id is not None
            record, messages = await store.export_session(session_id)
            record.owner = rng.choice(OWNERS)
            assert await store.load_session(record, messages, replace=True) == "loaded"
        elif kind == "advance":
            clock.advance(rng.choice([1.0, 20.0, 100.0]))
        else:
            done["purged"] += await store.purge_expired()
        done[kind] += 1
        if step % 20 == 19:
            stats = await store.stats(top=len(OWNERS))
            assert_exact(stats, *await check_now(clock.now()))
    result = await checks.check(store, all_tenants=True)
    assert result.ok  # pops leave seq gaps, which are no damage
    assert [count.found for count in result.counts if count.kind == "totals"] == [0]
    assert min(done.values()) > 0, done  # every kind ran, and purge found expired ones


async def test_sqlite_stats_follow_random_writes_of_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "random.db"
    clock = FrozenClock(NOW)

    async def direct(now: float) -> tuple[Any, Any, Any]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            figures, owners, costs = expected_sql("sessions", "default", now, len(OWNERS))
            return (
                conn.execute(figures).fetchone(),
                conn.execute(owners).fetchall(),
                conn.execute(costs).fetchall(),
            )

    async with open_store(f"sqlite:///{path}", clock=clock) as store:
        await random_writes(store, clock, direct)


@pytest.mark.server
async def test_postgresql_stats_follow_random_writes_of_every_kind(pg_schema: str) -> None:
    clock = FrozenClock(NOW)
    conn = await asyncpg.connect(SERVER)

    async def direct(now: float) -> tuple[Any, Any, Any]:
        figures, owners, costs = expected_sql(
            f'"{pg_schema}".sessions', "default", now, len(OWNERS)
        )
        return await conn.fetchrow(figures), await conn.fetch(owners), await conn.fetch(costs)

    try:
        async with open_store(f"{SERVER}?schema={pg_schema}", clock=clock) as store:
            await random_writes(store, clock, direct)
    finally:
        await conn.close()
