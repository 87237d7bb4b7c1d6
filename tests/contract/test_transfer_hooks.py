"""Contract: the engine hooks that copy a store whole (list_tenants, export_session,
load_session, load_folder), called on the engine as transfer calls them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest

from sessionkeeper import (
    AlreadyExists,
    FrozenClock,
    NotFound,
    SessionStore,
    Settings,
    open_store,
)
from sessionkeeper.engines.base import Engine
from sessionkeeper.models import FolderRecord, MessageRecord, SessionRecord

Export = tuple[SessionRecord, list[MessageRecord]]


@pytest.fixture
async def target(url_factory: Callable[[], str], clock: FrozenClock) -> AsyncIterator[SessionStore]:
    """A second store of the same engine, in a namespace of its own."""
    url = url_factory()
    async with open_store(url, settings=Settings(url=url), clock=clock) as opened:
        yield opened


async def _export(store: SessionStore, session_id: str, clock: FrozenClock) -> Export:
    exported = await store.engine.export_session(store.tenant, session_id, clock.now())
    assert exported is not None
    return exported


async def _source(store: SessionStore, clock: FrozenClock) -> Export:
    """A session in a folder with state, metadata, an idle expiry and messages 1, 2 and 4
    (3 was popped), exported."""
    folder = await store.create_folder("Work", owner="alice")
    session = await store.create_session(
        owner="alice",
        folder=folder.id,
        title="Trip",
        step="dates",
        state={"draft": {"title": "Engineer", "n": [1, 2.5, None]}},
        metadata={"source": "web"},
        idle_ttl=3600,
        ttl=86_400,
    )
    await store.append_message(session.id, "user", "hello", input_tokens=10, metadata={"ip": "x"})
    clock.advance(1)
    await store.append_message(session.id, "assistant", {"parts": ["hi"]}, output_tokens=4)
    await store.append_message(session.id, "tool", [1, 2], cost=0.1)
    await store.pop_message(session.id)
    clock.advance(1)
    await store.append_message(session.id, "assistant", "bye", output_tokens=2, cost=0.2)
    return await _export(store, session.id, clock)


async def _load_folders(source: SessionStore, target: SessionStore, clock: FrozenClock) -> None:
    engine = source.engine
    for folder in await engine.list_folders(source.tenant, None, False, clock.now()):
        assert await target.engine.load_folder(folder, replace=False)


# --- list_tenants ----------------------------------------------------------------------


async def test_list_tenants_names_those_with_live_sessions_or_folders_sorted(
    store: SessionStore, clock: FrozenClock
) -> None:
    engine = store.engine
    assert await engine.list_tenants(clock.now()) == []
    await store.for_tenant("zeta").create_session()
    await store.for_tenant("B").create_folder("Work")  # folders alone count too
    await store.for_tenant("a").create_session(ttl=10)
    await store.for_tenant("a").create_session(idle_ttl=5)
    await store.for_tenant("gone").create_session(ttl=10)
    assert await engine.list_tenants(clock.now()) == ["B", "a", "gone", "zeta"]  # code points
    clock.advance(10)  # "a" and "gone" have expired sessions only
    assert await engine.list_tenants(clock.now()) == ["B", "zeta"]


# --- export_session --------------------------------------------------------------------


async def test_export_reads_the_session_its_state_and_every_message_with_gaps(
    store: SessionStore, clock: FrozenClock
) -> None:
    record, messages = await _source(store, clock)
    session = await store.get_session(record.id)
    assert record.tenant == store.tenant
    assert (record.owner, record.folder, record.title, record.step) == (
        "alice",
        session.folder,
        "Trip",
        "dates",
    )
    assert record.state is not None
    assert json.loads(record.state) == session.state
    assert session.state == {"draft": {"title": "Engineer", "n": [1, 2.5, None]}}
    assert json.loads(record.metadata) == {"source": "web"}
    assert (record.version, record.message_count, record.last_seq) == (
        session.version,
        3,
        4,
    )
    assert (record.input_tokens, record.output_tokens, record.cost) == (10, 6, 0.2)
    assert [m.seq for m in messages] == [1, 2, 4]
    assert [m.role for m in messages] == ["user", "assistant", "assistant"]
    assert [m.session_id for m in messages] == [record.id] * 3
    read = await store.read_messages(record.id)
    assert [(m.seq, m.input_tokens, m.output_tokens, m.cost) for m in read] == [
        (m.seq, m.input_tokens, m.output_tokens, m.cost) for m in messages
    ]
    assert [m.created_at.timestamp() for m in read] == [m.created_at for m in messages]


async def test_export_of_an_empty_history_has_no_messages(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(state={"a": 1})
    record, messages = await _export(store, session.id, clock)
    assert (record.id, record.message_count, messages) == (session.id, 0, [])


async def test_export_renews_nothing_and_an_expired_session_is_absent(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(idle_ttl=60)
    await store.append_message(session.id, "user", "hi")
    before, _ = await _export(store, session.id, clock)
    assert before.expires_at == clock.now() + 60
    clock.advance(59)
    after, messages = await _export(store, session.id, clock)
    assert (after.expires_at, after.version, len(messages)) == (before.expires_at, 2, 1)
    clock.advance(1)
    assert await store.engine.export_session(store.tenant, session.id, clock.now()) is None
    assert await store.engine.export_session(store.tenant, "no-such", clock.now()) is None
    with pytest.raises(NotFound):
        await store.get_session(session.id)


# --- load_session ----------------------------------------------------------------------


async def test_load_writes_the_session_exactly(
    store: SessionStore, target: SessionStore, clock: FrozenClock
) -> None:
    record, messages = await _source(store, clock)
    await _load_folders(store, target, clock)
    assert await target.engine.load_session(record, messages, clock.now(), replace=False)
    assert await _export(target, record.id, clock) == (record, messages)


async def test_a_loaded_session_is_listed_counted_and_appended_to(
    store: SessionStore, target: SessionStore, clock: FrozenClock
) -> None:
    record, messages = await _source(store, clock)
    await _load_folders(store, target, clock)
    clock.advance(1)
    other = await target.create_session(owner="alice")  # created and updated after it
    await target.engine.load_session(record, messages, clock.now(), replace=False)
    assert record.folder is not None

    listed = await target.list_sessions(owner="alice")
    assert [s.id for s in listed.items] == [other.id, record.id]
    by_update = await target.list_sessions(order_by="updated_at", descending=False)
    assert [s.id for s in by_update.items] == [record.id, other.id]
    assert [s.id for s in (await target.list_sessions(folder=record.folder)).items] == [record.id]
    assert await target.count_sessions(status="active") == 2
    assert await target.count_sessions(folder=record.folder) == 1
    stats = await target.stats()
    assert (stats.total, stats.messages, stats.output_tokens) == (2, 3, 6)
    folder = await target.get_folder(record.folder)
    assert folder.session_count == 1

    appended = await target.append_message(record.id, "user", "more")
    assert appended.seq == record.last_seq + 1 == 5
    session = await target.get_session(record.id)
    assert (session.version, session.message_count) == (record.version + 1, 4)
    assert [m.seq for m in await target.read_messages(record.id)] == [1, 2, 4, 5]


async def test_a_loaded_session_expires_and_is_purged(
    store: SessionStore, target: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(ttl=100)
    await store.append_message(session.id, "user", "hi")
    record, messages = await _export(store, session.id, clock)
    assert await target.engine.load_session(record, messages, clock.now(), replace=False)
    clock.advance(100)
    with pytest.raises(NotFound):
        await target.get_session(session.id)
    assert await target.purge_expired() == 1
    assert await target.count_sessions() == 0


async def test_load_keeps_a_live_session_unless_replace(
    store: SessionStore, target: SessionStore, clock: FrozenClock
) -> None:
    record, messages = await _source(store, clock)
    await _load_folders(store, target, clock)
    await target.create_session(session_id=record.id, owner="bob", state={"mine": True})
    await target.append_messages(
        record.id, [{"role": "user", "content": f"m{i}"} for i in range(6)]
    )

    assert not await target.engine.load_session(record, messages, clock.now(), replace=False)
    kept = await target.get_session(record.id)
    assert (kept.owner, kept.state, kept.message_count) == ("bob", {"mine": True}, 6)

    assert await target.engine.load_session(record, messages, clock.now(), replace=True)
    assert await _export(target, record.id, clock) == (record, messages)
    assert [m.seq for m in await target.read_messages(record.id)] == [1, 2, 4]
    assert (await target.list_sessions(owner="bob")).items == []
    assert await target.count_sessions(owner="bob") == 0
    assert await target.count_sessions(owner="alice") == 1


async def test_load_replaces_an_expired_session(
    store: SessionStore, target: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(state={"new": True})
    await store.append_message(session.id, "user", "new")
    await target.create_session(session_id=session.id, ttl=10, state={"old": True})
    await target.append_messages(session.id, [{"role": "user", "content": "old"}] * 3)
    clock.advance(10)
    record, messages = await _export(store, session.id, clock)
    assert await target.engine.load_session(record, messages, clock.now(), replace=False)
    loaded = await target.get_session(session.id)
    assert (loaded.state, loaded.message_count, loaded.expires_at) == ({"new": True}, 1, None)
    assert [m.content for m in await target.read_messages(session.id)] == ["new"]


async def test_load_into_a_folder_that_is_not_the_owners_writes_nothing(
    store: SessionStore, target: SessionStore, clock: FrozenClock
) -> None:
    record, messages = await _source(store, clock)  # its folder is not loaded into target
    engine = target.engine
    with pytest.raises(NotFound):
        await engine.load_session(record, messages, clock.now(), replace=False)
    assert await engine.export_session(record.tenant, record.id, clock.now()) is None
    assert await target.count_sessions() == 0

    await target.create_folder("Work", owner="bob")  # same name, another owner and id
    await target.create_session(session_id=record.id, state={"mine": True})
    # A kept live session comes first; a replacement into a missing folder changes nothing.
    assert not await engine.load_session(record, messages, clock.now(), replace=False)
    with pytest.raises(NotFound):
        await engine.load_session(record, messages, clock.now(), replace=True)
    kept = await target.get_session(record.id)
    assert (kept.state, kept.owner, kept.message_count) == ({"mine": True}, None, 0)


async def test_load_keeps_a_long_history_in_one_write(
    target: SessionStore, clock: FrozenClock
) -> None:
    now = clock.now()
    seqs = [*range(1, 1201), *range(1300, 2601)]  # a gap in the middle
    messages = [
        MessageRecord("long", seq, "user", f'"m{seq}"', seq, 1, 0.5, "{}", now - 1) for seq in seqs
    ]
    record = SessionRecord(
        target.tenant,
        "long",
        None,
        None,
        "",
        "active",
        None,
        "{}",
        "{}",
        len(seqs) + 7,
        now - 100,
        now - 1,
        None,
        None,
        None,
        len(seqs),
        2600,
        sum(seqs),
        len(seqs),
        0.5 * len(seqs),
    )
    assert await target.engine.load_session(record, messages, now, replace=False)
    assert await _export(target, "long", clock) == (record, messages)
    last = await target.last_messages("long", 3)
    assert [m.seq for m in last] == [2598, 2599, 2600]
    assert (await target.append_message("long", "user", "next")).seq == 2601


# --- load_folder -----------------------------------------------------------------------


async def test_load_folder_keeps_or_replaces_by_id_and_names_stay_unique(
    target: SessionStore, clock: FrozenClock
) -> None:
    engine: Engine = target.engine
    tenant = target.tenant
    work = FolderRecord(tenant, "f1", "alice", "Work", clock.now() - 50)
    assert await engine.load_folder(work, replace=False)
    got = await target.get_folder("f1")
    assert (got.owner, got.name, got.created_at.timestamp()) == ("alice", "Work", work.created_at)

    renamed = FolderRecord(tenant, "f1", "alice", "Play", clock.now() - 10)
    assert not await engine.load_folder(renamed, replace=False)
    assert (await target.get_folder("f1")).name == "Work"
    assert await engine.load_folder(renamed, replace=True)
    got = await target.get_folder("f1")
    assert (got.name, got.created_at.timestamp()) == ("Play", renamed.created_at)
    assert [f.id for f in await target.list_folders(owner="alice")] == ["f1"]
    await target.create_folder("Work", owner="alice")  # the old name is free again

    taken = FolderRecord(tenant, "f2", "alice", "Play", clock.now())
    for replace in (False, True):
        with pytest.raises(AlreadyExists):
            await engine.load_folder(taken, replace=replace)
    with pytest.raises(NotFound):
        await target.get_folder("f2")
    assert await engine.load_folder(FolderRecord(tenant, "f2", "bob", "Play", 1.0), False)
    assert await engine.load_folder(FolderRecord(tenant, "f3", None, "Play", 1.0), False)
    assert {(f.owner, f.name) for f in await target.list_folders()} == {
        ("alice", "Play"),
        ("alice", "Work"),
        ("bob", "Play"),
        (None, "Play"),
    }
