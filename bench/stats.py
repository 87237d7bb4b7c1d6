"""The statistics benchmark: stats and analytics from 10,000 to 1,000,000 sessions, on SQLite
and PostgreSQL, beside the raw driver aggregating every session row.

For each ``--sessions`` count and engine, a fresh database gets that many sessions in bulk
SQL (the engines' triggers keep their totals as for any write), as a service running at a
steady ``--per-day`` sessions a day would have written them: more sessions means a longer
history, not a busier day (10,000 sessions are 5 days of it, 1,000,000 are 500). Owners
``o0`` .. ``o<--owners - 1>`` (every 50th session has none), three statuses, 0 to 19
messages with tokens and cost; ``--expired`` sessions expired and not purged yet (what the
sweeper leaves between two passes). The daily analytics counters get what the store would
have counted for them (one row per day and owner with activity). Then, each timed
``--repeat`` times (best kept):

- ``stats``: ``store.stats(top=10)``, the live totals now;
- ``analytics 30d``: ``store.analytics(days=30)``, per day with owners by cost;
- ``analytics 1y``: ``store.analytics(days=365, group_by="month")``;
- ``raw scan``: the raw driver (sqlite3 / asyncpg) computing the stats' figures the
  direct way, one aggregate over every live session row of the tenant (what stats cost
  before its totals table), and ``raw 30d``: the sessions created per day in the last
  30 days, grouped from the session rows (an index range).

It prints the times, each one's growth from the smallest count (``x data`` is how much the
data grew), and stats against the raw scan of the same run. The data grows 100 times from
10,000 to 1,000,000; stats and analytics should grow far less.

    python -m bench.stats                                  # 10k, 100k, 1M on both
    python -m bench.stats --sessions 10000 100000 --engines sqlite
    python -m bench.stats --json

Loading 1,000,000 sessions takes about a minute per engine. Progress goes to stderr,
results to stdout. Databases live in a temporary folder and a PostgreSQL schema of their
own, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from sessionkeeper import FrozenClock, open_store

DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/test"
NOW = 1_700_000_000.0
DAY = 86_400.0
_COLUMNS = (
    "tenant, id, owner, folder, title, status, step, metadata, version, created_at, "
    "updated_at, expires_at, idle_ttl, deadline, message_count, last_seq, input_tokens, "
    "output_tokens, cost"
)


def _row(sessions: int, args: argparse.Namespace) -> str:
    """Session ``i`` of the bulk insert as SQL over a series ``i`` (0 is the newest)."""
    spacing = DAY / args.per_day
    every = max(1, sessions // max(1, args.expired))
    return (
        "'default', 's' || i, "
        f"CASE WHEN i % 50 = 0 THEN NULL ELSE 'o' || (i % {args.owners}) END, NULL, 't', "
        "CASE i % 3 WHEN 0 THEN 'active' WHEN 1 THEN 'completed' ELSE 'archived' END, "
        f"NULL, '{{}}', 1, {NOW} - i * {spacing}, {NOW} - i * {spacing} + 600, "
        f"CASE WHEN i % {every} = 7 THEN {NOW} - 5 ELSE NULL END, NULL, NULL, "
        "i % 20, i % 20, (i % 20) * 40, (i % 20) * 90, (i % 20) * 0.0025"
    )


# The analytics counters the store would have added for these sessions: created and
# messages on their creation day, completed 10 minutes later (same day, nearly always).
_DAILY = (
    "INSERT INTO {table} (tenant, day, owner_key, created, completed, completed_messages, "
    "messages, input_tokens, output_tokens, cost) "
    "SELECT tenant, CAST(floor(created_at / 86400) AS integer), coalesce(owner, ''), "
    "count(*), sum(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), "
    "sum(CASE WHEN status = 'completed' THEN message_count ELSE 0 END), "
    "sum(message_count), sum(input_tokens), sum(output_tokens), sum(cost) "
    "FROM {sessions} GROUP BY 1, 2, 3"
)
_SCAN = (
    "SELECT count(*), sum(CASE WHEN status = 'active' THEN 1 ELSE 0 END), "
    "sum(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), "
    "sum(CASE WHEN updated_at >= {since} THEN 1 ELSE 0 END), sum(message_count), "
    "sum(input_tokens), sum(output_tokens), sum(cost) FROM {sessions} "
    "WHERE tenant = 'default' AND (expires_at IS NULL OR expires_at > {now})"
)
_SCAN_30D = (
    "SELECT floor(created_at / 86400), count(*), sum(message_count), sum(cost) FROM "
    "{sessions} WHERE tenant = 'default' AND created_at >= {since} GROUP BY 1"
)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _best(repeat: int, run: Callable[[], Awaitable[object]]) -> float:
    """The shortest of ``repeat`` runs, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await run()
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


async def _store_times(url: str, repeat: int) -> dict[str, float]:
    async with open_store(url, clock=FrozenClock(NOW)) as store:
        return {
            "stats": await _best(repeat, lambda: store.stats(top=10)),
            "analytics 30d": await _best(repeat, lambda: store.analytics(days=30)),
            "analytics 1y": await _best(
                repeat, lambda: store.analytics(days=365, group_by="month")
            ),
        }


