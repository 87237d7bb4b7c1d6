"""The server benchmark: sessionkeeper on PostgreSQL and Redis beside the raw drivers.

The workload is ``bench.append_read``'s (sessions of messages appended one call each
from ``--concurrency`` tasks, then full and last-10 reads), run four ways:

- ``raw-pg``: asyncpg used directly, the way one would without sessionkeeper: a pool of
  the same size as sessionkeeper's, a ``messages`` table keyed by ``(session_id, seq)``,
  one INSERT per message with ``seq`` passed by the caller, and reads that SELECT on that
  primary key (``ORDER BY seq LIMIT n``; ``ORDER BY seq DESC LIMIT 10`` for the last 10);
- ``postgresql``: sessionkeeper over ``postgresql://...?schema=<fresh schema>``;
- ``raw-redis``: redis.asyncio used directly: HSET on create, RPUSH of the message as JSON
  text per append, LRANGE 0 -1 for a full read and LRANGE -10 -1 for the last 10;
- ``redis``: sessionkeeper over ``redis://...?prefix=<fresh prefix>:``.

Each run gets a schema or key prefix of its own, dropped afterwards (also when the run
fails), so runs never see each other's rows. The ratios compare each engine with the raw
driver of the same server, measured in the same invocation; the targets are on those.

Run it with ``python -m bench.servers`` (``--help`` lists the options); progress goes to
stderr, results to stdout (``--json`` for a machine-readable document).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib.metadata import version
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
from redis.asyncio import Redis

from bench.append_read import (
    EngineRun,
    StoreTarget,
    Target,
    TargetRule,
    growth,
    growth_lines,
    measure_target,
    resource_lines,
    run_scales,
    table_lines,
    target_lines,
    workload_parser,
)
from sessionkeeper.settings import Settings

ENGINES = ("raw-pg", "postgresql", "raw-redis", "redis")
LABELS = {engine: engine for engine in ENGINES}
# Every engine's ratios are against the raw driver of its server (a baseline against itself).
BASELINES = {
    "raw-pg": "raw-pg",
    "postgresql": "raw-pg",
    "raw-redis": "raw-redis",
    "redis": "raw-redis",
}
# raw-pg keeps no session rows (seq comes from the caller): its create phase does nothing.
SESSIONLESS = {"raw-pg"}
TARGETS: tuple[TargetRule, ...] = (
    ("postgresql appends vs raw-pg", "postgresql", "append_ratio", ">=", 0.9),
    ("postgresql last-10 vs raw-pg", "postgresql", "last_ratio", ">=", 0.9),
    ("redis appends vs raw-redis", "redis", "append_ratio", ">=", 0.9),
    ("redis last-10 vs raw-redis", "redis", "last_ratio", ">=", 0.9),
)
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


# sessionkeeper's own URL options: the raw drivers would take them for their own.
_STORE_OPTIONS = frozenset({"schema", "durable", "prefix", "cluster", "fallback"})


def driver_url(url: str) -> str:
    """``url`` without sessionkeeper's options, for the raw drivers."""
    parts = urlsplit(url)
    kept = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name not in _STORE_OPTIONS
    ]
    return parts._replace(query=urlencode(kept)).geturl()


def store_url(url: str, name: str, value: str) -> str:
    """``url`` with sessionkeeper's option ``name`` (``schema``, ``prefix``) set to ``value``."""
    parts = urlsplit(driver_url(url))
    options = [*parse_qsl(parts.query, keep_blank_values=True), (name, value)]
    return parts._replace(query=urlencode(options, safe=":")).geturl()


def _host(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]  # never the password


# --- raw PostgreSQL: asyncpg, one table, one statement per operation -------------------

_PG_TABLE = """CREATE TABLE {t} (
    session_id text NOT NULL,
    seq integer NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cost double precision NOT NULL,
    metadata text NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (session_id, seq)
)"""
_PG_INSERT = "INSERT INTO {t} VALUES ($1, $2, $3, $4, 0, 0, 0.0, '{{}}', $5)"
_PG_COLUMNS = "seq, role, content, input_tokens, output_tokens, cost, metadata, created_at"
_PG_ALL = f"SELECT {_PG_COLUMNS} FROM {{t}} WHERE session_id = $1 ORDER BY seq LIMIT $2"
_PG_LAST = f"SELECT {_PG_COLUMNS} FROM {{t}} WHERE session_id = $1 ORDER BY seq DESC LIMIT $2"


async def _no_reset(conn: object) -> None:
    """Release a connection as it is. asyncpg's default reset sends one more statement
    (``RESET ALL; UNLISTEN *; ...``) on every release, which sessionkeeper's pool skips
    too: with it the baseline would pay two round trips per operation."""


