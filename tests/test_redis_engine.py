"""Redis-only facts: failures and recovery, fallback, durability, native TTL, key layout, indexes.

Tests that stop, freeze or restart a server run a redis-server of their own on a free
loopback port (no persistence); the rest use the shared server on 6379 under a key prefix of
their own. Either way a test leaves no key and no process behind.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.crc import key_slot

from sessionkeeper import (
    AlreadyExists,
    BackendUnavailable,
    FrozenClock,
    InvalidInput,
    NotFound,
    SessionStore,
    Settings,
    VersionConflict,
    checks,
    open_store,
    rules,
)
from sessionkeeper.engines.redis import RedisEngine, _Index
from sessionkeeper.engines.urls import engine_from_url
from sessionkeeper.models import SessionQuery, Stats
from tests.contract.namespaces import drop_namespace
from tests.contract.redis_cluster import redis_cluster  # noqa: F401 (a fixture)

pytestmark = pytest.mark.server

SHARED = "redis://127.0.0.1:6379/0"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Server:
    """A redis-server of the test's own, which the test may kill, freeze and restart."""

    def __init__(self, folder: Path, *options: str) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is needed (Debian: redis-server)")
        self.port = _free_port()
        self.folder = folder
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, options: str = "") -> str:
        return f"redis://127.0.0.1:{self.port}/0{'?' + options if options else ''}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        client = SyncRedis(port=self.port, socket_timeout=1)
        while True:
            try:
                client.ping()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def signal(self, number: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case a test left it frozen
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts servers of the test's own; stops every one of them afterwards."""
    started: list[Server] = []

    def start(*options: str) -> Server:
        folder = tmp_path / f"redis-{len(started)}"
        folder.mkdir()
        started.append(Server(folder, *options))
        return started[-1]

    yield start
    for server in started:
        server.stop()
        assert server.process is not None
        assert server.process.poll() is not None
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", server.port)) != 0, "the server still answers"


@pytest.fixture
def server(servers: Callable[..., Server]) -> Server:
    return servers()


@pytest.fixture
async def shared() -> AsyncIterator[tuple[str, str]]:
    """A key prefix of the test's own on the shared server, and its URL. Afterwards the
    prefix is dropped, and no key of it may be left."""
    prefix = f"sk_t_{secrets.token_hex(5)}:"
    url = f"{SHARED}?prefix={prefix}"
    yield url, prefix
    await asyncio.to_thread(drop_namespace, url)
    client = Redis.from_url(SHARED)
    try:
        assert [key async for key in client.scan_iter(match=f"{prefix}*")] == []
    finally:
        await client.aclose()


def _store(url: str, clock: FrozenClock | None = None) -> SessionStore:
    return open_store(url, settings=Settings(url=url), clock=clock or FrozenClock())


# --- failures --------------------------------------------------------------------------


async def test_a_server_that_goes_away_fails_fast_and_the_store_recovers(server: Server) -> None:
    async with _store(server.url()) as store:
        session = await store.create_session()
        await store.append_message(session.id, "user", "hello")
        server.kill()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get_session(session.id),
            lambda: store.append_message(session.id, "user", "lost"),
            lambda: store.update_state(session.id, {"a": 1}),
            lambda: store.list_sessions(),
            lambda: store.create_session(),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await call()
            assert time.monotonic() - started < store.settings.server_timeout
        server.start()  # on the same port, empty (no persistence), without our scripts
        with pytest.raises(NotFound):
            await store.get_session(session.id)
        fresh = await store.create_session(state={"back": True})
        assert (await store.append_message(fresh.id, "user", "again")).seq == 1
        assert (await store.get_session(fresh.id)).state == {"back": True}


async def test_a_server_that_stops_answering_times_out(server: Server) -> None:
    async with _store(server.url()) as store:
        session = await store.create_session()
        server.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="Timeout"):
                await store.get_session(session.id)
            elapsed = time.monotonic() - started
        finally:
            server.signal(signal.SIGCONT)
        timeout = store.settings.server_timeout
        assert timeout * 0.9 <= elapsed < timeout + 1.0
        assert (await store.get_session(session.id)).id == session.id


