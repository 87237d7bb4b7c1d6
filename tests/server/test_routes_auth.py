"""Every /v1 route, four ways: with a key of its own tenant, a key of another tenant, no
key and a wrong key. The table below must name every route of the app, so a new route
cannot go untested."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sessionkeeper import open_store
from sessionkeeper.server import create_app
from sessionkeeper.store import SessionStore

from .conftest import Keys, client_of

MARK = "owner-alpha-7f3a"  # appears in alpha's data only: no response to beta may hold it
TOKENS = 777_777  # alpha's budget for MARK
MERGE = {"content-type": "application/merge-patch+json"}


@dataclass
class Data:
    """What tenant alpha holds before each call."""

    session: str
    folder: str


@dataclass
class Call:
    method: str
    url: str
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    ok: int = 200  # the status with a key of the data's own tenant
    admin: bool = False  # the route is admin-only: "own" is alpha's admin key
    other: int | None = None  # the status for beta's key (None: same as ok)
    # the call names MARK itself, so beta's answer may echo it; then this checks that
    # beta's answer shows none of alpha's records
    fresh: Callable[[Any], bool] | None = None


Case = Callable[[Data], Call]

ROUTES: dict[tuple[str, str], Case] = {
    ("POST", "/v1/sessions"): lambda d: Call(
        "POST", "/v1/sessions", {"id": d.session, "owner": "x"}, ok=409, other=201
    ),
    ("GET", "/v1/sessions"): lambda d: Call("GET", "/v1/sessions"),
    ("GET", "/v1/session-count"): lambda d: Call("GET", f"/v1/session-count?owner={MARK}"),
    ("GET", "/v1/sessions/{session_id}"): lambda d: Call(
        "GET", f"/v1/sessions/{d.session}", other=404
    ),
    ("PATCH", "/v1/sessions/{session_id}"): lambda d: Call(
        "PATCH", f"/v1/sessions/{d.session}", {"title": "t"}, other=404
    ),
    ("DELETE", "/v1/sessions/{session_id}"): lambda d: Call(
        "DELETE", f"/v1/sessions/{d.session}", ok=204, other=404
    ),
    ("PATCH", "/v1/sessions/{session_id}/state"): lambda d: Call(
        "PATCH", f"/v1/sessions/{d.session}/state", {"a": 1}, MERGE, other=404
    ),
    ("PUT", "/v1/sessions/{session_id}/state"): lambda d: Call(
        "PUT", f"/v1/sessions/{d.session}/state", {"a": 1}, other=404
    ),
    ("POST", "/v1/sessions/{session_id}/change"): lambda d: Call(
        "POST",
        f"/v1/sessions/{d.session}/change",
        {"step": "s", "messages": [{"role": "user", "content": "c"}]},
        other=404,
    ),
    ("POST", "/v1/sessions/{session_id}/messages"): lambda d: Call(
        "POST",
        f"/v1/sessions/{d.session}/messages",
        {"messages": [{"role": "user", "content": "c"}]},
        ok=201,
        other=404,
    ),
    ("GET", "/v1/sessions/{session_id}/messages"): lambda d: Call(
        "GET", f"/v1/sessions/{d.session}/messages?last=5", other=404
    ),
    ("DELETE", "/v1/sessions/{session_id}/messages/last"): lambda d: Call(
        "DELETE", f"/v1/sessions/{d.session}/messages/last", other=404
    ),
    ("DELETE", "/v1/sessions/{session_id}/messages"): lambda d: Call(
        "DELETE", f"/v1/sessions/{d.session}/messages", other=404
    ),
    ("POST", "/v1/folders"): lambda d: Call(
        "POST",
        "/v1/folders",
        {"name": "work", "owner": MARK},
        ok=409,
        other=201,
        fresh=lambda body: body["session_count"] == 0,
    ),
    ("GET", "/v1/folders"): lambda d: Call("GET", "/v1/folders"),
    ("GET", "/v1/folders/{folder_id}"): lambda d: Call("GET", f"/v1/folders/{d.folder}", other=404),
    ("PATCH", "/v1/folders/{folder_id}"): lambda d: Call(
        "PATCH", f"/v1/folders/{d.folder}", {"name": "home"}, other=404
    ),
    ("DELETE", "/v1/folders/{folder_id}"): lambda d: Call(
        "DELETE", f"/v1/folders/{d.folder}", other=404
    ),
    ("GET", "/v1/stats"): lambda d: Call("GET", "/v1/stats"),
    ("GET", "/v1/analytics"): lambda d: Call("GET", "/v1/analytics"),
    ("POST", "/v1/rate-limits/hit"): lambda d: Call(
        "POST",
        "/v1/rate-limits/hit",
        {"key": MARK, "limit": 1, "window": 60},
        fresh=lambda body: body["allowed"],  # alpha used the one hit up
    ),
    ("POST", "/v1/logins/failed"): lambda d: Call(
        "POST", "/v1/logins/failed", {"account": MARK}, fresh=lambda body: body["failures"] == 1
    ),
    ("POST", "/v1/logins/succeeded"): lambda d: Call(
        "POST", "/v1/logins/succeeded", {"account": MARK}, ok=204
    ),
    ("POST", "/v1/logins/unlock"): lambda d: Call("POST", "/v1/logins/unlock", {"account": MARK}),
    ("GET", "/v1/logins/status"): lambda d: Call(
        "GET", f"/v1/logins/status?account={MARK}", fresh=lambda body: body["failures"] == 0
    ),
    ("GET", "/v1/logins"): lambda d: Call("GET", "/v1/logins"),
    ("PUT", "/v1/budgets"): lambda d: Call(
        "PUT", "/v1/budgets", {"owner": MARK, "cost": 1.5}, fresh=lambda b: b["token_limit"] is None
    ),
    ("GET", "/v1/budgets"): lambda d: Call(
        "GET", f"/v1/budgets?owner={MARK}", fresh=lambda body: body["token_limit"] is None
    ),
    ("GET", "/v1/me"): lambda d: Call("GET", "/v1/me"),
    ("GET", "/v1/admin/tenants"): lambda d: Call("GET", "/v1/admin/tenants", admin=True, other=403),
    ("POST", "/v1/admin/purge"): lambda d: Call("POST", "/v1/admin/purge", admin=True, other=403),
    ("GET", "/v1/admin/export"): lambda d: Call("GET", "/v1/admin/export", admin=True, other=403),
    ("POST", "/v1/admin/check"): lambda d: Call("POST", "/v1/admin/check", admin=True, other=403),
    ("GET", "/v1/admin/doctor"): lambda d: Call("GET", "/v1/admin/doctor", admin=True, other=403),
    ("POST", "/v1/admin/archive"): lambda d: Call(
        "POST", "/v1/admin/archive", {"older_than": "90d", "dry_run": True}, admin=True, other=403
    ),
    ("POST", "/v1/admin/restore"): lambda d: Call(
        "POST",
        "/v1/admin/restore",
        {"session_id": d.session, "dry_run": True},
        admin=True,
        other=403,
    ),
    ("POST", "/v1/admin/purge-sessions"): lambda d: Call(
        "POST",
        "/v1/admin/purge-sessions",
        {"older_than": "365d", "dry_run": True},
        admin=True,
        other=403,
    ),
    ("GET", "/v1/admin/webhooks/deliveries"): lambda d: Call(
        "GET", "/v1/admin/webhooks/deliveries", admin=True, other=403
    ),
    ("POST", "/v1/admin/webhooks/deliveries/{delivery_id}/redeliver"): lambda d: Call(
        "POST", f"/v1/admin/webhooks/deliveries/{'0' * 24}/redeliver", admin=True, ok=404, other=403
    ),
}


def app_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every /v1 operation of the app, read from its OpenAPI schema (every route of the
    API is in it: the schema test checks them all against it)."""
    return sorted(
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/v1")
        for method in operations
    )


