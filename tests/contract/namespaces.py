"""Dropping what a test left in its namespace, with the raw drivers (not sessionkeeper)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import Redis


def drop_namespace(url: str) -> None:
    """Remove the PostgreSQL schema or the Redis keys named in ``url``; files and memory
    need nothing (pytest removes the temporary folder)."""
    scheme = urlsplit(url).scheme
    if scheme.startswith("postgres"):
        asyncio.run(_drop_schema(url))
    elif scheme.startswith("redis"):
        asyncio.run(_drop_keys(url))


def _option(url: str, name: str) -> str:
    values = parse_qs(urlsplit(url).query).get(name)
    if not values:
        raise ValueError(f"{url} has no {name}= option")
    return values[0]


async def _drop_schema(url: str) -> None:
    import asyncpg

    parts = urlsplit(url)
    schema = _option(url, "schema")
    conn = await asyncpg.connect(parts._replace(query="").geturl())
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _drop_keys(url: str) -> None:
    from redis.asyncio import RedisCluster

    parts = urlsplit(url)
    prefix = _option(url, "prefix")
    plain = parts._replace(query="").geturl()
    if parse_qs(parts.query).get("cluster") == ["true"]:
        cluster = RedisCluster.from_url(plain)
        try:
            await cluster.initialize()
            nodes = [(node.host, node.port) for node in cluster.get_nodes()]
        finally:
            await cluster.aclose()
        for host, port in nodes:  # each node holds its own keys: scan every one
            await _drop_node_keys(Redis(host=host, port=int(port)), prefix)
        return
    await _drop_node_keys(Redis.from_url(plain), prefix)


async def _drop_node_keys(client: Redis, prefix: str) -> None:
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=500):
            await client.unlink(key)
    finally:
        await client.aclose()
