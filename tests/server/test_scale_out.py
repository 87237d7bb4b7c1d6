"""Two `serve` processes on one PostgreSQL schema, and on one Redis prefix: what is written
through one is read through the other, and an If-Match race across them has one winner."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import httpx
import pytest

from sessionkeeper import Settings, open_store
from sessionkeeper.keys import create_key
from tests.contract.namespaces import drop_namespace

from .processes import Served

pytestmark = pytest.mark.server

URLS = {
    "postgresql": "postgresql://127.0.0.1:5432/test?schema={ns}",
    "redis": "redis://127.0.0.1:6379/0?prefix={ns}:",
}
ROUNDS = 20


@pytest.fixture(params=sorted(URLS))
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    made = URLS[request.param].format(ns=f"sk_http_{secrets.token_hex(4)}")
    yield made
    drop_namespace(made)


async def _admin_key(url: str) -> str:
    async with open_store(url, settings=Settings(url=url)) as store:
        return (await create_key(store, tenant="default", role="admin"))[1]


def test_two_servers_share_one_store(url: str) -> None:
    token = asyncio.run(_admin_key(url))
    servers = [Served(url), Served(url)]  # both start at once
    try:
        for server in servers:
            server.wait_ready()
        asyncio.run(_across(servers[0].base, servers[1].base, token))
    finally:
        for server in servers:
            server.stop()


async def _across(one_url: str, two_url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=one_url, headers=headers) as one,
        httpx.AsyncClient(base_url=two_url, headers=headers) as two,
    ):
        created = await one.post("/v1/sessions", json={"owner": "alice", "state": {"n": 0}})
        assert created.status_code == 201
        sid = created.json()["id"]
        assert (await two.get(f"/v1/sessions/{sid}")).json() == created.json()

        # appends through both at once: one gap-free sequence, read back through either
        bodies = [{"messages": [{"role": "user", "content": i}]} for i in range(20)]
        sends = [
            (one if i % 2 else two).post(f"/v1/sessions/{sid}/messages", json=body)
            for i, body in enumerate(bodies)
        ]
        assert {r.status_code for r in await asyncio.gather(*sends)} == {201}
        read = (await one.get(f"/v1/sessions/{sid}/messages", params={"limit": 100})).json()
        assert [m["seq"] for m in read] == list(range(1, 21))
        assert sorted(m["content"] for m in read) == list(range(20))

        merge = {"content-type": "application/merge-patch+json"}
        for round_ in range(ROUNDS):
            etag = (await two.get(f"/v1/sessions/{sid}")).headers["etag"]
            racers = [
                client.patch(
                    f"/v1/sessions/{sid}/state",
                    content=f'{{"n": {round_}, "by": "{name}"}}'.encode(),
                    headers={**merge, "if-match": etag},
                )
                for name, client in (("one", one), ("two", two))
            ]
            results = await asyncio.gather(*racers)
            assert sorted(r.status_code for r in results) == [200, 412], [r.text for r in results]
            winner = next(r for r in results if r.status_code == 200)
            state = (await one.get(f"/v1/sessions/{sid}")).json()["state"]
            assert state == winner.json()["state"]
            assert state["n"] == round_