class RawPostgresTarget:
    """The PostgreSQL baseline: an asyncpg pool of sessionkeeper's size, one INSERT per
    message into a table of a schema of its own, reads on the primary key.

    Content is stored as JSON text, as sessionkeeper stores it; reads return asyncpg
    records, which the benchmark only takes the seqs from.
    """

    def __init__(self, dsn: str, schema: str, pool_size: int) -> None:
        self._dsn = dsn
        self._schema = schema
        self._pool_size = pool_size
        table = f'"{schema}".messages'
        self._insert = _PG_INSERT.format(t=table)
        self._all = _PG_ALL.format(t=table)
        self._last = _PG_LAST.format(t=table)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    def _usable(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError("the raw-pg baseline is not open")
        return self._pool

    async def open(self) -> None:
        pool = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=self._pool_size, reset=_no_reset
        )
        try:
            async with pool.acquire() as conn:
                await conn.execute(f'CREATE SCHEMA "{self._schema}"')
                await conn.execute(_PG_TABLE.format(t=f'"{self._schema}".messages'))
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def create(self, session_id: str) -> None:
        return None  # no session rows: seq comes from the caller

    async def append(self, session_id: str, seq: int, role: str, content: str) -> None:
        await self._usable().execute(
            self._insert, session_id, seq, role, json.dumps(content), time.time()
        )

    async def read_all(self, session_id: str, limit: int) -> list[int]:
        rows = await self._usable().fetch(self._all, session_id, limit)
        return [row[0] for row in rows]

    async def read_last(self, session_id: str, n: int) -> list[int]:
        rows = await self._usable().fetch(self._last, session_id, n)
        return [row[0] for row in reversed(rows)]  # newest first from the index: flip


# --- raw Redis: redis.asyncio, a hash per session and a list of JSON messages ----------


class RawRedisTarget:
    """The Redis baseline: redis.asyncio on a pool of sessionkeeper's size; HSET on
    create, RPUSH of one JSON text per message, LRANGE for reads (each message parsed,
    as an application would, to get its seq).

    The pool is redis-py's plain one, with a semaphore that keeps the tasks within its
    connections (alone it would raise "Too many connections"), as sessionkeeper does:
    its BlockingConnectionPool costs some 15 us of CPU per call here, which would handicap
    the baseline.
    """

    def __init__(self, url: str, prefix: str, pool_size: int) -> None:
        self._url = url
        self._prefix = prefix
        self._pool_size = pool_size
        self._calls = asyncio.Semaphore(pool_size)
        self._client: Redis | None = None

    def _usable(self) -> Redis:
        if self._client is None:
            raise RuntimeError("the raw-redis baseline is not open")
        return self._client

    async def open(self) -> None:
        client = Redis.from_url(self._url, max_connections=self._pool_size)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def create(self, session_id: str) -> None:
        async with self._calls:
            await self._usable().hset(
                f"{self._prefix}s:{session_id}",
                mapping={"id": session_id, "created_at": time.time()},
            )

    async def append(self, session_id: str, seq: int, role: str, content: str) -> None:
        message = {
            "seq": seq,
            "role": role,
            "content": content,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost": 0.0,
            "metadata": {},
            "created_at": time.time(),
        }
        async with self._calls:
            await self._usable().rpush(f"{self._prefix}m:{session_id}", json.dumps(message))

    async def read_all(self, session_id: str, limit: int) -> list[int]:
        async with self._calls:
            items = await self._usable().lrange(f"{self._prefix}m:{session_id}", 0, -1)
        return [json.loads(item)["seq"] for item in items]

    async def read_last(self, session_id: str, n: int) -> list[int]:
        async with self._calls:
            items = await self._usable().lrange(f"{self._prefix}m:{session_id}", -n, -1)
        return [json.loads(item)["seq"] for item in items]


# --- namespaces: made per run, dropped after it ----------------------------------------


