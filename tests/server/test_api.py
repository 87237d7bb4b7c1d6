"""The HTTP API over a memory store: what each route does, ETag and If-Match, errors as
problem details, limits on what a request may send, auth, metrics and logs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from sessionkeeper import FrozenClock, Settings, open_store
from sessionkeeper.keys import create_key, revoke_key
from sessionkeeper.server import create_app
from sessionkeeper.store import SessionStore
from sessionkeeper.transfer import import_file

from .conftest import Keys, app_with, client_of, settings

MERGE = {"content-type": "application/merge-patch+json"}


def problem(response: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["detail"]
    if kind is not None:
        assert body["type"] == f"urn:sessionkeeper:problem:{kind}"
    return body


async def new_session(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/sessions", json=fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


# --- sessions --------------------------------------------------------------------------


async def test_create_get_update_delete(alpha: httpx.AsyncClient) -> None:
    response = await alpha.post(
        "/v1/sessions", json={"owner": "alice", "title": "Trip", "state": {"a": 1}, "step": "x"}
    )
    assert response.status_code == 201
    created = response.json()
    assert response.headers["etag"] == '"1"'
    assert response.headers["location"] == f"/v1/sessions/{created['id']}"
    assert created["tenant"] == "alpha"
    assert created["state"] == {"a": 1}

    got = await alpha.get(f"/v1/sessions/{created['id']}")
    assert got.json() == created
    assert got.headers["etag"] == '"1"'

    patched = await alpha.patch(
        f"/v1/sessions/{created['id']}", json={"title": "Lisbon", "step": None}
    )
    assert patched.status_code == 200
    assert patched.headers["etag"] == '"2"'
    assert (patched.json()["title"], patched.json()["step"], patched.json()["owner"]) == (
        "Lisbon",
        None,
        "alice",
    )

    assert (await alpha.delete(f"/v1/sessions/{created['id']}")).status_code == 204
    problem(await alpha.get(f"/v1/sessions/{created['id']}"), 404, "not-found")


async def test_a_taken_id_is_409(alpha: httpx.AsyncClient) -> None:
    await new_session(alpha, id="s-1")
    problem(await alpha.post("/v1/sessions", json={"id": "s-1"}), 409, "conflict")


async def test_list_pages_with_a_cursor_and_count(alpha: httpx.AsyncClient) -> None:
    ids = [(await new_session(alpha, owner="bob", title=f"t{i}"))["id"] for i in range(5)]
    await new_session(alpha, owner="carol")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"owner": "bob", "limit": 2, "descending": "false"}
        if cursor:
            params["cursor"] = cursor
        page = (await alpha.get("/v1/sessions", params=params)).json()
        seen += [s["id"] for s in page["items"]]
        assert all("state" not in s for s in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert (await alpha.get("/v1/session-count", params={"owner": "bob"})).json() == {"count": 5}
    assert (await alpha.get("/v1/session-count")).json() == {"count": 6}


async def test_listing_filters_are_checked_by_the_store(alpha: httpx.AsyncClient) -> None:
    body = problem(
        await alpha.get("/v1/sessions", params={"created_since": "2024-01-01T00:00:00"}), 422
    )
    assert body["field"] == "created_since"
    problem(await alpha.get("/v1/sessions", params={"limit": 5000}), 422)
    problem(await alpha.get("/v1/sessions", params={"cursor": "nonsense"}), 422)


# --- state, ETag and If-Match ----------------------------------------------------------


async def test_merge_patch_and_replacement(alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha, state={"draft": {"title": "Engineer", "remote": False}, "x": 1})
    url = f"/v1/sessions/{s['id']}/state"
    patched = await alpha.patch(
        url, content=b'{"draft": {"remote": true}, "x": null}', headers=MERGE
    )
    assert patched.status_code == 200
    assert patched.json()["state"] == {"draft": {"title": "Engineer", "remote": True}}
    replaced = await alpha.put(url, json={"only": "this"})
    assert replaced.json()["state"] == {"only": "this"}
    assert replaced.headers["etag"] == '"3"'


async def test_merge_patch_needs_its_media_type(alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha)
    body = problem(await alpha.patch(f"/v1/sessions/{s['id']}/state", json={"a": 1}), 415)
    assert "application/merge-patch+json" in body["detail"]
    problem(
        await alpha.post("/v1/sessions", content=b"{}", headers={"content-type": "text/plain"}),
        415,
    )


async def test_if_match_guards_every_write(alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha, state={"n": 0})
    url = f"/v1/sessions/{s['id']}"
    ok = await alpha.patch(
        f"{url}/state", content=b'{"n": 1}', headers={**MERGE, "if-match": '"1"'}
    )
    assert ok.status_code == 200
    assert ok.headers["etag"] == '"2"'
    writes = [
        ("PATCH", f"{url}/state", {"n": 2}, MERGE),
        ("PUT", f"{url}/state", {"n": 2}, {}),
        ("PATCH", url, {"title": "x"}, {}),
        ("POST", f"{url}/change", {"step": "y"}, {}),
        ("POST", f"{url}/messages", {"messages": [{"role": "user"}]}, {}),
        ("DELETE", f"{url}/messages/last", None, {}),
        ("DELETE", f"{url}/messages", None, {}),
        ("DELETE", url, None, {}),
    ]
    for method, path, body, headers in writes:
        stale = await alpha.request(method, path, json=body, headers={**headers, "if-match": '"1"'})
        found = problem(stale, 412, "precondition-failed")
        assert (found["expected"], found["actual"]) == (1, 2)
    after = (await alpha.get(url)).json()
    assert (after["version"], after["state"], after["message_count"]) == (2, {"n": 1}, 0)
    assert (await alpha.delete(url, headers={"if-match": "*"})).status_code == 204


async def test_if_match_that_cannot_match(alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha)
    url = f"/v1/sessions/{s['id']}"
    problem(await alpha.patch(url, json={}, headers={"if-match": 'W/"1"'}), 412)
    problem(await alpha.patch(url, json={}, headers={"if-match": '"0"'}), 412)
    problem(await alpha.patch(url, json={}, headers={"if-match": '"99999999999999999999"'}), 400)
    problem(await alpha.patch(url, json={}, headers={"if-match": "1"}), 400)
    problem(await alpha.patch(url, json={}, headers={"if-match": '"1", "2"'}), 400)
    assert (await alpha.get(url)).json()["version"] == 1


async def test_a_setting_requires_if_match(keys: Keys, store: SessionStore) -> None:
    async with client_of(await app_with(store, http_require_if_match=True), keys.alpha) as client:
        s = await new_session(client)  # creating needs none
        url = f"/v1/sessions/{s['id']}"
        problem(await client.patch(url, json={"title": "x"}), 428, "precondition-required")
        problem(await client.delete(url), 428)
        assert (
            await client.patch(url, json={"title": "x"}, headers={"if-match": '"1"'})
        ).is_success


# --- the atomic change and messages ----------------------------------------------------


async def test_change_is_all_or_nothing(alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha, state={"a": 1})
    url = f"/v1/sessions/{s['id']}/change"
    response = await alpha.post(
        url,
        json={
            "state_patch": {"b": 2},
            "status": "completed",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        },
    )
    assert response.status_code == 200
    result = response.json()
    assert result["session"]["state"] == {"a": 1, "b": 2}
    assert result["session"]["status"] == "completed"
    assert [m["seq"] for m in result["messages"]] == [1, 2]
    assert response.headers["etag"] == '"2"'
    bad = await alpha.post(
        url, json={"state_patch": {"c": 3}, "messages": [{"role": "user", "cost": -1}]}
    )
    problem(bad, 422)
    after = (await alpha.get(f"/v1/sessions/{s['id']}")).json()
    assert (after["version"], after["state"], after["message_count"]) == (2, {"a": 1, "b": 2}, 2)


async def test_messages_append_read_pop_clear(alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha)
    url = f"/v1/sessions/{s['id']}/messages"
    messages = [
        {"role": "user", "content": f"m{i}", "input_tokens": i, "cost": 0.5} for i in range(1, 13)
    ]
    appended = await alpha.post(url, json={"messages": messages})
    assert appended.status_code == 201
    assert [m["seq"] for m in appended.json()] == list(range(1, 13))
    page = (await alpha.get(url, params={"after_seq": 3, "limit": 4})).json()
    assert [m["seq"] for m in page] == [4, 5, 6, 7]
    last = (await alpha.get(url, params={"last": 10})).json()
    assert [m["seq"] for m in last] == list(range(3, 13))
    assert {
        k: v
        for k, v in (
            await alpha.post(
                url, json={"messages": [{"role": "user", "content": {"rich": [1, 2]}}]}
            )
        )
        .json()[0]
        .items()
        if k in ("role", "content")
    } == {"role": "user", "content": {"rich": [1, 2]}}
    popped = await alpha.delete(f"{url}/last")
    assert popped.json()["seq"] == 13
    cleared = await alpha.delete(url)
    assert cleared.json() == {"removed": 12}
    assert (await alpha.delete(f"{url}/last")).status_code == 204
    session = (await alpha.get(f"/v1/sessions/{s['id']}")).json()
    assert (session["message_count"], session["last_seq"], session["cost"]) == (0, 13, 0.0)


async def test_a_message_without_a_role_names_the_field(alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha)
    body = problem(
        await alpha.post(f"/v1/sessions/{s['id']}/messages", json={"messages": [{"x": 1}]}), 422
    )
    assert body["field"].startswith("messages.0")
    assert body["errors"]


# --- folders, stats, guards ------------------------------------------------------------


async def test_folders(alpha: httpx.AsyncClient) -> None:
    folder = (await alpha.post("/v1/folders", json={"name": "Work", "owner": "alice"})).json()
    problem(await alpha.post("/v1/folders", json={"name": "Work", "owner": "alice"}), 409)
    await new_session(alpha, owner="alice", folder=folder["id"])
    listed = (await alpha.get("/v1/folders", params={"owner": "alice"})).json()
    assert [(f["name"], f["session_count"]) for f in listed] == [("Work", 1)]
    renamed = await alpha.patch(f"/v1/folders/{folder['id']}", json={"name": "Jobs"})
    assert renamed.json()["name"] == "Jobs"
    deleted = await alpha.delete(f"/v1/folders/{folder['id']}", params={"cascade": "true"})
    assert deleted.json() == {"sessions": 1}
    assert (await alpha.get("/v1/session-count")).json() == {"count": 0}


async def test_stats(alpha: httpx.AsyncClient) -> None:
    await new_session(alpha, owner="alice", status="completed")
    await new_session(alpha, owner="alice")
    stats = (await alpha.get("/v1/stats", params={"top": 1})).json()
    assert (stats["total"], stats["completed"], stats["completion_rate"]) == (2, 1, 0.5)
    assert stats["top_owners"] == [{"owner": "alice", "sessions": 2}]
    assert (stats["recently_active"], stats["active_hours"]) == (2, 24.0)
    week = (await alpha.get("/v1/stats", params={"active_hours": 168})).json()
    assert week["active_hours"] == 168.0
    body = problem(await alpha.get("/v1/stats", params={"active_hours": 0}), 422)
    assert body["field"] == "query.active_hours"


async def test_analytics(alpha: httpx.AsyncClient, beta: httpx.AsyncClient) -> None:
    done = await new_session(alpha, owner="alice")
    await alpha.post(
        f"/v1/sessions/{done['id']}/messages",
        json={"messages": [{"role": "user", "content": "hi", "input_tokens": 4, "cost": 0.5}]},
    )
    await alpha.patch(f"/v1/sessions/{done['id']}", json={"status": "completed"})
    await new_session(alpha)
    found = (await alpha.get("/v1/analytics", params={"days": 2})).json()
    assert [p["created"] for p in found["series"]] == [0, 2]
    totals = found["totals"]
    assert (totals["completed"], totals["messages"], totals["cost"]) == (1, 1, 0.5)
    assert [(o["owner"], o["tokens"]) for o in found["owners"]] == [("alice", 4), (None, 0)]
    alone = (await alpha.get("/v1/analytics", params={"no_owner": "true"})).json()
    assert (alone["owner"], alone["totals"]["created"]) == (None, 1)
    months = (await alpha.get("/v1/analytics", params={"group_by": "month", "days": 90})).json()
    assert sum(p["created"] for p in months["series"]) == 2
    assert (await beta.get("/v1/analytics")).json()["totals"]["created"] == 0
    cases: list[tuple[dict[str, Any], str]] = [
        ({"days": 0}, "days"),
        ({"group_by": "year"}, "group_by"),
        ({"until": "yesterday"}, "until"),
        ({"top": -1}, "top"),
    ]
    for params, field in cases:
        body = problem(await alpha.get("/v1/analytics", params=params), 422)
        assert body["field"] == f"query.{field}"
    both = problem(await alpha.get("/v1/analytics", params={"owner": "a", "no_owner": 1}), 422)
    assert both["field"] == "no_owner"


async def test_guards_of_the_tenant(store: SessionStore, keys: Keys) -> None:
    async with client_of(await app_with(store, budgets=True), keys.alpha) as alpha:
        await _guards_of_the_tenant(alpha)


async def _guards_of_the_tenant(alpha: httpx.AsyncClient) -> None:
    hit = {"key": "api:alice", "limit": 2, "window": 60}
    results = [(await alpha.post("/v1/rate-limits/hit", json=hit)).json() for _ in range(3)]
    assert [r["allowed"] for r in results] == [True, True, False]
    assert results[2]["retry_after"] > 0
    for _ in range(5):
        status = (await alpha.post("/v1/logins/failed", json={"account": "alice"})).json()
    assert status["locked"]
    assert (await alpha.get("/v1/logins/status", params={"account": "alice"})).json()["locked"]
    assert [s["who"] for s in (await alpha.get("/v1/logins?locked_only=true")).json()] == [
        "account:alice"
    ]
    assert (await alpha.post("/v1/logins/unlock", json={"account": "alice"})).json() == {
        "removed": 1
    }
    assert (await alpha.post("/v1/logins/succeeded", json={"ip": "10.0.0.1"})).status_code == 204
    usage = await alpha.put("/v1/budgets", json={"owner": "alice", "tokens": 10})
    assert usage.json()["token_limit"] == 10
    s = await new_session(alpha, owner="alice")
    over = await alpha.post(
        f"/v1/sessions/{s['id']}/messages",
        json={"messages": [{"role": "assistant", "output_tokens": 11}]},
    )
    body = problem(over, 429, "budget-exceeded")
    assert int(over.headers["retry-after"]) >= 1
    assert body["scope"] == "owner:alice"
    got = (await alpha.get("/v1/budgets", params={"owner": "alice"})).json()
    assert got["output_tokens"] == 0


async def test_a_session_message_limit_is_429() -> None:
    async with open_store("memory://", settings=settings(session_message_limit=1)) as store:
        _, token = await create_key(store, tenant="alpha")
        async with client_of(create_app(store), token) as client:
            s = await new_session(client)
            url = f"/v1/sessions/{s['id']}/messages"
            assert (await client.post(url, json={"messages": [{"role": "u"}]})).status_code == 201
            limited = await client.post(url, json={"messages": [{"role": "u"}]})
            problem(limited, 429, "rate-limited")
            assert int(limited.headers["retry-after"]) >= 1


# --- what a request may send -----------------------------------------------------------

JSON = {"content-type": "application/json"}


async def test_malformed_json_is_400(alpha: httpx.AsyncClient) -> None:
    body = problem(await alpha.post("/v1/sessions", content=b'{"owner": ', headers=JSON), 400)
    assert body["type"].endswith("malformed-json")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"state": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", 400, "depth"),
        (b'{"state": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}", 422, "deeper"),
        (b'{"state": {"a": 123456789012345678901234567890}}', 422, "64 bits"),
        (b'{"state": {"a": -99999999999999999999}}', 422, "64 bits"),
        (b'{"state": {"a": 1e999}}', 400, "infinity"),
        (b'{"state": {"a": NaN}}', 400, "JSON"),
    ],
)
async def test_deep_nesting_and_huge_numbers_are_refused_cleanly(
    alpha: httpx.AsyncClient, body: bytes, status: int, words: str
) -> None:
    assert (
        words
        in problem(await alpha.post("/v1/sessions", content=body, headers=JSON), status)["detail"]
    )
    assert (await alpha.get("/v1/session-count")).json() == {"count": 0}


async def test_a_big_integer_that_fits_is_kept_exactly(alpha: httpx.AsyncClient) -> None:
    s = await new_session(
        alpha, state={"a": 2**64 - 1, "b": -(2**63), "c": "12345678901234567890123"}
    )
    assert s["state"] == {"a": 2**64 - 1, "b": -(2**63), "c": "12345678901234567890123"}


async def test_a_body_over_the_limit_is_413_before_it_is_read(
    keys: Keys, store: SessionStore
) -> None:
    async with client_of(await app_with(store, http_max_body_bytes=1000), keys.alpha) as client:
        big = b'{"title": "' + b"x" * 5000 + b'"}'
        problem(await client.post("/v1/sessions", content=big, headers=JSON), 413)

        read: list[int] = []

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            for _ in range(1000):
                read.append(1)
                yield b" " * 100

        problem(await client.post("/v1/sessions", content=chunks(), headers=JSON), 413)
        assert len(read) < 20  # refused after ~limit bytes, not after all 100 kB
        ok = await client.post("/v1/sessions", content=b'{"title": "fits"}', headers=JSON)
        assert ok.status_code == 201


async def test_a_content_length_that_is_no_number_is_400(alpha: httpx.AsyncClient) -> None:
    headers = {**JSON, "content-length": "12x"}
    problem(await alpha.post("/v1/sessions", content=b"{}", headers=headers), 400)


async def test_unknown_routes_and_methods_are_problems(alpha: httpx.AsyncClient) -> None:
    problem(await alpha.get("/v2/nothing"), 404)
    problem(await alpha.put("/v1/sessions"), 405)


# --- auth ------------------------------------------------------------------------------


async def test_failed_keys_lock_the_client_out(app: FastAPI, keys: Keys) -> None:
    async with client_of(app, keys.alpha[:-1] + "x") as wrong, client_of(app, keys.alpha) as good:
        for _ in range(5):
            problem(await wrong.get("/v1/me"), 401)
        locked = await good.get("/v1/me")
        body = problem(locked, 429, "locked-out")
        assert int(locked.headers["retry-after"]) > 60
        assert body["retry_after"] > 60
        problem(await wrong.get("/v1/me"), 429)


async def test_only_an_untrusted_peer_is_counted(store: SessionStore, keys: Keys) -> None:
    """Behind a trusted proxy, the client named in X-Forwarded-For is locked, not the proxy."""
    app = await app_with(store, trusted_proxies=["127.0.0.1"])
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(5):
            await client.get(
                "/v1/me",
                headers={"authorization": "Bearer sk_0", "x-forwarded-for": "203.0.113.9"},
            )
        other = await client.get(
            "/v1/me",
            headers={
                "authorization": f"Bearer {keys.alpha}",
                "x-forwarded-for": "198.51.100.1",
            },
        )
        assert other.status_code == 200
        locked = await client.get(
            "/v1/me",
            headers={"authorization": f"Bearer {keys.alpha}", "x-forwarded-for": "203.0.113.9"},
        )
        assert locked.status_code == 429


async def test_a_revoked_key_stops_at_once_without_a_cache(store: SessionStore, keys: Keys) -> None:
    async with client_of(await app_with(store, http_auth_cache_seconds=0), keys.alpha) as alpha:
        me = (await alpha.get("/v1/me")).json()
        assert (me["tenant"], me["role"]) == ("alpha", "tenant")
        await revoke_key(store, me["key_id"])
        problem(await alpha.get("/v1/me"), 401)


async def test_a_revoked_key_stops_when_the_cache_forgets_it(
    store: SessionStore, keys: Keys
) -> None:
    async with client_of(await app_with(store, http_auth_cache_seconds=0.2), keys.alpha) as alpha:
        me = (await alpha.get("/v1/me")).json()
        await revoke_key(store, me["key_id"])
        assert (await alpha.get("/v1/me")).status_code == 200  # still trusted for 0.2 s
        await asyncio.sleep(0.25)
        problem(await alpha.get("/v1/me"), 401)


async def test_tenant_keys_stay_home_and_admin_keys_go_anywhere(
    alpha: httpx.AsyncClient, beta: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    s = await new_session(beta, owner="bob")
    problem(await alpha.get("/v1/sessions", params={"tenant": "beta"}), 403)
    problem(await alpha.get(f"/v1/sessions/{s['id']}"), 404)
    seen = await admin.get(f"/v1/sessions/{s['id']}", params={"tenant": "beta"})
    assert seen.json()["owner"] == "bob"
    assert (await admin.get("/v1/session-count")).json() == {"count": 0}  # its own: alpha
    assert (await alpha.get("/v1/sessions", params={"tenant": "alpha"})).status_code == 200
    problem(await admin.get("/v1/sessions", params={"tenant": ".bad"}), 422)
    problem(await alpha.post("/v1/admin/purge"), 403)


async def test_a_key_rate_limit(store: SessionStore, keys: Keys) -> None:
    async with client_of(await app_with(store, http_rate_limit=3), keys.alpha) as client:
        assert [(await client.get("/v1/me")).status_code for _ in range(3)] == [200] * 3
        refused = await client.get("/v1/me")
        problem(refused, 429, "rate-limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 60


# --- admin: export, purge, tenants -----------------------------------------------------


async def test_export_streams_the_export_format(
    admin: httpx.AsyncClient, alpha: httpx.AsyncClient, beta: httpx.AsyncClient, tmp_path: Path
) -> None:
    s = await new_session(alpha, owner="alice", state={"k": "v"})
    await alpha.post(f"/v1/sessions/{s['id']}/messages", json={"messages": [{"role": "u"}]})
    await alpha.post("/v1/folders", json={"name": "F"})
    await new_session(beta)
    response = await admin.get("/v1/admin/export")
    assert response.headers["content-type"].startswith("application/jsonl")
    lines = [orjson.loads(line) for line in response.content.splitlines()]
    assert lines[0] == {"format": "sessionkeeper-export", "version": 2}
    assert [line["type"] for line in lines[1:]] == ["folder", "session", "daily", "end"]
    assert lines[2]["state"] == {"k": "v"}
    assert lines[2]["messages"][0]["role"] == "u"
    assert (lines[3]["owner"], lines[3]["created"], lines[3]["messages"]) == ("alice", 1, 1)
    assert lines[-1] == {
        "type": "end",
        "tenants": 1,
        "folders": 1,
        "sessions": 1,
        "messages": 1,
        "daily": 1,
    }
    everything = await admin.get("/v1/admin/export", params={"all_tenants": "true"})
    assert orjson.loads(everything.content.splitlines()[-1])["sessions"] == 2
    saved = tmp_path / "all.jsonl"
    saved.write_bytes(everything.content)
    async with open_store("memory://") as fresh:
        report = await import_file(fresh, saved)  # what import reads, end line included
        assert (report.imported, report.daily, report.failed) == (2, 2, 0)
    tenants = (await admin.get("/v1/admin/tenants")).json()
    assert tenants == {"tenants": ["alpha", "beta"]}


async def test_purge_removes_expired_sessions() -> None:
    clock = FrozenClock()
    async with open_store("memory://", settings=settings(), clock=clock) as store:
        _, token = await create_key(store, tenant="alpha", role="admin")
        async with client_of(create_app(store), token) as client:
            await new_session(client, ttl=10)
            await new_session(client)
            clock.advance(11)
            assert (await client.post("/v1/admin/purge")).json() == {"purged": 1}
            assert (await client.get("/v1/session-count")).json() == {"count": 1}


# --- operations ------------------------------------------------------------------------


async def test_healthz_and_metrics(app: FastAPI, alpha: httpx.AsyncClient) -> None:
    async with client_of(app) as anonymous:
        health = await anonymous.get("/healthz")
        assert health.json() == {"status": "ok", "engine": "memory"}
        s = await new_session(alpha)
        await alpha.post(
            f"/v1/sessions/{s['id']}/messages", json={"messages": [{"role": "u"}, {"role": "a"}]}
        )
        await alpha.get("/v1/sessions/nope")
        text = (await anonymous.get("/metrics")).text
    assert (
        'sessionkeeper_http_requests_total{method="POST",route="/v1/sessions",status="201"} 1.0'
        in text
    )
    assert (
        'sessionkeeper_http_requests_total{method="GET",route="/v1/sessions/{session_id}",'
        'status="404"} 1.0' in text
    )
    assert "sessionkeeper_http_request_duration_seconds_bucket{" in text
    assert "sessionkeeper_sessions_created_total 1.0" in text
    assert "sessionkeeper_messages_appended_total 2.0" in text
    assert "sessionkeeper_engine_errors_total 0.0" in text


async def test_a_closed_engine_is_503(app: FastAPI, alpha: httpx.AsyncClient) -> None:
    s = await new_session(alpha)
    await app.state.service.store.close()
    problem(await alpha.get(f"/v1/sessions/{s['id']}"), 503, "unavailable")
    async with client_of(app) as anonymous:
        problem(await anonymous.get("/healthz"), 503)
        assert "sessionkeeper_engine_errors_total 2.0" in (await anonymous.get("/metrics")).text


async def test_access_log_lines_hold_no_secret(
    store: SessionStore, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    logged = await app_with(store, http_access_log=True)
    with caplog.at_level(logging.INFO, logger="sessionkeeper.access"):
        async with client_of(logged, keys.alpha) as client:
            await client.post("/v1/sessions", json={"state": {"secret": "hunter2"}})
            await client.get("/v1/sessions?cursor=abc")
        async with client_of(logged, keys.beta[:-2] + "zz") as wrong:
            await wrong.get("/v1/me")
    lines = [orjson.loads(r.getMessage()) for r in caplog.records]
    assert [(line["route"], line["status"]) for line in lines] == [
        ("/v1/sessions", 201),
        ("/v1/sessions", 422),  # the cursor is not one
        ("/v1/me", 401),
    ]
    assert lines[0]["key"] == keys.alpha.split("_")[1]
    assert lines[0]["tenant"] == "alpha"
    text = caplog.text
    for secret in (keys.alpha, keys.beta[:-2], "hunter2", "Bearer", "abc"):
        assert secret not in text


async def test_docs_and_schema(app: FastAPI) -> None:
    async with client_of(app) as anonymous:
        assert "swagger" in (await anonymous.get("/docs")).text.lower()
        schema = (await anonymous.get("/openapi.json")).json()
    assert "Problem" in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if path.startswith("/v1"):
                assert {"401", "429", "503"} <= codes, (method, path)
                assert "HTTPValidationError" not in str(operation)
            if "requestBody" in operation:
                assert {"400", "413", "415", "422"} <= codes, (method, path)
            if path.startswith("/v1/sessions/{session_id}") and method != "get":
                names = [p["name"] for p in operation["parameters"]]
                assert "If-Match" in names, (method, path)
                assert {"412", "428"} <= codes, (method, path)


def test_create_app_refuses_a_rate_limit_over_the_maximum() -> None:
    from sessionkeeper import InvalidInput

    with pytest.raises(InvalidInput, match="http_rate_limit"):
        create_app(settings=Settings(url="memory://", http_rate_limit=10**6))
