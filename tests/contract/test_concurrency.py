"""Concurrent writers: no lost update, no seq gap or duplicate, and data that outlives a store.

Where the engine is shared (several processes can open its URL and see one another's
data) the writers are separate processes, started with "spawn" so that no open store is
ever carried across a fork; otherwise they are tasks on one store. Time comes from
FrozenClocks; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import pytest

from sessionkeeper import (
    FrozenClock,
    Message,
    SessionStore,
    Settings,
    VersionConflict,
    open_store,
)
from tests.contract.conftest import ENGINE_URLS, SERVER_ENGINES, SHARED_ENGINES

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

WRITERS = 8
INCREMENTS = 1_250
PROCESS_TIMEOUT = 240.0  # seconds a child may take before the test gives up on it
START_TIMEOUT = 60.0  # seconds for every child to start and open its store
START = 1_700_000_000.0


# --- engines ---------------------------------------------------------------------------


def _marks(name: str, *, slow: bool) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.server] if name in SERVER_ENGINES else []
    return [*marks, pytest.mark.slow] if slow else marks


def engines_slow_when_shared() -> list[Any]:
    """Every engine; the shared ones run their writers as processes, so they are slow."""
    return [
        pytest.param(name, id=name, marks=_marks(name, slow=name in SHARED_ENGINES))
        for name in ENGINE_URLS
    ]


# Only the engines several processes can open at once are collected for these tests.
SHARED_PARAMS = [
    pytest.param(name, id=name, marks=_marks(name, slow=True))
    for name in ENGINE_URLS
    if name in SHARED_ENGINES
]


def _store(url: str, clock: FrozenClock | None = None) -> SessionStore:
    return open_store(url, settings=Settings(url=url), clock=clock or FrozenClock(START))


# --- processes -------------------------------------------------------------------------

Job = Callable[..., Coroutine[Any, Any, Any]]


def _child(results: Queue[tuple[int, bool, Any]], index: int, job: Job, args: Any) -> None:
    """The body of a spawned child: run one async job and post its result or traceback."""
    try:
        value = asyncio.run(job(*args))
    except BaseException:
        results.put((index, False, traceback.format_exc()))
    else:
        results.put((index, True, value))


async def run_processes(jobs: list[tuple[Job, tuple[Any, ...]]]) -> list[Any]:
    """Run each ``(job, args)`` in its own spawned process; return their results in order."""
    context = multiprocessing.get_context("spawn")
    results: Queue[tuple[int, bool, Any]] = context.Queue()
    children = [
        context.Process(target=_child, args=(results, index, job, args), daemon=True)
        for index, (job, args) in enumerate(jobs)
    ]
    for child in children:
        child.start()
    try:
        outcomes = [await asyncio.to_thread(results.get, True, PROCESS_TIMEOUT) for _ in children]
    finally:
        for child in children:
            await asyncio.to_thread(child.join, 30)
            if child.is_alive():
                child.kill()
                child.join()
        results.close()
        results.join_thread()
    failures = [value for _, ok, value in outcomes if not ok]
    assert not failures, "a child process failed:\n" + "\n".join(failures)
    return [value for _, _, value in sorted(outcomes, key=lambda outcome: outcome[0])]


# --- lost updates ----------------------------------------------------------------------


async def increment(store: SessionStore, session_id: str, times: int) -> int:
    """Read n, yield as an app would, write n + 1 guarded by the version read; retry on
    VersionConflict. Returns how many conflicts it met."""
    conflicts = 0
    for _ in range(times):
        while True:
            session = await store.get_session(session_id)
            n = session.state["n"]
            await asyncio.sleep(0)
            try:
                await store.update_state(session_id, {"n": n + 1}, expected_version=session.version)
            except VersionConflict:
                conflicts += 1
            else:
                break
    return conflicts


async def increment_in_child(url: str, session_id: str, times: int, start: Barrier) -> int:
    async with _store(url) as store:
        await asyncio.to_thread(start.wait, START_TIMEOUT)
        return await increment(store, session_id, times)


@pytest.mark.parametrize("engine_name", engines_slow_when_shared())
async def test_no_update_is_lost(store: SessionStore, engine_url: str, shared_engine: bool) -> None:
    session = await store.create_session(state={"n": 0})
    started = time.perf_counter()
    if shared_engine:
        start = multiprocessing.get_context("spawn").Barrier(WRITERS + 1)
        jobs: list[tuple[Job, tuple[Any, ...]]] = [
            (increment_in_child, (engine_url, session.id, INCREMENTS, start))
        ] * WRITERS
        running = asyncio.ensure_future(run_processes(jobs))
        try:  # time the writes only, from when every child has its store open
            await asyncio.to_thread(start.wait, START_TIMEOUT)
        except threading.BrokenBarrierError:
            await running  # a child failed to start: this raises with its traceback
            raise
        started = time.perf_counter()
        conflicts: list[int] = await running
    else:
        conflicts = await asyncio.gather(
            *(increment(store, session.id, INCREMENTS) for _ in range(WRITERS))
        )
    elapsed = time.perf_counter() - started

    final = await store.get_session(session.id)
    kind = "processes" if shared_engine else "tasks"
    print(
        f"\nlost-update: {WRITERS} {kind} x {INCREMENTS} increments: n={final.state['n']}, "
        f"{sum(conflicts)} conflicts {conflicts}, {elapsed:.1f} s"
    )
    assert final.state["n"] == WRITERS * INCREMENTS
    assert final.version == 1 + WRITERS * INCREMENTS  # a conflicting write changed nothing
    assert sum(conflicts) > 0


# --- concurrent appends ----------------------------------------------------------------


async def read_all(store: SessionStore, session_id: str) -> list[Message]:
    """Every message, page by page, following ``after_seq``."""
    messages: list[Message] = []
    while True:
        page = await store.read_messages(
            session_id, after_seq=messages[-1].seq if messages else 0, limit=97
        )
        if not page:
            return messages
        messages.extend(page)


def tokens_for(writer: int, index: int) -> dict[str, Any]:
    return {
        "input_tokens": writer * 1000 + index,
        "output_tokens": index % 7,
        "cost": (writer + 1) * 0.001,
    }


async def check_appended(
    store: SessionStore, session_id: str, per_writer: dict[int, int]
) -> list[Message]:
    """Seqs are exactly 1..N, each writer's messages kept their order, and the aggregates
    are the sums of what was appended."""
    total = sum(per_writer.values())
    messages = await read_all(store, session_id)
    assert [m.seq for m in messages] == list(range(1, total + 1))
    for writer, count in per_writer.items():
        mine = [m.content["i"] for m in messages if m.content["w"] == writer]
        assert mine == list(range(count)), f"writer {writer} lost or reordered messages"
    for m in messages:
        expected = tokens_for(m.content["w"], m.content["i"])
        assert (m.input_tokens, m.output_tokens, m.cost) == (
            expected["input_tokens"],
            expected["output_tokens"],
            expected["cost"],
        )
    session = await store.get_session(session_id)
    assert session.message_count == total
    assert session.last_seq == total
    assert session.version == 1 + sum(calls(w, count) for w, count in per_writer.items())
    assert session.input_tokens == sum(m.input_tokens for m in messages)
    assert session.output_tokens == sum(m.output_tokens for m in messages)
    assert session.cost == pytest.approx(sum(m.cost for m in messages))
    return messages


def batch_size(writer: int) -> int:
    """Even writers append one message per call, odd writers two."""
    return 2 if writer % 2 else 1


def calls(writer: int, count: int) -> int:
    return -(-count // batch_size(writer))


async def append_as(store: SessionStore, session_id: str, writer: int, count: int) -> list[int]:
    """Append ``count`` messages, ``batch_size(writer)`` per call; return the seqs the
    store handed out."""
    seqs: list[int] = []
    batch = batch_size(writer)
    for first in range(0, count, batch):
        drafts = [
            {"role": "user", "content": {"w": writer, "i": i}, **tokens_for(writer, i)}
            for i in range(first, min(first + batch, count))
        ]
        appended = await store.append_messages(session_id, drafts)
        got = [m.seq for m in appended]
        assert got == list(range(got[0], got[0] + len(drafts))), "one call, consecutive seqs"
        seqs.extend(got)
        await asyncio.sleep(0)
    return seqs


async def test_concurrent_appends_get_every_seq_once(store: SessionStore) -> None:
    tasks, per_task = 16, 50
    session = await store.create_session()
    handed_out = await asyncio.gather(
        *(append_as(store, session.id, writer, per_task) for writer in range(tasks))
    )
    await check_appended(store, session.id, dict.fromkeys(range(tasks), per_task))
    seqs = sorted(seq for task_seqs in handed_out for seq in task_seqs)
    assert seqs == list(range(1, tasks * per_task + 1))


async def append_in_child(
    url: str, session_id: str, writer: int, count: int, start: Barrier
) -> list[int]:
    async with _store(url) as store:
        await asyncio.to_thread(start.wait, START_TIMEOUT)
        return await append_as(store, session_id, writer, count)


@pytest.mark.parametrize("engine_name", SHARED_PARAMS)
async def test_concurrent_appends_from_processes(engine_url: str) -> None:
    processes, per_process = 8, 500  # seqs 1..4,000 from 8 processes
    async with _store(engine_url) as store:
        session = await store.create_session()
        start = multiprocessing.get_context("spawn").Barrier(processes)
        handed_out = await run_processes(
            [
                (append_in_child, (engine_url, session.id, writer, per_process, start))
                for writer in range(processes)
            ]
        )
        messages = await check_appended(
            store, session.id, dict.fromkeys(range(processes), per_process)
        )
    for writer, seqs in enumerate(handed_out):
        assert seqs == [m.seq for m in messages if m.content["w"] == writer]


# --- restart ---------------------------------------------------------------------------


async def write_and_exit(url: str) -> dict[str, Any]:
    """Process 1: a folder, a session in it with state and messages, one message popped
    (so the seq counter is ahead of the count). Returns what it left, as JSON."""
    clock = FrozenClock(START)
    async with _store(url, clock) as store:
        folder = await store.create_folder("Projects", owner="alice")
        session = await store.create_session(
            session_id="kept",
            owner="alice",
            folder=folder.id,
            title="Job post",
            step="draft",
            state={"draft": {"title": "Engineer", "skills": ["python", "sql"]}, "n": 1},
            metadata={"source": "test"},
            ttl=86_400,
        )
        clock.advance(5)
        await store.change_session(
            session.id,
            state_patch={"draft": {"skills": None, "level": "senior"}},
            status="completed",
            messages=[
                {"role": "user", "content": "hello", "input_tokens": 3, "cost": 0.25},
                {"role": "assistant", "content": {"text": "hi"}, "output_tokens": 9},
                {"role": "user", "content": "to be popped", "input_tokens": 1},
            ],
        )
        clock.advance(5)
        await store.pop_message(session.id)
        return await snapshot(store)


async def snapshot(store: SessionStore) -> dict[str, Any]:
    session = await store.get_session("kept")
    folder = session.folder
    assert folder is not None
    return {
        "session": session.model_dump(mode="json"),
        "messages": [m.model_dump(mode="json") for m in await read_all(store, "kept")],
        "folder": (await store.get_folder(folder)).model_dump(mode="json"),
        "folders": [f.model_dump(mode="json") for f in await store.list_folders()],
    }


async def read_after_restart(url: str) -> tuple[dict[str, Any], int]:
    """Process 2: read everything back, then append once (its seq must not reuse one)."""
    clock = FrozenClock(START + 60)
    async with _store(url, clock) as store:
        seen = await snapshot(store)
        appended = await store.append_message("kept", "user", "after the restart")
        return seen, appended.seq


@pytest.mark.parametrize("engine_name", SHARED_PARAMS)
async def test_data_survives_a_restart(engine_url: str) -> None:
    [written] = await run_processes([(write_and_exit, (engine_url,))])
    [(read, next_seq)] = await run_processes([(read_after_restart, (engine_url,))])
    assert read == written
    assert written["session"]["last_seq"] == 3
    assert written["session"]["message_count"] == 2
    kept = {"draft": {"title": "Engineer", "level": "senior"}, "n": 1}
    assert written["session"]["state"] == kept
    assert written["folder"]["session_count"] == 1
    assert next_seq == 4