async def drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def drop_keys(url: str, prefix: str) -> None:
    client = Redis.from_url(url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


class Runner:
    """Builds each run's target in a namespace of its own and drops that namespace after."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pool_size = Settings().pool_size  # what the store opened from a URL will use
        # Unquoted-identifier characters only: valid as a schema name and a key prefix.
        self.token = f"skbench_{os.getpid()}_{secrets.token_hex(3)}"
        self.runs = 0

    def target(
        self, engine: str, namespace: str
    ) -> tuple[Target, Callable[[], Coroutine[Any, Any, None]]]:
        """The target for ``engine`` in ``namespace``, and what removes that namespace."""
        target: Target
        if engine in ("raw-pg", "postgresql"):
            pg = driver_url(self.args.postgres)
            if engine == "raw-pg":
                target = RawPostgresTarget(pg, namespace, self.pool_size)
            else:
                target = StoreTarget(store_url(self.args.postgres, "schema", namespace))
            return target, lambda: drop_schema(pg, namespace)
        redis, prefix = driver_url(self.args.redis), f"{namespace}:"
        if engine == "raw-redis":
            target = RawRedisTarget(redis, prefix, self.pool_size)
        else:
            target = StoreTarget(store_url(self.args.redis, "prefix", prefix))
        return target, lambda: drop_keys(redis, prefix)

    def measure(self, engine: str, sessions: int) -> EngineRun:
        """One engine at one scale in a fresh namespace, dropped even when the run fails."""
        self.runs += 1
        namespace = f"{self.token}_{engine.replace('-', '_')}_{self.runs}"
        args = self.args
        drop: Callable[[], Coroutine[Any, Any, None]] | None = None
        try:
            target, drop = self.target(engine, namespace)
            return measure_target(
                engine,
                target,
                sessions,
                args.messages,
                args.concurrency,
                args.read_rounds,
                label=LABELS[engine],
            )
        finally:
            if drop is not None:
                try:
                    asyncio.run(drop())
                except Exception as exc:  # keep the run's own error; say what is left
                    print(
                        f"  could not remove {namespace} ({engine}): {exc!r}; drop it by hand",
                        file=sys.stderr,
                        flush=True,
                    )


# --- the servers' description -----------------------------------------------------------


async def _postgres_info(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(driver_url(url))
    try:
        [(server, sync)] = await conn.fetch(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit')"
        )
    finally:
        await conn.close()
    return {"server": f"PostgreSQL {server}", "at": _host(url), "synchronous_commit": sync}


async def _redis_info(url: str) -> dict[str, str]:
    client = Redis.from_url(driver_url(url))
    try:
        info = await client.info("server")
        persistence = await client.info("persistence")
    finally:
        await client.aclose()
    aof = "yes" if persistence.get("aof_enabled") else "no"
    return {"server": f"Redis {info['redis_version']}", "at": _host(url), "appendonly": aof}


def servers(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """What each server in use is, and the setting that decides its append rate."""
    found: dict[str, dict[str, str]] = {}
    if {"raw-pg", "postgresql"} & set(args.engines):
        found["postgresql"] = asyncio.run(_postgres_info(args.postgres))
    if {"raw-redis", "redis"} & set(args.engines):
        found["redis"] = asyncio.run(_redis_info(args.redis))
    return found


# --- output ----------------------------------------------------------------------------


def render(report: dict[str, Any], runs: dict[int, dict[str, EngineRun]]) -> str:
    config, env = report["config"], report["environment"]
    lines = [
        f"server benchmark: {config['messages']} messages per session, one append_message "
        f"call each, {config['concurrency']} tasks, pools of {config['pool_size']} "
        f"connections, best of {config['repeat']}, {config['read_rounds']} read passes",
        f"python {env['python']}, asyncpg {env['asyncpg']}, redis-py {env['redis-py']}, "
        f"{env['cpus']} CPUs, {env['platform']}",
    ]
    for server in env["servers"].values():
        settings = ", ".join(f"{k} {v}" for k, v in server.items() if k not in ("server", "at"))
        lines.append(f"{server['server']} at {server['at']} ({settings})")
    for scale in report["scales"]:
        n = scale["sessions"]
        reads = n * config["read_rounds"]
        lines.append("")
        lines.append(
            f"== {n} sessions: {n * config['messages']:,} appends, {reads:,} full reads "
            f"(limit {max(100, config['messages'])}), {reads:,} last-10 reads"
        )
        lines += table_lines(scale["engines"], LABELS, "ratio vs raw driver")
        lines += target_lines(scale["targets"])
    lines.append("")
    lines += resource_lines(runs, LABELS)
    lines += growth_lines(report["growth"], LABELS)
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = workload_parser(
        "python -m bench.servers",
        "Append and read throughput of sessionkeeper on PostgreSQL and Redis beside the raw "
        "asyncpg and redis.asyncio drivers.",
        ENGINES,
        "raw-pg and raw-redis are the baselines the ratios need",
        sessions=(1000,),
    )
    parser.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        help=f"PostgreSQL server; each run adds ?schema= of its own (default: {DEFAULT_POSTGRES})",
    )
    parser.add_argument(
        "--redis",
        default=DEFAULT_REDIS,
        help=f"Redis server; each run adds ?prefix= of its own (default: {DEFAULT_REDIS})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runner = Runner(args)
    scales: list[int] = sorted(set(args.sessions))
    report: dict[str, Any] = {
        "config": {
            "sessions": scales,
            "messages": args.messages,
            "concurrency": args.concurrency,
            "engines": args.engines,
            "repeat": args.repeat,
            "read_rounds": args.read_rounds,
            "pool_size": runner.pool_size,
            "baselines": {engine: BASELINES[engine] for engine in args.engines},
        },
        "environment": {
            "python": platform.python_version(),
            "asyncpg": version("asyncpg"),
            "redis-py": version("redis"),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "servers": servers(args),
        },
    }
    report["scales"], runs = run_scales(
        scales,
        args.engines,
        args.repeat,
        runner.measure,
        baselines=BASELINES,
        sessionless=SESSIONLESS,
        targets=TARGETS,
    )
    report["growth"] = growth(runs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