ALL_ROUTES = app_routes(create_app(open_store("memory://")))


def test_the_table_names_every_route_and_no_other() -> None:
    assert sorted(ROUTES) == ALL_ROUTES


async def _seed(store: SessionStore) -> Data:
    alpha = store.for_tenant("alpha")
    folder = await alpha.create_folder("work", owner=MARK)
    session = await alpha.create_session(owner=MARK, folder=folder.id, title=MARK)
    await alpha.append_message(session.id, "user", MARK)
    await alpha.login_failed(account=MARK)
    await alpha.hit(MARK, 1, 60)
    await alpha.set_budget(owner=MARK, tokens=TOKENS)
    return Data(session=session.id, folder=folder.id)


async def _send(client: httpx.AsyncClient, call: Call) -> httpx.Response:
    return await client.request(call.method, call.url, json=call.json, headers=call.headers)


def _token(who: str, keys: Keys, call: Call) -> str | None:
    if who == "own":
        return keys.admin if call.admin else keys.alpha
    if who == "other":
        return keys.beta
    if who == "wrong":
        return keys.alpha[:-4] + "AAAA"  # a real key id, a wrong secret
    return None


class Runner:
    """Seeds alpha's data, then sends the route's call with one of the keys."""

    def __init__(self, app: FastAPI, store: SessionStore, keys: Keys, route: tuple[str, str]):
        self.app, self.store, self.keys, self.route = app, store, keys, route
        self.data: Data | None = None

    async def __call__(self, who: str, missing: bool = False) -> tuple[Call, httpx.Response]:
        if self.data is None:
            self.data = await _seed(self.store)
        call = ROUTES[self.route](self.data)
        if missing:  # the same call about a session and a folder that do not exist
            call = ROUTES[self.route](Data(session="no-such-id", folder="no-such-id"))
        async with client_of(self.app, _token(who, self.keys, call)) as client:
            return call, await _send(client, call)


@pytest.fixture
def run(app: FastAPI, store: SessionStore, keys: Keys, request: pytest.FixtureRequest) -> Runner:
    return Runner(app, store, keys, request.param)


@pytest.mark.parametrize("run", ALL_ROUTES, indirect=True, ids=" ".join)
async def test_own_tenant(run: Runner) -> None:
    call, response = await run("own")
    assert response.status_code == call.ok, response.text


@pytest.mark.parametrize("run", ALL_ROUTES, indirect=True, ids=" ".join)
async def test_other_tenant_sees_nothing(run: Runner) -> None:
    call, response = await run("other")
    expected = call.ok if call.other is None else call.other
    assert response.status_code == expected, response.text
    assert str(TOKENS) not in response.text
    if call.fresh is None:
        assert MARK not in response.text
    else:
        assert call.fresh(response.json()), response.text
    if expected == 404:  # word for word what a session or folder that does not exist gets
        _, missing = await run("other", missing=True)
        assert missing.status_code == 404
        seen = response.text.replace(call.url.split("/")[3], "no-such-id")
        assert seen == missing.text


@pytest.mark.parametrize("run", ALL_ROUTES, indirect=True, ids=" ".join)
async def test_no_key(run: Runner) -> None:
    _, response = await run("none")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("run", ALL_ROUTES, indirect=True, ids=" ".join)
async def test_wrong_key(run: Runner) -> None:
    _, response = await run("wrong")
    assert response.status_code == 401
    assert MARK not in response.text
