"""The operations routes against the real app, on SQLite, PostgreSQL and Redis: check finds damage
made on purpose and repairs it, doctor's verdict, archive, restore and purge with their
dry runs, admin keys only, and bad input refused by name with nothing changed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from sessionkeeper import FrozenClock, checks, maintenance, open_store
from sessionkeeper.keys import create_key
from sessionkeeper.models import DoctorReport
from sessionkeeper.server import create_app
from sessionkeeper.server.routes import operations
from sessionkeeper.store import SessionStore
from tests.contract.namespaces import drop_namespace
from tests.contract.test_check import Damage, conversation

from .conftest import client_of, settings

DAY = 86_400.0
URLS = {
    "sqlite": "sqlite:///{tmp}/ops.db",
    "postgresql": "postgresql://127.0.0.1:5432/test?schema=sk_t_ops_{n}",
    "redis": "redis://127.0.0.1:6379/0?prefix=sk_t_ops_{n}:",
}


@dataclass
class Ops:
    store: SessionStore  # tenant alpha
    clock: FrozenClock
    admin: httpx.AsyncClient  # an admin key bound to alpha
    alpha: httpx.AsyncClient  # a tenant key of alpha
    anonymous: httpx.AsyncClient


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.server),
        pytest.param("redis", id="redis", marks=pytest.mark.server),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    made = URLS[request.param].format(tmp=tmp_path, n=f"{time.time_ns():x}")
    yield made
    drop_namespace(made)


@pytest.fixture
async def ops(url: str) -> AsyncIterator[Ops]:
    clock = FrozenClock(time.time())
    async with open_store(url, tenant="alpha", settings=settings(url=url), clock=clock) as store:
        app = create_app(store)
        admin = (await create_key(store, tenant="alpha", role="admin"))[1]
        alpha = (await create_key(store, tenant="alpha"))[1]
        async with (
            client_of(app, admin) as admin_client,
            client_of(app, alpha) as alpha_client,
            client_of(app) as anonymous,
        ):
            yield Ops(store, clock, admin_client, alpha_client, anonymous)


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def found(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {k: (c["found"], c["repaired"]) for k, c in report["counts"].items() if c["found"]}


async def statuses(store: SessionStore) -> dict[str, str]:
    page = await store.list_sessions(limit=100)
    return {s.id: s.status for s in page.items}


# --- the report models are the reports' own fields ------------------------------------------


def test_each_response_model_has_the_fields_the_cli_prints() -> None:
    check = checks.CheckResult("sqlite", None, False, [])
    doctor = checks.DoctorResult(DoctorReport("sqlite", "3"))
    pairs: list[tuple[type[BaseModel], dict[str, Any]]] = [
        (operations.CheckOut, check.to_dict()),
        (operations.DoctorOut, doctor.to_dict()),
        (operations.ArchiveOut, maintenance.ArchiveReport().to_dict()),
        (operations.RestoreOut, maintenance.RestoreReport("t", "s").to_dict()),
        (operations.PurgeOut, maintenance.PurgeReport().to_dict()),
    ]
    for model, data in pairs:
        assert set(model.model_fields) == set(data), model.__name__


# --- doctor and check -------------------------------------------------------------------------


async def test_doctor_gives_the_engine_and_a_verdict(ops: Ops) -> None:
    await conversation(ops.store)
    report = ok(await ops.admin.get("/v1/admin/doctor"))
    expected = (await checks.doctor(ops.store)).to_dict()
    assert report["engine"] == expected["engine"] == ops.store.engine.name
    assert report["verdict"] == expected["verdict"]
    assert report["verdict"] == ("warnings" if report["warnings"] else "ok")
    assert report["missing_indexes"] == []
    assert report["counts"]["sessions"] >= 1


async def test_damage_is_found_then_repaired_over_http(ops: Ops) -> None:
    store = ops.store
    damage = Damage(store)
    folder = await store.create_folder("work", owner="ann")
    in_folder = await conversation(store, owner="ann", folder=folder.id)
    wrong_counts = await conversation(store)
    orphaned = await conversation(store)
    await damage.aggregates(wrong_counts)
    await damage.drop_folder(folder.id)
    await damage.orphan_messages(orphaned)

    seen = ok(await ops.admin.post("/v1/admin/check"))
    assert seen["tenant"] == "alpha"
    assert seen["repair"] is False
    seen_found = found(seen)
    assert seen_found.pop("aggregates") == (1, 0)
    assert seen_found.pop("missing_folder") == (1, 0)
    # the lost session's index entries, and its messages where they carry the tenant
    assert set(seen_found) <= {"dangling_index", "orphan_messages"}
    assert seen["ok"] is False
    assert seen["left"] >= 2
    assert seen["counts"]["aggregates"]["samples"] == [f"alpha/{wrong_counts}"]
    assert seen["counts"]["seq_gaps"]["repairable"] is False
    # a check without repair changes nothing
    assert (await store.get_session(wrong_counts)).message_count == 99
    everywhere = ok(await ops.admin.post("/v1/admin/check", params={"all_tenants": "true"}))
    assert everywhere["tenant"] is None
    assert found(everywhere)["orphan_messages"] == (3, 0)

    repaired = ok(
        await ops.admin.post("/v1/admin/check", params={"repair": "true", "all_tenants": "true"})
    )
    fixed = found(repaired)
    assert fixed.pop("aggregates") == (1, 1)
    assert fixed.pop("missing_folder") == (1, 1)
    assert fixed.pop("orphan_messages") == (3, 3)
    assert all(repaired == count for count, repaired in fixed.values())
    assert repaired["ok"] is True
    assert repaired["left"] == 0
    after = await store.get_session(wrong_counts)
    assert (after.message_count, after.input_tokens, after.output_tokens) == (3, 11, 4)
    assert (await store.get_session(in_folder)).folder is None
    clean = ok(await ops.admin.post("/v1/admin/check", params={"all_tenants": "true"}))
    assert found(clean) == {}
    assert clean["ok"] is True


async def test_check_of_another_tenant_by_name(ops: Ops) -> None:
    beta = ops.store.for_tenant("beta")
    session_id = await conversation(beta)
    await Damage(beta).aggregates(session_id)
    assert found(ok(await ops.admin.post("/v1/admin/check"))) == {}
    report = ok(await ops.admin.post("/v1/admin/check", params={"tenant": "beta"}))
    assert report["tenant"] == "beta"
    assert found(report) == {"aggregates": (1, 0)}


# --- archive, restore, purge ------------------------------------------------------------------


async def test_archive_dry_run_changes_nothing_then_archives(ops: Ops) -> None:
    store = ops.store
    old = [await conversation(store), (await store.create_session(status="completed")).id]
    ops.clock.advance(100 * DAY)
    fresh = (await store.create_session()).id
    before = await statuses(store)

    dry = ok(await ops.admin.post("/v1/admin/archive", json={"older_than": "90d", "dry_run": True}))
    assert dry["dry_run"] is True
    assert dry["archived"] == 2
    assert sorted(dry["sample"]) == sorted(f"alpha/{i}" for i in old)
    assert dry["older_than"] == 90 * DAY
    assert dry["ok"] is True
    assert await statuses(store) == before

    done = ok(await ops.admin.post("/v1/admin/archive", json={"older_than": "90d"}))
    assert done["dry_run"] is False
    assert done["archived"] == 2
    assert done["moved"] is False
    assert await statuses(store) == {old[0]: "archived", old[1]: "archived", fresh: "active"}
    again = ok(await ops.admin.post("/v1/admin/archive", json={"older_than": "90d"}))
    assert again["archived"] == 0

    dry_restore = ok(
        await ops.admin.post("/v1/admin/restore", json={"session_id": old[0], "dry_run": True})
    )
    assert dry_restore == {
        "tenant": "alpha",
        "session_id": old[0],
        "dry_run": True,
        "moved": False,
        "reactivated": True,
        "messages": 0,
        "status": "active",
    }
    assert (await store.get_session(old[0])).status == "archived"
    restored = ok(await ops.admin.post("/v1/admin/restore", json={"session_id": old[0]}))
    assert restored["reactivated"] is True
    assert (await store.get_session(old[0])).status == "active"
    # a session that is not archived is left as it is
    twice = ok(await ops.admin.post("/v1/admin/restore", json={"session_id": old[0]}))
    assert (twice["reactivated"], twice["status"]) == (False, "active")
    missing = await ops.admin.post("/v1/admin/restore", json={"session_id": "nope"})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_archive_of_every_tenant(ops: Ops) -> None:
    await ops.store.create_session()
    await ops.store.for_tenant("beta").create_session()
    ops.clock.advance(2 * DAY)
    report = ok(
        await ops.admin.post("/v1/admin/archive", json={"older_than": "1d", "all_tenants": True})
    )
    assert (report["tenants"], report["archived"]) == (2, 2)


async def test_purge_dry_run_changes_nothing_then_purges(ops: Ops) -> None:
    store = ops.store
    old = await conversation(store)
    expiring = (await store.create_session(ttl=DAY)).id
    ops.clock.advance(30 * DAY)
    fresh = (await store.create_session()).id
    body = {"older_than": "4w", "dry_run": True}

    dry = ok(await ops.admin.post("/v1/admin/purge-sessions", json=body))
    assert (dry["dry_run"], dry["old"], dry["expired"], dry["purged"]) == (True, 1, None, 1)
    assert dry["sample"] == [f"alpha/{old}"]
    assert (await store.get_session(old)).message_count == 3

    done = ok(
        await ops.admin.post("/v1/admin/purge-sessions", json={"older_than": "4w", "expired": True})
    )
    assert (done["old"], done["expired"], done["purged"], done["ok"]) == (1, 1, 2, True)
    assert set(await statuses(store)) == {fresh}
    assert expiring not in await statuses(store)
    # the plain purge of expired sessions answers as it always did
    assert ok(await ops.admin.post("/v1/admin/purge")) == {"purged": 0}


# --- who may, and what is refused -------------------------------------------------------------

ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/admin/check", None),
    ("GET", "/v1/admin/doctor", None),
    ("POST", "/v1/admin/archive", {"older_than": "1s"}),
    ("POST", "/v1/admin/restore", {"session_id": "s"}),
    ("POST", "/v1/admin/purge-sessions", {"older_than": "1s"}),
]


async def test_only_admin_keys_may(ops: Ops) -> None:
    ops.clock.advance(-DAY)
    kept = (await ops.store.create_session()).id
    ops.clock.advance(DAY)
    for method, path, body in ROUTES:
        refused = await ops.alpha.request(method, path, json=body)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"
        assert "admin key" in refused.json()["detail"]
        anonymous = await ops.anonymous.request(method, path, json=body)
        assert anonymous.status_code == 401, path
    assert await statuses(ops.store) == {kept: "active"}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/admin/archive", {}, "older_than"),
    ("/v1/admin/archive", {"older_than": "90x"}, "older_than"),
    ("/v1/admin/archive", {"older_than": "-5d"}, "older_than"),
    ("/v1/admin/archive", {"older_than": "0d"}, "older_than"),
    ("/v1/admin/archive", {"older_than": 90}, "older_than"),
    ("/v1/admin/archive", {"older_than": "1s", "dry_run": "false"}, "dry_run"),
    ("/v1/admin/archive", {"older_than": "1s", "dry_run": 0}, "dry_run"),
    ("/v1/admin/archive", {"older_than": "1s", "to": "sqlite:///x.db"}, "to"),
    ("/v1/admin/archive", {"older_than": "1s", "batch_size": -1}, "batch_size"),
    ("/v1/admin/archive", {"older_than": "1s", "batch_size": 0}, "batch_size"),
    ("/v1/admin/purge-sessions", {}, "older_than"),
    ("/v1/admin/purge-sessions", {"older_than": "1y"}, "older_than"),
    ("/v1/admin/purge-sessions", {"expired": True, "older_than": ""}, "older_than"),
    ("/v1/admin/purge-sessions", {"older_than": "1s", "oops": True}, "oops"),
    ("/v1/admin/purge-sessions", {"older_than": "1s", "all_tenants": "yes"}, "all_tenants"),
    ("/v1/admin/restore", {}, "session_id"),
    ("/v1/admin/restore", {"session_id": "x", "from": "file:///etc"}, "from"),
    ("/v1/admin/restore", {"session_id": "s p a c e"}, "session_id"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD)
async def test_bad_input_is_refused_by_name_and_changes_nothing(
    ops: Ops, path: str, body: dict[str, Any], field: str
) -> None:
    ops.clock.advance(-DAY)
    session = await ops.store.create_session(status="archived")
    ops.clock.advance(DAY)
    before = await ops.store.get_session(session.id)
    refused = await ops.admin.post(path, json=body)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["field"] == field
    assert await ops.store.get_session(session.id) == before


async def test_bodies_must_be_json_objects(ops: Ops) -> None:
    malformed = await ops.admin.post(
        "/v1/admin/archive", content=b"{older", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.headers["content-type"] == "application/problem+json"
    form = await ops.admin.post("/v1/admin/archive", data={"older_than": "1s"})
    assert form.status_code == 415
    listed = await ops.admin.post("/v1/admin/purge-sessions", json=["older_than"])
    assert listed.status_code == 422
    in_body = await ops.admin.post("/v1/admin/check", json={"repair": True})
    assert in_body.status_code == 422
    assert in_body.json()["field"] == "body"
    flag = await ops.admin.post("/v1/admin/check", params={"repair": "maybe"})
    assert flag.status_code == 422
    assert flag.json()["field"] == "query.repair"
