"""The guards benchmark: rate-limit hits per second on every engine, beside ``limits``.

Each run sends ``--hits`` hits on ``--keys`` keys (a limit of ``--limit`` per
``--window`` seconds each, so most keys fill up and later hits are refused) from
``--concurrency`` tasks, through ``store.hit``, on each engine in turn. The peer is the
``limits`` library's moving-window limiter (an exact log, like ours) on the same Redis
server through redis-py, with the same keys, limit, window and concurrency, in the same
run. The target: sessionkeeper on Redis at least as fast as ``limits`` on Redis.

Every run uses a fresh key prefix, schema or folder, dropped afterwards. Both limiters
must admit exactly ``limit`` hits per key (checked), so a fast wrong answer fails the run.

    python -m bench.guards [--hits 20000] [--keys 50] [--engines memory,sqlite,...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from sessionkeeper import Settings, open_store

ENGINES = ("memory", "sqlite", "postgresql", "redis", "limits-redis")
POSTGRES = "postgresql://127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"


async def _drive(
    hit: Callable[[str], Awaitable[bool]], keys: list[str], hits: int, concurrency: int
) -> tuple[float, dict[str, int]]:
    """Send ``hits`` hits round-robin over ``keys`` from ``concurrency`` tasks; return
    the seconds taken and how many each key admitted."""
    admitted = dict.fromkeys(keys, 0)
    next_hit = iter(range(hits))

    async def worker() -> None:
        for i in next_hit:
            key = keys[i % len(keys)]
            if await hit(key):
                admitted[key] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, admitted


async def run_store(url: str, args: argparse.Namespace, keys: list[str]) -> tuple[float, Any]:
    async with open_store(url, settings=Settings(url=url, max_rate_limit=args.limit)) as store:

        async def hit(key: str) -> bool:
            return (await store.hit(key, args.limit, args.window)).allowed

        return await _drive(hit, keys, args.hits, args.concurrency)


async def run_limits(prefix: str, args: argparse.Namespace, keys: list[str]) -> tuple[float, Any]:
    storage = RedisStorage(
        "async+" + REDIS, implementation="redispy", key_prefix=prefix.rstrip(":")
    )
    limiter = MovingWindowRateLimiter(storage)
    item = RateLimitItemPerSecond(args.limit, args.window)

    async def hit(key: str) -> bool:
        return await limiter.hit(item, key)

    try:
        return await _drive(hit, keys, args.hits, args.concurrency)
    finally:
        await storage.reset()


async def drop_redis(prefix: str) -> None:
    client = Redis.from_url(REDIS)
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


async def run_engine(name: str, args: argparse.Namespace, folder: Path) -> tuple[float, Any]:
    keys = [f"user:{i}" for i in range(args.keys)]
    tag = f"bench_{secrets.token_hex(4)}"
    if name == "memory":
        return await run_store("memory://", args, keys)
    if name == "sqlite":
        return await run_store(f"sqlite:///{folder / (tag + '.db')}", args, keys)
    if name == "postgresql":
        try:
            return await run_store(f"{POSTGRES}?schema={tag}", args, keys)
        finally:
            conn = await asyncpg.connect(POSTGRES)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{tag}" CASCADE')
            finally:
                await conn.close()
    try:
        if name == "redis":
            return await run_store(f"{REDIS}?prefix={tag}:", args, keys)
        return await run_limits(f"{tag}:", args, keys)
    finally:
        await drop_redis(f"{tag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=20_000, help="hits per engine")
    parser.add_argument("--keys", type=int, default=50, help="distinct rate-limit keys")
    parser.add_argument("--limit", type=int, default=100, help="hits allowed per window")
    parser.add_argument("--window", type=int, default=60, help="window, seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="asyncio tasks")
    parser.add_argument("--repeat", type=int, default=1, help="runs per engine; best kept")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sk-bench-guards-") as tmp:
        for round_ in range(args.repeat):
            for name in engines:
                print(f"[{round_ + 1}/{args.repeat}] {name} ...", file=sys.stderr, flush=True)
                seconds, admitted = asyncio.run(run_engine(name, args, Path(tmp)))
                expected = min(args.limit, -(-args.hits // args.keys))
                wrong = {k: n for k, n in admitted.items() if n != expected}
                if wrong:
                    print(f"error: {name} admitted {wrong}, not {expected} each", file=sys.stderr)
                    return 1
                rate = args.hits / seconds
                best[name] = max(best.get(name, 0.0), rate)
    peer = best.get("limits-redis")
    rows = [
        {
            "engine": name,
            "hits_per_s": round(rate),
            "vs_limits_redis": None if peer is None else round(rate / peer, 2),
        }
        for name, rate in best.items()
    ]
    verdict = None
    if peer is not None and "redis" in best:
        verdict = "MET" if best["redis"] >= peer else "MISSED"
    if args.json:
        document = {
            "workload": {k: getattr(args, k) for k in ("hits", "keys", "limit", "window")}
            | {"concurrency": args.concurrency, "repeat": args.repeat},
            "versions": {"limits": version("limits"), "redis": version("redis")},
            "cpus": os.cpu_count(),
            "results": rows,
            "target_redis_vs_limits": verdict,
        }
        print(json.dumps(document, indent=2))
        return 0
    print(
        f"{args.hits} hits on {args.keys} keys, {args.limit} per {args.window} s, "
        f"{args.concurrency} tasks, best of {args.repeat}"
    )
    print(f"{'engine':<14}{'hits/s':>10}{'vs limits':>11}")
    for row in rows:
        ratio = "" if row["vs_limits_redis"] is None else f"{row['vs_limits_redis']:.2f}x"
        print(f"{row['engine']:<14}{row['hits_per_s']:>10}{ratio:>11}")
    if verdict is not None:
        print(f"target: redis hits >= limits' moving window on Redis: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
