"""Webhooks of the HTTP service, sent to a real HTTP server on a loopback port: signed,
retried with backoff, one delivery per event across two services, and the delivery log
from Python, HTTP and the CLI."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from sessionkeeper import InvalidInput, NotFound, Settings, open_store
from sessionkeeper.cli import app as cli_app
from sessionkeeper.clock import FrozenClock
from sessionkeeper.keys import create_key
from sessionkeeper.server import create_app
from sessionkeeper.server.webhooks import (
    MAX_BACKOFF,
    Webhooks,
    _change,
    _claimed,
    backoff_delay,
    list_deliveries,
    redeliver,
    sign,
    verify_signature,
)
from sessionkeeper.store import SessionStore
from tests.contract.namespaces import drop_namespace

from .conftest import SECRET, Receiver, client_of
from .processes import Served


def hook_settings(receiver: Receiver, **overrides: Any) -> Settings:
    given: dict[str, Any] = {
        "url": "memory://",
        "http_access_log": False,
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
        **overrides,
    }
    return Settings(**given)


@pytest.fixture
async def clock() -> FrozenClock:
    return FrozenClock(start=time.time())


@pytest.fixture
async def store(receiver: Receiver, clock: FrozenClock) -> AsyncIterator[SessionStore]:
    settings = hook_settings(
        receiver,
        webhook_backoff=10.0,
        webhook_max_attempts=3,
        webhook_events=["completed", "deleted"],
    )
    async with open_store(settings=settings, clock=clock) as opened:
        yield opened


@pytest.fixture
async def hooks(store: SessionStore) -> AsyncIterator[Webhooks]:
    """Hooks installed, no task: tests send what is due with ``deliver_due``."""
    sender = Webhooks(store, jitter=lambda: 0.0)
    sender.install()
    try:
        yield sender
    finally:
        await sender.stop()


# --- settings and signatures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "setting", "message"),
    [
        ({"webhook_url": "ftp://127.0.0.1/x", "webhook_secret": "s"}, "webhook_url", "http"),
        ({"webhook_url": "http:///nohost", "webhook_secret": "s"}, "webhook_url", "host"),
        ({"webhook_url": "http://127.0.0.1/x"}, "webhook_secret", "required"),
        ({"webhook_url": "http://127.0.0.1/x", "webhook_secret": ""}, "webhook_secret", "empty"),
        ({"webhook_events": ["completed", "archived"]}, "webhook_events", "'archived'"),
    ],
)
def test_bad_settings_name_the_setting(given: dict[str, Any], setting: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        Settings(**given)
    assert caught.value.errors()[0]["loc"] == (setting,)


def test_bad_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONKEEPER_WEBHOOK_URL", "http://127.0.0.1:9/x")
    with pytest.raises(InvalidInput, match="SESSIONKEEPER_WEBHOOK_SECRET"):
        open_store("memory://")
    monkeypatch.setenv("SESSIONKEEPER_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("SESSIONKEEPER_WEBHOOK_EVENTS", '["completed", "closed"]')
    with pytest.raises(InvalidInput, match="SESSIONKEEPER_WEBHOOK_EVENTS"):
        open_store("memory://")


async def test_webhooks_need_a_url() -> None:
    async with open_store("memory://", settings=Settings(url="memory://")) as plain:
        with pytest.raises(InvalidInput) as caught:
            Webhooks(plain)
    assert caught.value.field == "webhook_url"


async def test_the_log_refuses_a_bad_filter(store: SessionStore) -> None:
    with pytest.raises(InvalidInput) as caught:
        await list_deliveries(store, status="lost")
    assert caught.value.field == "status"
    for limit in (0, 1001, True):
        with pytest.raises(InvalidInput) as caught:
            await list_deliveries(store, limit=limit)
        assert caught.value.field == "limit"


def test_a_signature_verifies_and_any_change_breaks_it() -> None:
    body = b'{"id":"x","event":"completed"}'
    now = 1_700_000_000
    signature = sign(SECRET, now, body)
    assert signature.startswith("sha256=")
    assert verify_signature(SECRET, str(now), body, signature, now=now + 10)
    assert verify_signature(SECRET, now, body.decode(), signature, now=now)
    assert not verify_signature(SECRET, now, body + b" ", signature, now=now)  # body changed
    assert not verify_signature("other", now, body, signature, now=now)  # wrong secret
    assert not verify_signature(SECRET, now + 1, body, signature, now=now)  # time changed
    assert not verify_signature(SECRET, now, body, signature, now=now + 301)  # replayed late
    assert not verify_signature(SECRET, now, body, signature[:-1] + "0", now=now)
    assert not verify_signature(SECRET, "soon", body, signature, now=now)
    assert not verify_signature(SECRET, now, body, "sha256=é", now=now)


def test_backoff_doubles_with_jitter_and_a_cap() -> None:
    assert [backoff_delay(n, 10.0) for n in (1, 2, 3, 4)] == [10.0, 20.0, 40.0, 80.0]
    assert backoff_delay(2, 10.0, jitter=1.0) == 25.0  # at most a quarter more
    assert backoff_delay(40, 10.0, jitter=0.5) == MAX_BACKOFF


# --- delivery --------------------------------------------------------------------------


async def test_a_completion_is_sent_once_signed(
    store: SessionStore, hooks: Webhooks, receiver: Receiver, clock: FrozenClock
) -> None:
    session = await store.create_session(owner="alice", title="t")
    await store.update_session(session.id, status="completed")
    await store.update_session(session.id, status="completed")  # no second event
    assert await hooks.deliver_due() == 1
    assert await hooks.deliver_due() == 0  # nothing is sent twice
    [sent] = receiver.received
    headers = sent.headers
    assert headers["content-type"] == "application/json"
    assert verify_signature(
        SECRET,
        headers["x-sessionkeeper-timestamp"],
        sent.body,
        headers["x-sessionkeeper-signature"],
        now=clock.now(),
    )
    body = json.loads(sent.body)
    assert body["id"] == headers["x-sessionkeeper-delivery"]
    assert (body["event"], body["tenant"], body["session_id"]) == (
        "completed",
        "default",
        session.id,
    )
    assert body["session"]["status"] == "completed"
    assert body["session"]["owner"] == "alice"
    assert "state" not in body["session"]  # a summary

    [completed] = await list_deliveries(store)
    assert (completed.status, completed.event) == ("delivered", "completed")
    assert completed.id == body["id"]
    assert [a.status_code for a in completed.attempts] == [200]


async def test_a_delete_is_sent_without_a_session(
    store: SessionStore, hooks: Webhooks, receiver: Receiver
) -> None:
    session = await store.create_session()
    await store.delete_session(session.id)
    await hooks.deliver_due()
    [deleted] = receiver.received
    assert deleted.headers["x-sessionkeeper-event"] == "deleted"
    assert json.loads(deleted.body)["session"] is None


async def test_500_twice_then_200_is_three_attempts_spaced_by_the_backoff(
    store: SessionStore, hooks: Webhooks, receiver: Receiver, clock: FrozenClock
) -> None:
    receiver.statuses = [500, 500, 200]
    session = await store.create_session()
    await store.update_session(session.id, status="completed")

    assert await hooks.deliver_due() == 1  # 500
    clock.advance(9.0)
    assert await hooks.deliver_due() == 0  # the backoff (10 s) has not passed
    clock.advance(2.0)
    assert await hooks.deliver_due() == 1  # 500 again: now 20 s
    clock.advance(19.0)
    assert await hooks.deliver_due() == 0
    clock.advance(2.0)
    assert await hooks.deliver_due() == 1  # 200
    clock.advance(3600.0)
    assert await hooks.deliver_due() == 0

    assert len(receiver.received) == 3
    assert len(set(receiver.deliveries())) == 1  # one delivery, three attempts
    [delivery] = await list_deliveries(store, status="delivered")
    assert delivery.event == "completed"
    codes = [a.status_code for a in delivery.attempts]
    assert codes == [500, 500, 200]
    times = [a.at.timestamp() for a in delivery.attempts]
    assert times[1] - times[0] >= 10.0
    assert times[2] - times[1] >= 20.0
    assert delivery.next_attempt_at is None


async def test_failed_after_max_attempts_then_redelivered(
    store: SessionStore, hooks: Webhooks, receiver: Receiver, clock: FrozenClock
) -> None:
    receiver.statuses = [500, 503, 404]
    session = await store.create_session()
    await store.update_session(session.id, status="completed")
    for _ in range(3):
        await hooks.deliver_due()
        clock.advance(100.0)
    assert await hooks.deliver_due() == 0
    [failed] = await list_deliveries(store, status="failed")
    assert [a.status_code for a in failed.attempts] == [500, 503, 404]
    assert await list_deliveries(store, status="pending") == []

    with pytest.raises(NotFound):
        await redeliver(store, "0" * 24)
    with pytest.raises(InvalidInput):
        await redeliver(store, "not-an-id")
    again = await redeliver(store, failed.id)
    assert again.status == "pending"
    with pytest.raises(InvalidInput, match="pending"):
        await redeliver(store, failed.id)
    assert await hooks.deliver_due() == 1
    [delivered] = await list_deliveries(store, status="delivered")
    assert delivered.id == failed.id
    assert [a.status_code for a in delivered.attempts] == [500, 503, 404, 200]
    assert receiver.deliveries()[-1] == failed.id


async def test_a_dead_dispatchers_lease_runs_out(
    store: SessionStore, hooks: Webhooks, receiver: Receiver, clock: FrozenClock
) -> None:
    session = await store.create_session()
    await store.update_session(session.id, status="completed")
    [pending] = await list_deliveries(store, status="pending")
    # another dispatcher claimed it and died before it recorded anything
    await _change(store, pending.id, lambda r: _claimed(r, "dead", clock.now(), 70.0), clock.now())
    assert await hooks.deliver_due() == 0
    clock.advance(71.0)
    assert await hooks.deliver_due() == 1
    assert receiver.deliveries() == [pending.id]


async def test_the_task_sends_at_once_after_an_event(
    store: SessionStore, receiver: Receiver
) -> None:
    async with Webhooks(store, poll_interval=60.0):  # no poll within the test: a wake-up
        await asyncio.sleep(0.05)  # its first pass, over an empty outbox
        session = await store.create_session()
        await store.update_session(session.id, status="completed")
        for _ in range(500):
            if receiver.received:
                break
            await asyncio.sleep(0.01)
    assert receiver.events() == ["completed"]
    session = await store.create_session()
    await store.update_session(session.id, status="completed")  # stopped: hooks removed
    assert await list_deliveries(store, status="pending") == []


async def test_a_receiver_that_is_down_is_an_error_attempt(
    receiver: Receiver, clock: FrozenClock
) -> None:
    settings = hook_settings(receiver, webhook_url="http://127.0.0.1:9/down", webhook_timeout=2)
    async with open_store(settings=settings, clock=clock) as store:
        sender = Webhooks(store)
        sender.install()
        try:
            await store.create_session()
            assert await sender.deliver_due() == 1
        finally:
            await sender.stop()
        [delivery] = await list_deliveries(store)
    assert delivery.status == "pending"
    [attempt] = delivery.attempts
    assert attempt.status_code is None
    assert attempt.error


# --- two services over one store ---------------------------------------------------------


async def test_two_services_on_one_store_send_each_event_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    settings = hook_settings(receiver, url=url, webhook_events=["completed"])
    async with open_store(settings=settings) as one, open_store(settings=settings) as two:
        senders = [Webhooks(one), Webhooks(two)]
        for sender in senders:
            sender.install()
        try:
            ids = [(await one.create_session()).id for _ in range(6)]
            # each session completed by both at once: the store fires one event for it
            await asyncio.gather(
                *(s.update_session(i, status="completed") for i in ids for s in (one, two))
            )
            receiver.delay = 0.05  # POSTs overlap: both dispatchers try every delivery
            for _ in range(3):
                await asyncio.gather(*(s.deliver_due() for s in senders))
        finally:
            for sender in senders:
                await sender.stop()
        log = await list_deliveries(one)
    assert len(receiver.received) == 6
    assert sorted(json.loads(r.body)["session_id"] for r in receiver.received) == sorted(ids)
    assert len(set(receiver.deliveries())) == 6
    assert [d.status for d in log] == ["delivered"] * 6
    assert all(len(d.attempts) == 1 for d in log)


async def test_two_apps_send_one_completion_once_and_admins_see_the_log(
    tmp_path: Path, receiver: Receiver
) -> None:
    url = f"sqlite:///{tmp_path / 'apps.db'}"
    settings = hook_settings(receiver, url=url, webhook_events=["completed"], sweep_interval=0)
    async with open_store(settings=settings) as store:
        admin_key = (await create_key(store, tenant="default", role="admin"))[1]
        tenant_key = (await create_key(store, tenant="default"))[1]
    first, second = create_app(settings=settings), create_app(settings=settings)
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        async with client_of(first, admin_key) as a, client_of(second, admin_key) as b:
            made = await a.post("/v1/sessions", json={"title": "t"})
            assert made.status_code == 201, made.text
            sid = made.json()["id"]
            answers = await asyncio.gather(
                a.patch(f"/v1/sessions/{sid}", json={"status": "completed"}),
                b.patch(f"/v1/sessions/{sid}", json={"status": "completed"}),
            )
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            for _ in range(500):  # the dispatcher of the app that completed it sends it
                if receiver.received:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.5)  # more than a poll of both dispatchers: no second one
            assert receiver.events() == ["completed"]

            listed = await b.get("/v1/admin/webhooks/deliveries")
            assert listed.status_code == 200, listed.text
            [entry] = listed.json()["deliveries"]
            assert entry["id"] == receiver.deliveries()[0]
            assert entry["status"] == "delivered"
            assert entry["attempts"][0]["status_code"] == 200
            failed = await a.get("/v1/admin/webhooks/deliveries", params={"status": "failed"})
            assert failed.json() == {"deliveries": []}
            bad = await a.get("/v1/admin/webhooks/deliveries", params={"status": "lost"})
            assert bad.status_code == 422

            again = await a.post(f"/v1/admin/webhooks/deliveries/{entry['id']}/redeliver")
            assert again.status_code == 200, again.text
            assert again.json()["status"] == "pending"
            for _ in range(500):
                if len(receiver.received) == 2:
                    break
                await asyncio.sleep(0.01)
            assert receiver.deliveries() == [entry["id"]] * 2
            unknown = await a.post(f"/v1/admin/webhooks/deliveries/{'0' * 24}/redeliver")
            assert unknown.status_code == 404
            malformed = await a.post("/v1/admin/webhooks/deliveries/nope/redeliver")
            assert malformed.status_code == 422
            assert malformed.json()["field"] == "delivery_id"
        async with client_of(first, tenant_key) as tenant:
            refused = await tenant.get("/v1/admin/webhooks/deliveries")
            assert refused.status_code == 403
        async with client_of(first) as anonymous:
            assert (await anonymous.get("/v1/admin/webhooks/deliveries")).status_code == 401


async def test_an_app_without_a_webhook_url_sends_nothing(tmp_path: Path) -> None:
    settings = Settings(url=f"sqlite:///{tmp_path / 'quiet.db'}", http_access_log=False)
    app = create_app(settings=settings)
    assert app.state.webhooks is None


def test_an_app_refuses_bad_webhook_settings(receiver: Receiver) -> None:
    settings = hook_settings(receiver).model_copy(update={"webhook_secret": None})
    with pytest.raises(InvalidInput) as caught:
        create_app(settings=settings)
    assert caught.value.field == "webhook_secret"


# --- the CLI ---------------------------------------------------------------------------


def cli(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, ["--url", url, *args])
    return result.exit_code, result.output


def test_cli_lists_and_redelivers(tmp_path: Path, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    settings = hook_settings(receiver, url=url, webhook_max_attempts=1)
    receiver.statuses = [500]

    async def fail_one() -> str:
        async with open_store(settings=settings) as store:
            sender = Webhooks(store)
            sender.install()
            try:
                await store.create_session()
                await sender.deliver_due()
            finally:
                await sender.stop()
            [failed] = await list_deliveries(store, status="failed")
            return failed.id

    failed_id = asyncio.run(fail_one())
    code, out = cli(url, "webhooks", "deliveries", "--json")
    assert code == 0, out
    [listed] = json.loads(out)
    assert (listed["id"], listed["status"], listed["event"]) == (failed_id, "failed", "created")
    code, out = cli(url, "webhooks", "deliveries", "--status", "delivered", "--json")
    assert (code, json.loads(out)) == (0, [])
    code, out = cli(url, "webhooks", "deliveries")
    assert code == 0
    assert failed_id in out
    assert "500" in out

    code, out = cli(url, "webhooks", "deliveries", "--status", "lost")
    assert code == 2
    assert "status" in out
    code, out = cli(url, "webhooks", "redeliver", "nope")
    assert code == 2
    assert "delivery_id" in out
    code, out = cli(url, "webhooks", "redeliver", "0" * 24)
    assert code == 1
    assert "no delivery" in out

    code, out = cli(url, "webhooks", "redeliver", failed_id, "--json")
    assert code == 0, out
    assert json.loads(out)["status"] == "pending"


def test_cli_names_a_bad_webhook_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONKEEPER_WEBHOOK_URL", "file:///etc/passwd")
    code, out = cli(f"sqlite:///{tmp_path / 'x.db'}", "webhooks", "deliveries")
    assert code == 2
    assert "SESSIONKEEPER_WEBHOOK_URL" in out


def test_httpx_is_in_the_server_extra() -> None:
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    extras = tomllib.loads(text)["project"]["optional-dependencies"]
    assert "httpx>=0.27" in extras["server"]


# --- two `serve` processes -------------------------------------------------------------


SHARED = {
    "postgresql": "postgresql://127.0.0.1:5432/test?schema=sk_hooks_{ns}",
    "redis": "redis://127.0.0.1:6379/0?prefix=sk_hooks_{ns}:",
}


@pytest.fixture(
    params=["sqlite", *(pytest.param(name, marks=pytest.mark.server) for name in SHARED)],
)
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'served.db'}"
        return
    made = SHARED[request.param].format(ns=secrets.token_hex(4))
    yield made
    drop_namespace(made)


@pytest.mark.slow
def test_two_serve_processes_send_each_completion_once(shared_url: str, receiver: Receiver) -> None:
    env = {
        "SESSIONKEEPER_WEBHOOK_URL": receiver.url,
        "SESSIONKEEPER_WEBHOOK_SECRET": SECRET,
        "SESSIONKEEPER_WEBHOOK_EVENTS": '["completed"]',
    }

    async def admin_key() -> str:
        async with open_store(shared_url, settings=Settings(url=shared_url)) as store:
            return (await create_key(store, tenant="default", role="admin"))[1]

    token = asyncio.run(admin_key())
    servers = [Served(shared_url, env=env), Served(shared_url, env=env)]
    try:
        for server in servers:
            server.wait_ready()
        ids = asyncio.run(_complete_through_both(servers[0].base, servers[1].base, token))
        deadline = time.monotonic() + 20
        while len(receiver.received) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.5)  # more than two polls of each dispatcher: nothing more comes
    finally:
        outputs = [server.stop() for server in servers]
    assert len(receiver.received) == len(ids), outputs
    assert sorted(json.loads(r.body)["session_id"] for r in receiver.received) == sorted(ids)
    assert set(receiver.events()) == {"completed"}
    for sent in receiver.received:
        headers = sent.headers
        assert verify_signature(
            SECRET,
            headers["x-sessionkeeper-timestamp"],
            sent.body,
            headers["x-sessionkeeper-signature"],
        )


async def _complete_through_both(one_url: str, two_url: str, token: str) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=one_url, headers=headers) as one,
        httpx.AsyncClient(base_url=two_url, headers=headers) as two,
    ):
        ids = []
        for _ in range(5):
            made = await one.post("/v1/sessions", json={"title": "t"})
            assert made.status_code == 201, made.text
            ids.append(made.json()["id"])
        answers = await asyncio.gather(
            *(
                client.patch(f"/v1/sessions/{sid}", json={"status": "completed"})
                for sid in ids
                for client in (one, two)
            )
        )
        assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
        return ids
