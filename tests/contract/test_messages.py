"""Contract: appending, reading, paging, popping and clearing messages; aggregates."""

from __future__ import annotations

import pytest

from sessionkeeper import FrozenClock, MessageIn, NotFound, SessionStore


async def test_append_assigns_consecutive_seqs_and_keeps_aggregates(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session()
    first = await store.append_message(
        session.id, "user", "hello", input_tokens=10, metadata={"ip": "x"}
    )
    assert (first.seq, first.role, first.content, first.metadata) == (
        1,
        "user",
        "hello",
        {"ip": "x"},
    )
    assert first.created_at.timestamp() == clock.now()
    batch = await store.append_messages(
        session.id,
        [
            MessageIn(role="assistant", content={"type": "text", "parts": ["hi"]}, output_tokens=4),
            {"role": "tool", "content": [1, 2.5, None, True], "cost": 0.125},
        ],
    )
    assert [m.seq for m in batch] == [2, 3]
    after = await store.get_session(session.id)
    assert (after.message_count, after.last_seq) == (3, 3)
    assert (after.input_tokens, after.output_tokens, after.cost) == (10, 4, 0.125)
    assert after.version == 3


async def test_an_append_never_rewrites_earlier_messages(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session()
    first = await store.append_message(session.id, "user", "one")
    clock.advance(10)
    await store.append_message(session.id, "assistant", "two")
    read = await store.read_messages(session.id)
    assert read[0] == first


async def test_read_after_a_seq_and_page_through(store: SessionStore) -> None:
    session = await store.create_session()
    await store.append_messages(
        session.id, [{"role": "user", "content": f"m{i}"} for i in range(1, 26)]
    )
    assert [m.content for m in await store.read_messages(session.id, after_seq=20)] == [
        "m21",
        "m22",
        "m23",
        "m24",
        "m25",
    ]
    seen: list[int] = []
    after = 0
    while page := await store.read_messages(session.id, after_seq=after, limit=7):
        seen += [m.seq for m in page]
        after = page[-1].seq
    assert seen == list(range(1, 26))


async def test_last_n_messages_come_oldest_first(store: SessionStore) -> None:
    session = await store.create_session()
    await store.append_messages(session.id, [{"role": "user", "content": i} for i in range(1, 13)])
    assert [m.content for m in await store.last_messages(session.id, 3)] == [10, 11, 12]
    assert len(await store.last_messages(session.id, 50)) == 12


async def test_pop_removes_the_newest_and_seqs_are_not_reused(store: SessionStore) -> None:
    session = await store.create_session()
    await store.append_messages(
        session.id,
        [
            {"role": "user", "content": "a", "input_tokens": 3},
            {"role": "assistant", "content": "b", "output_tokens": 5, "cost": 0.5},
        ],
    )
    popped = await store.pop_message(session.id)
    assert popped is not None
    assert (popped.seq, popped.content) == (2, "b")
    after = await store.get_session(session.id)
    assert (after.message_count, after.input_tokens, after.output_tokens, after.cost) == (
        1,
        3,
        0,
        0.0,
    )
    again = await store.append_message(session.id, "assistant", "c")
    assert again.seq == 3
    assert [m.seq for m in await store.read_messages(session.id)] == [1, 3]


async def test_pop_on_an_empty_history_returns_none_and_changes_nothing(
    store: SessionStore,
) -> None:
    session = await store.create_session()
    assert await store.pop_message(session.id) is None
    assert (await store.get_session(session.id)).version == session.version


async def test_clear_removes_every_message_and_zeroes_aggregates(store: SessionStore) -> None:
    session = await store.create_session(state={"keep": 1})
    await store.append_messages(
        session.id,
        [{"role": "user", "content": str(i), "input_tokens": 2, "cost": 0.1} for i in range(5)],
    )
    assert await store.clear_messages(session.id) == 5
    after = await store.get_session(session.id)
    assert (after.message_count, after.input_tokens, after.output_tokens, after.cost) == (
        0,
        0,
        0,
        0.0,
    )
    assert after.state == {"keep": 1}
    assert await store.read_messages(session.id) == []
    assert (await store.append_message(session.id, "user", "next")).seq == 6


async def test_messages_of_a_missing_session_are_not_found(store: SessionStore) -> None:
    for call in (
        store.read_messages("missing"),
        store.last_messages("missing"),
        store.pop_message("missing"),
        store.clear_messages("missing"),
        store.append_message("missing", "user", "x"),
    ):
        with pytest.raises(NotFound):
            await call