async def _sqlite(sessions: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    path = folder / f"stats-{sessions}.db"
    url = f"sqlite:///{path}"
    async with open_store(url):
        pass  # the schema
    started = time.perf_counter()
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("BEGIN")
        conn.execute(
            f"WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n "
            f"WHERE i < {sessions - 1}) INSERT INTO sessions ({_COLUMNS}) "
            f"SELECT {_row(sessions, args)} FROM n"
        )
        conn.execute("INSERT INTO states SELECT pk, '{}' FROM sessions")
        conn.execute(_DAILY.format(table="daily", sessions="sessions"))
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        daily_rows = conn.execute("SELECT count(*) FROM daily").fetchone()[0]
    _log(f"  sqlite: {sessions:,} sessions loaded in {time.perf_counter() - started:.0f} s")
    times = await _store_times(url, args.repeat)
    raw = sqlite3.connect(path)
    try:
        scan = _SCAN.format(sessions="sessions", since=NOW - DAY, now=NOW)
        scan_30d = _SCAN_30D.format(sessions="sessions", since=NOW - 30 * DAY)

        async def run(sql: str) -> None:
            raw.execute(sql).fetchall()

        times["raw scan"] = await _best(args.repeat, lambda: run(scan))
        times["raw 30d"] = await _best(args.repeat, lambda: run(scan_30d))
    finally:
        raw.close()
    return {"daily rows": daily_rows, **times}


async def _postgres(sessions: int, args: argparse.Namespace) -> dict[str, Any]:
    schema = f"sk_bench_{secrets.token_hex(4)}"
    url = f"{args.postgres}?schema={schema}"
    s = f'"{schema}"'
    conn = await asyncpg.connect(args.postgres)
    try:
        async with open_store(url):
            pass  # the schema
        started = time.perf_counter()
        row = _row(sessions, args).replace("'{}'", "'{}'::jsonb")
        async with conn.transaction():
            await conn.execute(
                f"INSERT INTO {s}.sessions ({_COLUMNS}) SELECT {row} "
                f"FROM generate_series(0, {sessions - 1}) AS g(i)"
            )
            await conn.execute(f"INSERT INTO {s}.states SELECT pk, '{{}}' FROM {s}.sessions")
            await conn.execute(
                f"INSERT INTO {s}.activity SELECT pk, tenant, coalesce(owner, ''), id, "
                f"updated_at FROM {s}.sessions"
            )
            await conn.execute(_DAILY.format(table=f"{s}.daily", sessions=f"{s}.sessions"))
        await conn.execute(f"VACUUM ANALYZE {s}.sessions")
        await conn.execute(f"ANALYZE {s}.activity, {s}.totals, {s}.daily")
        daily_rows = await conn.fetchval(f"SELECT count(*) FROM {s}.daily")
        _log(f"  postgresql: {sessions:,} sessions loaded in {time.perf_counter() - started:.0f} s")
        times = await _store_times(url, args.repeat)
        scan = _SCAN.format(sessions=f"{s}.sessions", since=NOW - DAY, now=NOW)
        scan_30d = _SCAN_30D.format(sessions=f"{s}.sessions", since=NOW - 30 * DAY)
        times["raw scan"] = await _best(args.repeat, lambda: conn.fetch(scan))
        times["raw 30d"] = await _best(args.repeat, lambda: conn.fetch(scan_30d))
        return {"daily rows": daily_rows, **times}
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        await conn.close()


_FIGURES = ("stats", "analytics 30d", "analytics 1y", "raw scan", "raw 30d")


def _report(results: dict[str, dict[int, dict[str, Any]]]) -> None:
    for engine, by_count in results.items():
        counts = sorted(by_count)
        smallest = by_count[counts[0]]
        print(f"\n{engine}")
        header = f"{'sessions':>10} {'daily rows':>10} " + " ".join(f"{f:>14}" for f in _FIGURES)
        print(header + f" {'stats vs scan':>14}")
        for count in counts:
            found = by_count[count]
            cells = " ".join(f"{found[f]:>11.2f} ms" for f in _FIGURES)
            versus = found["raw scan"] / found["stats"]
            print(f"{count:>10,} {found['daily rows']:>10,} {cells} {versus:>13.1f}x")
        if len(counts) > 1:
            largest = by_count[counts[-1]]
            grown = " ".join(f"{largest[f] / smallest[f]:>13.1f}x" for f in _FIGURES)
            data = counts[-1] / counts[0]
            print(f"{'growth':>10} {data:>9.0f}x {grown}   (x data: {data:.0f}x)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--owners", type=int, default=200)
    parser.add_argument("--per-day", type=int, default=2_000, help="sessions created a day")
    parser.add_argument("--expired", type=int, default=200, help="expired, not purged yet")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    results: dict[str, dict[int, dict[str, Any]]] = {engine: {} for engine in engines}
    with tempfile.TemporaryDirectory(prefix="sk-bench-stats-") as folder:
        for count in sorted(args.sessions):
            _log(f"{count:,} sessions")
            for engine in engines:
                if engine == "sqlite":
                    results[engine][count] = await _sqlite(count, args, Path(folder))
                    (Path(folder) / f"stats-{count}.db").unlink()
                else:
                    results[engine][count] = await _postgres(count, args)
    if args.json:
        print(json.dumps({e: {str(n): r for n, r in by.items()} for e, by in results.items()}))
    else:
        _report(results)


if __name__ == "__main__":
    asyncio.run(main())