async def test_an_unreachable_server_fails_at_open() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        async with _store(url):
            pass
    assert time.monotonic() - started < Settings().server_timeout


async def test_fallback_memory_runs_on_memory_and_says_what_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0?fallback=memory"
    with caplog.at_level(logging.WARNING, logger="sessionkeeper"):
        async with _store(url) as store:
            session = await store.create_session(state={"a": 1})
            await store.append_message(session.id, "user", "kept in memory")
            assert (await store.get_session(session.id)).state == {"a": 1}
            assert await store.count_sessions() == 1
    (warning,) = [r for r in caplog.records if r.name == "sessionkeeper"]
    assert f"127.0.0.1:{port}" in warning.getMessage()
    assert "lost when it exits" in warning.getMessage()


# --- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("prefix=a&colour=red&size=2", "unknown option colour, size"),
        ("prefix=a{b}", "prefix="),
        ("prefix=", "prefix="),
        ("prefix=a*", "prefix="),
        ("cluster=yes", "cluster= must be true or false"),
        ("durable=1", "durable= must be true or false"),
        ("fallback=sqlite", "fallback= can only be memory"),
        ("prefix=a&prefix=b", "prefix is given twice"),
    ],
)
def test_bad_options_are_invalid_input(options: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        engine_from_url(f"{SHARED}?{options}", Settings())
    assert caught.value.field == "url"


def test_cluster_has_only_database_0() -> None:
    with pytest.raises(InvalidInput, match="only database 0"):
        engine_from_url("redis://127.0.0.1:6379/3?cluster=true", Settings())


async def test_durable_warns_unless_every_write_is_fsynced(
    servers: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    cases = [
        (servers(), "appendonly is off"),
        (servers("--appendonly", "yes", "--appendfsync", "everysec"), "appendfsync is everysec"),
        (servers("--appendonly", "yes", "--appendfsync", "always"), None),
    ]
    for server, expected in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sessionkeeper"):
            async with _store(server.url("durable=true")) as store:
                await store.create_session()
        warnings = [r.getMessage() for r in caplog.records if r.name == "sessionkeeper"]
        if expected is None:
            assert warnings == []
        else:
            assert len(warnings) == 1
            assert expected in warnings[0]
            assert str(server.port) in warnings[0]


# --- round trips -----------------------------------------------------------------------


async def sent_by_clients(port: int, action: Callable[[], Awaitable[object]]) -> list[str]:
    """The commands clients sent the server while ``action`` ran (MONITOR shows commands
    run inside scripts apart, as from "lua")."""
    watcher = Redis(port=port, decode_responses=True)
    marker = Redis(port=port)
    await marker.ping()  # connected before MONITOR starts, so its handshake is not seen
    try:
        async with watcher.monitor() as monitor:
            await action()
            await marker.echo("end-of-action")
            sent: list[str] = []
            while True:
                command = await monitor.next_command()
                if command["command"] == "ECHO end-of-action":
                    return sent
                if command["client_type"] != "lua":
                    sent.append(command["command"].split()[0])
    finally:
        await watcher.aclose()
        await marker.aclose()


async def test_hot_operations_are_one_evalsha(server: Server) -> None:
    async with _store(server.url()) as store:
        session = await store.create_session()
        await store.append_message(session.id, "user", "warm up")
        port = server.port
        assert await sent_by_clients(port, lambda: store.create_session()) == ["EVALSHA"]
        assert await sent_by_clients(
            port, lambda: store.append_message(session.id, "user", "hi")
        ) == ["EVALSHA"]
        assert await sent_by_clients(
            port,
            lambda: store.append_messages(
                session.id, [{"role": "user"}, {"role": "assistant"}], expected_version=3
            ),
        ) == ["EVALSHA"]
        assert await sent_by_clients(port, lambda: store.get_session(session.id)) == ["EVALSHA"]
        assert await sent_by_clients(port, lambda: store.last_messages(session.id, 10)) == [
            "EVALSHA"
        ]
        # A merge patch: a read, then a compare-and-set on the version.
        assert await sent_by_clients(port, lambda: store.update_state(session.id, {"a": 1})) == [
            "EVALSHA",
            "EVALSHA",
        ]


async def test_appends_and_reads_of_one_turn_share_one_evalsha(server: Server) -> None:
    """On one server the calls of one event-loop turn go out as one script call, and each
    still gets its own result: a missing session or a stale version fails alone, and two
    appends to one session land one after the other."""
    clock = FrozenClock()
    async with _store(server.url(), clock) as store:
        ids = [(await store.create_session(idle_ttl=60)).id for _ in range(6)]
        for sid in ids:
            await store.append_message(sid, "user", "first")
        written: list[Any] = []

        async def appends() -> None:
            written[:] = await asyncio.gather(
                *(store.append_message(sid, "user", "second", input_tokens=2) for sid in ids),
                store.append_message("missing", "user", "x"),
                store.append_message(ids[0], "user", "stale", expected_version=2),
                store.append_messages(ids[1], [{"role": "user", "content": "third"}] * 2),
                return_exceptions=True,
            )

        assert await sent_by_clients(server.port, appends) == ["EVALSHA"]
        assert [m.seq for m in written[:6]] == [2] * 6
        assert isinstance(written[6], NotFound)
        assert isinstance(written[7], VersionConflict)
        assert [m.seq for m in written[8]] == [3, 4]

        clock.advance(30)
        read: list[Any] = []

        async def reads() -> None:
            read[:] = await asyncio.gather(
                *(store.last_messages(sid, 2) for sid in ids),
                store.read_messages(ids[1], after_seq=1, limit=2),
                store.last_messages("missing"),
                return_exceptions=True,
            )

        assert await sent_by_clients(server.port, reads) == ["EVALSHA"]
        assert [[m.seq for m in found] for found in read[:6]] == [[1, 2], [3, 4]] + [[1, 2]] * 4
        assert [m.content for m in read[6]] == ["second", "third"]
        assert isinstance(read[7], NotFound)
        for sid in ids:  # every read renewed its session's idle expiry
            session = await store.get_session(sid)
            assert session.expires_at is not None
            assert session.expires_at.timestamp() == clock.now() + 60
            assert session.input_tokens == 2


async def test_a_failing_call_of_a_turn_fails_alone(server: Server) -> None:
    async with _store(server.url()) as store:
        good = [(await store.create_session()).id for _ in range(3)]
        bad = await store.create_session()
        client = Redis(port=server.port)
        try:  # what the script finds is not a sorted set: ZADD fails with WRONGTYPE
            await client.set(_keys("sk:", bad.id)[2], "not a sorted set")
        finally:
            await client.aclose()
        outcomes = await asyncio.gather(
            store.append_message(good[0], "user", "a"),
            store.append_message(bad.id, "user", "b"),
            *(store.append_message(sid, "user", "c") for sid in good[1:]),
            store.last_messages(bad.id),
            store.last_messages(good[0]),
            return_exceptions=True,
        )
        assert [type(o).__name__ for o in outcomes] == [
            "Message",
            "BackendUnavailable",
            "Message",
            "Message",
            "BackendUnavailable",
            "list",
        ]
        assert "WRONGTYPE" in str(outcomes[1])
        assert (await store.get_session(bad.id)).message_count == 0


# --- native TTL ------------------------------------------------------------------------


def _keys(prefix: str, session_id: str, tenant: str = "default") -> list[str]:
    tag = f"{prefix}{{{tenant}/{session_id}}}"
    return [f"{tag}:meta", f"{tag}:state", f"{tag}:msgs"]


async def test_every_key_of_a_session_expires_natively_when_it_does(
    shared: tuple[str, str],
) -> None:
    url, prefix = shared
    clock = FrozenClock(time.time())
    client = Redis.from_url(SHARED)
    try:
        async with _store(url, clock) as store:
            timed = await store.create_session(ttl=60)
            await store.append_message(timed.id, "user", "hi")
            for key in _keys(prefix, timed.id):
                assert 59_000 < await client.pttl(key) <= 60_000

            idle = await store.create_session(idle_ttl=30)
            await store.append_message(idle.id, "user", "hi")
            clock.advance(20)
            await store.get_session(idle.id)  # renewed to now + 30 = 50 s from the start
            for key in _keys(prefix, idle.id):
                assert 49_000 < await client.pttl(key) <= 50_000

            forever = await store.create_session()
            await store.append_message(forever.id, "user", "hi")
            assert {await client.pttl(key) for key in _keys(prefix, forever.id)} == {-1}
    finally:
        await client.aclose()


async def test_a_loaded_session_expires_natively(shared: tuple[str, str]) -> None:
    url, prefix = shared
    clock = FrozenClock(time.time())
    client = Redis.from_url(SHARED)
    try:
        async with _store(url, clock) as store:
            session = await store.create_session(ttl=60)
            await store.append_message(session.id, "user", "hi")
            exported = await store.engine.export_session("default", session.id, clock.now())
            assert exported is not None
            await client.delete(*_keys(prefix, session.id))
            assert await store.engine.load_session(*exported, clock.now(), replace=False)
            for key in _keys(prefix, session.id):
                assert 59_000 < await client.pttl(key) <= 60_000
    finally:
        await client.aclose()


async def test_an_append_that_recreates_the_messages_key_gives_it_the_ttl(
    shared: tuple[str, str],
) -> None:
    # The append script refreshes only the msgs key's TTL when the expiry stays; a pop that
    # empties the history deletes that key, and the next append must bring it back with one.
    url, prefix = shared
    client = Redis.from_url(SHARED)
    try:
        async with _store(url, FrozenClock(time.time())) as store:
            session = await store.create_session(ttl=60)
            await store.append_message(session.id, "user", "hi")
            await store.pop_message(session.id)
            msgs = _keys(prefix, session.id)[2]
            assert await client.exists(msgs) == 0
            await store.append_message(session.id, "user", "again")
            assert 59_000 < await client.pttl(msgs) <= 60_000
    finally:
        await client.aclose()


async def test_token_sums_beyond_a_double_stay_exact(shared: tuple[str, str]) -> None:
    # The append script sums tokens in Lua (doubles) and falls back to HINCRBY beyond 2^52.
    url, _ = shared
    big = 2**60 + 1
    async with _store(url) as store:
        session = await store.create_session()
        await store.append_message(session.id, "user", "a", input_tokens=3, output_tokens=4)
        await store.append_messages(
            session.id,
            [
                {"role": "user", "input_tokens": big, "output_tokens": 1},
                {"role": "user", "input_tokens": 1, "output_tokens": big},
            ],
        )
        record = await store.get_session(session.id)
        assert (record.input_tokens, record.output_tokens) == (big + 4, big + 5)
        assert record.message_count == 3
        await store.append_message(session.id, "user", "b", input_tokens=1, output_tokens=1)
        record = await store.get_session(session.id)
        assert (record.input_tokens, record.output_tokens) == (big + 5, big + 6)
        assert (record.message_count, record.version) == (4, 4)


async def test_an_expiry_already_past_on_the_server_clock_sets_no_ttl(
    shared: tuple[str, str],
) -> None:
    url, prefix = shared
    clock = FrozenClock(time.time() - 3600)  # an hour behind the server
    client = Redis.from_url(SHARED)
    try:
        async with _store(url, clock) as store:
            session = await store.create_session(ttl=60)
            assert {await client.pttl(key) for key in _keys(prefix, session.id)[:2]} == {-1}
            clock.advance(60)
            with pytest.raises(NotFound):
                await store.get_session(session.id)
            assert await store.purge_expired() == 1
        # Only the registry of tenants is left, so that purging every tenant finds this one,
        # and the analytics history, which purging never takes back.
        left = [key async for key in client.scan_iter(match=f"{prefix}*")]
        assert [key for key in left if b":daily:" not in key] == [f"{prefix}tenants".encode()]
    finally:
        await client.aclose()


async def test_purge_cleans_up_after_sessions_redis_dropped(shared: tuple[str, str]) -> None:
    url, prefix = shared
    clock = FrozenClock()
    client = Redis.from_url(SHARED)
    try:
        async with _store(url, clock) as store:
            dropped = await store.create_session(owner="ann", ttl=10)
            await store.append_message(dropped.id, "user", "hi")
            await client.delete(*_keys(prefix, dropped.id))  # what Redis does at its TTL
            clock.advance(10)
            expired: list[str] = []
            store.on("expired", lambda event: expired.append(event.session_id))
            # Redis deleted it; the purge that clears its entries announces its expiry
            assert await store.purge_expired() == 1
            assert expired == [dropped.id]
            assert await store.purge_expired() == 0
        left = [key async for key in client.scan_iter(match=f"{prefix}{{default}}:*")]
        left = [key for key in left if b":daily:" not in key]  # analytics history stays
        assert left == [], "its index entries, found through the entries hash, are gone"
    finally:
        await client.aclose()


# --- key layout and indexes ------------------------------------------------------------


async def _all_keys(client: Redis, prefix: str) -> list[str]:
    return sorted([key async for key in client.scan_iter(match=f"{prefix}*")])


async def test_keys_of_a_session_share_a_slot_and_indexes_live_in_the_tenant_slot(
    shared: tuple[str, str],
) -> None:
    url, prefix = shared
    client = Redis.from_url(SHARED, decode_responses=True)
    try:
        async with _store(url) as store:
            folder = await store.create_folder("Work", owner="ann")
            session = await store.create_session(owner="ann", folder=folder.id, ttl=60)
            await store.append_message(session.id, "user", "hi")
        keys = await _all_keys(client, prefix)
        mine = _keys(prefix, session.id)
        assert set(mine) <= set(keys)
        assert len({key_slot(k.encode()) for k in mine}) == 1
        tenant_keys = [k for k in keys if k.startswith(f"{prefix}{{default}}")]
        assert len({key_slot(k.encode()) for k in tenant_keys}) == 1
        assert key_slot(tenant_keys[0].encode()) != key_slot(mine[0].encode())
        assert set(keys) == {*mine, *tenant_keys, f"{prefix}tenants"}
    finally:
        await client.aclose()


async def test_listings_skip_and_remove_stale_entries(shared: tuple[str, str]) -> None:
    url, prefix = shared
    client = Redis.from_url(SHARED, decode_responses=True)
    by_owner = f"{prefix}{{default}}:by-owner:=ann"
    try:
        async with _store(url) as store:
            kept = await store.create_session(session_id="kept", owner="ann")
            await store.create_session(session_id="gone", owner="ann")
            await store.create_session(session_id="moved", owner="ann")
            await client.delete(*_keys(prefix, "gone"))  # as if its index cleanup never ran
            await client.hset(_keys(prefix, "moved")[0], "owner", "bob")

            page = await store.list_sessions(owner="ann")
            assert [s.id for s in page.items] == [kept.id]
            assert await store.count_sessions(owner="ann") == 1
            assert await client.zrange(by_owner, 0, -1) == ["kept"]
            assert await store.count_sessions() == 2
            assert await client.zscore(f"{prefix}{{default}}:by-created", "gone") is None

            # An entry a failure left out comes back with the session's next change.
            assert await store.count_sessions(owner="bob") == 0
            await store.update_session("moved", title="touched")
            assert [s.id for s in (await store.list_sessions(owner="bob")).items] == ["moved"]
    finally:
        await client.aclose()


async def test_purge_leaves_the_indexes_exact(shared: tuple[str, str]) -> None:
    url, prefix = shared
    clock = FrozenClock()
    client = Redis.from_url(SHARED, decode_responses=True)
    try:
        async with _store(url, clock) as store:
            folder = await store.create_folder("Work", owner="ann")
            survivors = set()
            for i in range(12):
                # never expires; idle 5 s within 20 s; 8 s; 8 s
                ttl, idle_ttl = [(None, None), (20, 5), (8, None), (8, None)][i % 4]
                session = await store.create_session(
                    owner=["ann", "bob", None][i % 3],
                    folder=folder.id if i % 3 == 0 else None,
                    status="completed" if i % 2 else "active",
                    ttl=ttl,
                    idle_ttl=idle_ttl,
                )
                await store.append_message(session.id, "user", f"m{i}")
                if ttl is None or idle_ttl is not None:
                    survivors.add(session.id)
            clock.advance(4)
            for summary in (await store.list_sessions(limit=100)).items:
                if summary.idle_ttl is not None:  # renewed to 9 s; the index still says 5 s
                    await store.get_session(summary.id)
            clock.advance(4.5)
            assert await store.purge_expired(batch_size=2) == 12 - len(survivors)
            for key in await _all_keys(client, f"{prefix}{{default}}:by-"):
                assert set(await client.zrange(key, 0, -1)) <= survivors, key
            assert set(await client.hkeys(f"{prefix}{{default}}:entries")) == survivors
            session_keys = [k for k in await _all_keys(client, prefix) if "{default/" in k]
            assert {k.split("/")[1].split("}")[0] for k in session_keys} == survivors
            assert await store.count_sessions() == len(survivors)
    finally:
        await client.aclose()


# --- stats counters --------------------------------------------------------------------


async def _calls(client: Redis) -> dict[str, int]:
    """How many times the server ran each command so far (commands scripts ran included)."""
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in info.items()}


async def _made(store: SessionStore, count: int) -> None:
    """``count`` sessions of three owners, every fourth completed, every tenth with a TTL of
    100 s, each with one message."""
    for i in range(count):
        session = await store.create_session(
            owner=["ann", "bob", None][i % 3],
            status="completed" if i % 4 == 0 else "active",
            ttl=100 if i % 10 == 0 else None,
        )
        await store.append_message(
            session.id, "user", "hi", input_tokens=i, output_tokens=1, cost=0.01 * i
        )


async def _assert_as_loaded(store: SessionStore, now: float, stats: Stats, top: int = 3) -> None:
    """``stats`` are what loading every session (as stats did before the counters) gives."""
    engine = store.engine
    assert isinstance(engine, RedisEngine)
    index = _Index(engine._tenant(store.tenant).created, "created_at")
    live = await engine._matching(store.tenant, index, SessionQuery(), now)
    loaded = rules.stats_of(live, now - 86_400, top)
    costs = ("cost", "top_owners_by_cost")
    assert stats.model_dump(exclude=set(costs)) == loaded.model_dump(exclude=set(costs))
    assert stats.cost == pytest.approx(loaded.cost)
    # The counters sum cost exactly (nano-units), so owners whose float sums differ in the
    # last bit tie, and rank by name.
    by_cost = {o.owner: pytest.approx(o.cost) for o in loaded.top_owners_by_cost}
    assert {o.owner: o.cost for o in stats.top_owners_by_cost} == by_cost


async def test_stats_read_the_counters_never_the_sessions(server: Server) -> None:
    clock = FrozenClock()
    client = Redis(port=server.port, decode_responses=True)
    try:
        async with _store(server.url(), clock) as store:
            await _made(store, 200)
            clock.advance(2 * 86_400)  # 20 sessions expire; nothing purges them
            for summary in (await store.list_sessions(limit=5)).items:
                await store.update_session(summary.id, title="recent")
            before = await _calls(client)
            stats = await store.stats(top=3)
            ran = {
                name: calls - before.get(name, 0)
                for name, calls in (await _calls(client)).items()
                if calls != before.get(name, 0) and name != "info"
            }
            await _assert_as_loaded(store, clock.now(), stats)
        assert (stats.total, stats.recently_active) == (180, 5)
        # One script over the tenant's keys (the counters; each expiry candidate's tally
        # and by-updated score; the tallies of the sessions updated in the last 24 h, one
        # HMGET a thousand), and the meta of the 20 expired sessions, two fields each:
        # nothing that grows with the 180 live sessions or their messages.
        assert ran == {
            "evalsha": 1,
            "hexists": 1,
            "hgetall": 1,
            "zrangebyscore": 2,
            "hget": 20,
            "zscore": 20,
            "hmget": 1 + 20,
        }
    finally:
        await client.aclose()


async def test_a_tenant_written_before_the_counters_is_counted_once(
    shared: tuple[str, str],
) -> None:
    url, prefix = shared
    clock = FrozenClock()
    client = Redis.from_url(SHARED, decode_responses=True)
    counters = f"{prefix}{{default}}:counters"
    try:
        async with _store(url, clock) as store:
            await _made(store, 30)
            # As an older release left it: no counters, no tallies. A write before the first
            # stats counts its session, and no other.
            await client.delete(counters, f"{prefix}{{default}}:tallies")
            first = (await store.list_sessions(limit=1)).items[0].id
            await store.append_message(first, "user", "again", input_tokens=1)
            clock.advance(100)
            found = {c.kind: c.found for c in (await checks.check(store)).counts if c.found}
            assert found == {"totals": 1}  # not counted yet
            stats = await store.stats(top=3)
            await _assert_as_loaded(store, clock.now(), stats)
            assert await client.hget(counters, "v") == "1"
            assert await store.stats(top=3) == stats
            assert [c for c in (await checks.check(store)).counts if c.found] == []
    finally:
        await client.aclose()


async def test_counts_from_other_nodes_apply_once_and_in_order(shared: tuple[str, str]) -> None:
    # On Cluster a session's figures reach the tenant's node after its script: a late call
    # (an older version) or a repeated one changes nothing, nor does a drop of an older copy.
    url, prefix = shared
    client = Redis.from_url(SHARED, decode_responses=True)
    tag = f"{prefix}{{default}}"
    keys = [f"{tag}:tallies", f"{tag}:counters", f"{tag}:by-created", f"{tag}:by-updated"]
    keys += [f"{tag}:tallies-gone", f"{tag}:tallies-gone-at"]

    def figures(version: int, messages: int, status: str = "active") -> str:
        return "\x1f".join((str(version), "10.0", "=ann", status, str(messages), "3", "0", "0.5"))

    try:
        async with _store(url) as store:
            engine = store.engine
            assert isinstance(engine, RedisEngine)

            async def tally(*args: str) -> dict[str, str]:
                await engine._eval("tally", keys, list(args))
                found = await client.hgetall(keys[1])
                return {str(k): str(v) for k, v in found.items()}

            group = "\x1factive\x1f=ann"
            counted = {"v": "1", f"n{group}": "1", f"m{group}": "4", f"i{group}": "3"}
            counted[f"c{group}"] = "500000000"
            assert await tally("s", "set", figures(2, 4)) == counted
            assert await tally("s", "set", figures(1, 1), "s", "set", figures(2, 4)) == counted
            assert await tally("s", "drop", "10.0\x1f1") == counted
            moved = await tally("s", "set", figures(3, 4, "archived"))
            assert moved == {k.replace("active", "archived"): v for k, v in counted.items()}
            assert await tally("s", "drop", "10.0\x1f3") == {}
            assert await client.exists(*keys[:2]) == 0
            # A write that lost a race with the deletion comes after it: it stays gone.
            assert await tally("s", "set", figures(3, 9)) == {}
            # Created again, later: counted.
            again = "\x1f".join(("1", "11.0", "=ann", "active", "4", "3", "0", "0.5"))
            assert await tally("s", "set", again) == counted
    finally:
        await client.aclose()


@pytest.fixture(params=["server", "cluster"])
def either(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL of a prefix of the test's own on the shared server, or on the suite's Cluster."""
    prefix = f"sk_t_{secrets.token_hex(5)}:"
    if request.param == "cluster":
        node = request.getfixturevalue("redis_cluster")
        url = f"redis://{node}/0?cluster=true&prefix={prefix}"
    else:
        url = f"{SHARED}?prefix={prefix}"
    yield url
    drop_namespace(url)


class _Ticking(FrozenClock):
    """A clock a millisecond further at each reading (a frozen clock gives a session
    created again under an id the created_at of the one deleted), until it is stopped."""

    ticking = True

    def now(self) -> float:
        if self.ticking:
            self.advance(0.001)
        return super().now()


_ACTIONS = (
    "create",
    "create",
    "append",
    "append",
    "status",
    "owner",
    "pop",
    "clear",
    "delete",
    "purge",
)


@pytest.mark.parametrize("seed", range(3))
async def test_counters_stay_exact_under_racing_writes(either: str, seed: int) -> None:
    # Writers race on a few ids: creates, appends, changes of status and owner, pops,
    # clears, deletes and purges (some sessions live 50 ms), each counted on the tenant's
    # node after its script on Cluster. Then stats are what the sessions add up to, and
    # check finds no wrong totals.
    clock = _Ticking()
    rng = random.Random(seed)
    ids = [f"s{i}" for i in range(12)]
    async with _store(either, clock) as store:

        async def write(sid: str) -> None:
            action = rng.choice(_ACTIONS)
            try:
                if action == "create":
                    await store.create_session(
                        session_id=sid,
                        owner=rng.choice(["o1", "o2", None]),
                        ttl=rng.choice([None, 0.05, 5]),
                    )
                elif action == "append":
                    await store.append_message(
                        sid, "user", "x", input_tokens=rng.randint(0, 9), cost=rng.random()
                    )
                elif action == "status":
                    await store.update_session(
                        sid, status=rng.choice(["active", "completed", "archived"])
                    )
                elif action == "owner":
                    await store.update_session(sid, owner=rng.choice(["o1", "o9", None]))
                elif action == "pop":
                    await store.pop_message(sid)
                elif action == "clear":
                    await store.clear_messages(sid)
                elif action == "purge":
                    await store.purge_expired(batch_size=3)
                else:
                    await store.delete_session(sid)
            except (NotFound, AlreadyExists):
                pass  # another writer got there first

        for _ in range(6):
            await asyncio.gather(*(write(rng.choice(ids)) for _ in range(150)))
        clock.ticking = False
        stats = await store.stats(top=10)
        engine = store.engine
        assert isinstance(engine, RedisEngine)
        stored = [r for r in await engine._load(store.tenant, ids) if r is not None]
        live = [r for r in stored if not rules.is_expired(r.expires_at, clock.now())]
        loaded = rules.stats_of(live, clock.now() - 86_400, 10)
        costs = {"cost", "top_owners_by_cost"}
        assert stats.model_dump(exclude=costs) == loaded.model_dump(exclude=costs)
        assert stats.cost == pytest.approx(loaded.cost)
        await store.purge_expired()
        assert await store.stats(top=10) == stats
        totals = [c for c in (await checks.check(store)).counts if c.kind == "totals"]
        assert [(c.found, c.samples) for c in totals] == [(0, [])]


# --- processes -------------------------------------------------------------------------


def _use_after_fork(store: SessionStore, queue: multiprocessing.Queue[str]) -> None:
    try:
        asyncio.run(store.count_sessions())
    except BackendUnavailable as exc:
        queue.put(str(exc))
    else:
        queue.put("used the parent's store")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_a_store_is_never_reused_across_fork(shared: tuple[str, str]) -> None:
    url, _ = shared
    context = multiprocessing.get_context("fork")
    async with _store(url) as store:
        await store.create_session()
        queue: multiprocessing.Queue[str] = context.Queue()
        child = context.Process(target=_use_after_fork, args=(store, queue))
        child.start()
        child.join(30)
        assert "before fork" in queue.get(timeout=5)
        assert await store.count_sessions() == 1


async def test_rate_hits_of_one_turn_share_one_evalsha(server: Server) -> None:
    """The hits of one event-loop turn go as one script call; each keeps its own answer,
    hits on one key count one after the other, and a broken log fails its hit alone."""
    async with _store(server.url()) as store:
        client = Redis(port=server.port)
        try:  # a log that is not a list: LLEN fails with WRONGTYPE
            await client.set("sk:{default}:log:rate:broken", "not a list")
        finally:
            await client.aclose()
        outcomes: list[Any] = []

        async def hits() -> None:
            outcomes[:] = await asyncio.gather(
                *(store.hit("shared", 3, 60) for _ in range(5)),
                store.hit("broken", 3, 60),
                store.hit("other", 3, 60),
                return_exceptions=True,
            )

        assert await sent_by_clients(server.port, hits) == ["EVALSHA"]
        assert [o.allowed for o in outcomes[:5]] == [True, True, True, False, False]
        assert [o.remaining for o in outcomes[:5]] == [2, 1, 0, 0, 0]
        assert isinstance(outcomes[5], BackendUnavailable)
        assert "WRONGTYPE" in str(outcomes[5])
        assert outcomes[6].allowed
