"""The admin page over HTTP: its files, and its one JSON route (sessions created and
completed per day) with own, other, no and wrong keys."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sessionkeeper import FrozenClock
from sessionkeeper.server import create_app, ui
from sessionkeeper.store import SessionStore

from .conftest import Keys, client_of, settings

DAY = 86_400.0


@pytest.fixture
def ui_app(store: SessionStore) -> FastAPI:
    return create_app(store, routers=[ui.router])


@pytest.fixture
async def anonymous(ui_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(ui_app) as client:
        yield client


def past(store: SessionStore, tenant: str, clock: FrozenClock) -> SessionStore:
    """A view of ``store``'s engine in ``tenant`` whose time is ``clock``'s."""
    return SessionStore(store.engine, tenant=tenant, settings=settings(), clock=clock)


def day_of(timestamp: float, utc_offset: int = 0) -> str:
    return (
        datetime.fromtimestamp(timestamp, timezone(timedelta(minutes=utc_offset)))
        .date()
        .isoformat()
    )


async def daily(client: httpx.AsyncClient, **params: Any) -> dict[str, dict[str, int]]:
    response = await client.get("/ui/api/daily", params=params)
    assert response.status_code == 200, response.text
    return {
        d["day"]: {"created": d["created"], "completed": d["completed"]}
        for d in response.json()["days"]
    }


# --- the page's files --------------------------------------------------------------------


async def test_page_is_served_without_a_key(anonymous: httpx.AsyncClient) -> None:
    moved = await anonymous.get("/ui")
    assert moved.status_code == 307
    assert moved.headers["location"] == "ui/"  # relative: the page works mounted anywhere

    page = await anonymous.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<script src="app.js" defer></script>' in page.text

    script = await anonymous.get("/ui/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    style = await anonymous.get("/ui/app.css")
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    assert (await anonymous.get("/ui/other.js")).status_code == 404


async def test_page_needs_nothing_from_elsewhere(anonymous: httpx.AsyncClient) -> None:
    for name in ("ui/", "ui/app.js", "ui/app.css"):
        text = (await anonymous.get(f"/{name}")).text
        # the SVG namespace is a name, not an address the page loads
        addresses = set(re.findall(r"[a-z]+://[^\s\"'`)]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not addresses, (name, addresses)
        assert "<script>" not in text  # no inline script: the CSP would refuse it


async def test_script_builds_the_page_from_text_only(anonymous: httpx.AsyncClient) -> None:
    script = (await anonymous.get("/ui/app.js")).text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    # the key goes out as a header; what is put in URLs never names it
    assert "sessionStorage" in script
    assert "Authorization: `Bearer ${key" in script
    assert "localStorage" not in script


async def test_only_the_json_route_is_in_the_schema(ui_app: FastAPI) -> None:
    paths = ui_app.openapi()["paths"]
    assert "/ui/api/daily" in paths
    assert not [p for p in paths if p.startswith("/ui") and p != "/ui/api/daily"]


# --- sessions created and completed per day -----------------------------------------------


async def test_daily_counts_created_and_completed_per_day(
    ui_app: FastAPI, store: SessionStore, keys: Keys
) -> None:
    now = time.time()
    clock = FrozenClock(now - 3 * DAY)
    alpha = past(store, "alpha", clock)
    await alpha.open()
    created = []
    for back in (3, 3, 2, 0.01):
        clock.set(now - back * DAY)
        created.append((await alpha.create_session(owner="alice")).id)
    clock.set(now - 1 * DAY)
    await alpha.update_session(created[0], status="completed")
    clock.set(now - 20 * DAY)  # outside the 14 days
    await alpha.create_session(owner="old")

    async with client_of(ui_app, keys.alpha) as client:
        found = await daily(client)
    assert len(found) == 14
    assert list(found) == sorted(found)
    assert list(found)[-1] == datetime.now(UTC).date().isoformat()
    expected_created = Counter(day_of(now - back * DAY) for back in (3, 3, 2, 0.01))
    expected_completed = Counter({day_of(now - DAY): 1})
    assert {d: c["created"] for d, c in found.items() if c["created"]} == expected_created
    assert {d: c["completed"] for d, c in found.items() if c["completed"]} == expected_completed

    async with client_of(ui_app, keys.alpha) as client:
        found = await daily(client, days=3)
    assert len(found) == 3


async def test_daily_days_follow_the_utc_offset(
    ui_app: FastAPI, store: SessionStore, keys: Keys
) -> None:
    today = datetime.now(UTC).date()
    at = datetime.combine(today, datetime.min.time(), UTC).timestamp() - 1800
    # 23:30 UTC yesterday: today an hour east of UTC
    alpha = past(store, "alpha", FrozenClock(at))
    await alpha.open()
    await alpha.create_session()
    async with client_of(ui_app, keys.alpha) as client:
        utc = await daily(client)
        east = await daily(client, utc_offset=60)
        west = await daily(client, utc_offset=-300)
    assert day_of(at, 60) != day_of(at)
    assert utc[day_of(at)]["created"] == 1
    assert east[day_of(at, 60)]["created"] == 1
    assert west[day_of(at, -300)]["created"] == 1
    assert sum(d["created"] for d in east.values()) == 1


async def test_daily_sees_only_the_keys_tenant(
    ui_app: FastAPI, store: SessionStore, keys: Keys
) -> None:
    alpha = store.for_tenant("alpha")
    for _ in range(3):
        await alpha.create_session()
    await store.for_tenant("beta").create_session(status="completed")
    today = datetime.now(UTC).date().isoformat()

    async with client_of(ui_app, keys.alpha) as client:
        assert (await daily(client))[today] == {"created": 3, "completed": 0}
        denied = await client.get("/ui/api/daily", params={"tenant": "beta"})
        assert denied.status_code == 403
        assert denied.headers["content-type"] == "application/problem+json"
    async with client_of(ui_app, keys.beta) as client:
        assert (await daily(client))[today] == {"created": 1, "completed": 1}
        assert (await client.get("/ui/api/daily", params={"tenant": "alpha"})).status_code == 403
    async with client_of(ui_app, keys.admin) as client:  # an admin key bound to alpha
        assert (await daily(client))[today] == {"created": 3, "completed": 0}
        assert (await daily(client, tenant="beta"))[today] == {"created": 1, "completed": 1}


async def test_daily_needs_a_good_key(ui_app: FastAPI, anonymous: httpx.AsyncClient) -> None:
    missing = await anonymous.get("/ui/api/daily")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = "sk_0123456789abcdef_" + "x" * 43
    async with client_of(ui_app, wrong) as client:
        assert (await client.get("/ui/api/daily")).status_code == 401


@pytest.mark.parametrize(
    "params",
    [{"days": 0}, {"days": 91}, {"utc_offset": 841}, {"utc_offset": -841}, {"days": "x"}],
)
async def test_daily_refuses_bad_parameters(
    ui_app: FastAPI, keys: Keys, params: dict[str, Any]
) -> None:
    async with client_of(ui_app, keys.alpha) as client:
        response = await client.get("/ui/api/daily", params=params)
    assert response.status_code == 422
    assert response.json()["field"] in {"query.days", "query.utc_offset"}


async def test_every_route_the_script_calls_is_in_the_api(
    ui_app: FastAPI, anonymous: httpx.AsyncClient
) -> None:
    script = (await anonymous.get("/ui/app.js")).text
    called = set(re.findall(r'"\.\./(v1/[a-z/-]+)', script))  # up to any ${...}
    assert {"v1/admin/doctor", "v1/admin/check", "v1/admin/archive"} <= called
    paths = {p.lstrip("/") for p in ui_app.openapi()["paths"]}
    assert not [p for p in called if p not in paths and not p.endswith("/")], called - paths


async def test_operations_view_is_for_admin_keys(anonymous: httpx.AsyncClient) -> None:
    page = (await anonymous.get("/ui/")).text
    # hidden until an admin key signs in; the server refuses other keys (403) anyway
    assert re.search(r'<button id="tab-operations"[^>]*\bhidden\b', page)
    assert re.search(r'<div id="view-operations"[^>]*\bhidden\b', page)
    script = (await anonymous.get("/ui/app.js")).text
    assert 'show($("tab-operations"), me.role === "admin")' in script
