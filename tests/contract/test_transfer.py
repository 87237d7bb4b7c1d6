"""Contract: export, import, migrate and verify keep every field on every engine, and a
round trip through any engines gives byte-identical exports."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from sessionkeeper import FrozenClock, SessionStore, Settings, open_store
from sessionkeeper.transfer import export_store, import_file, migrate, verify

from .conftest import ENGINE_URLS, SERVER_ENGINES
from .namespaces import drop_namespace


@asynccontextmanager
async def opened(url: str, clock: FrozenClock) -> AsyncIterator[SessionStore]:
    async with open_store(url, settings=Settings(url=url), clock=clock) as store:
        yield store


async def populate(store: SessionStore, clock: FrozenClock) -> None:
    """Two tenants with folders, idle and absolute expiry, seq gaps, a cleared history,
    JSON of every kind, three sessions created in the same instant, and an expired one."""
    clock.advance(0.123456789)  # times with every bit of a float in use
    work = await store.create_folder("Work", owner="alice")
    await store.create_folder("Inbox")
    trip = await store.create_session(
        owner="alice",
        folder=work.id,
        title="Trip to Zürich ✈",
        step="dates",
        state={"b": [1, 2.5, None, True], "a": {"z": "ü", "y": {}}, "n": -7, "f": 0.1},
        metadata={"source": "web", "tags": ["x", "y"]},
        idle_ttl=3600.5,
        ttl=86_400,
    )
    await store.append_messages(
        trip.id,
        [
            {"role": "user", "content": "Find flights", "input_tokens": 12, "metadata": {"k": 1}},
            {"role": "assistant", "content": {"parts": [{"b": 1, "a": 2}]}, "output_tokens": 9},
            {"role": "tool", "content": [1, "two", None], "cost": 0.000123},
        ],
    )
    clock.advance(1.5)
    await store.pop_message(trip.id)  # seqs 1, 2, then 4
    await store.append_message(trip.id, "assistant", None, output_tokens=3, cost=0.0004)
    done = await store.create_session(owner="bob", status="completed", title="", ttl=7200)
    await store.append_message(done.id, "user", 42)
    await store.clear_messages(done.id)  # last_seq 1, no messages
    for session_id in ("same-b", "same-a", "same-c"):  # one instant: ordered by id
        await store.create_session(session_id=session_id, state={"id": session_id})
    await store.create_session(session_id="short-lived", ttl=1)
    acme = store.for_tenant("acme")
    await acme.create_folder("Acme", owner="carol")
    await acme.create_session(owner="carol", metadata={"plan": "pro"})
    clock.advance(2)  # "short-lived" has expired: it is not exported


async def test_export_import_export_is_byte_identical(
    url_factory: Callable[[], str], clock: FrozenClock, tmp_path: Path
) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    async with opened(url_factory(), clock) as source:
        await populate(source, clock)
        exported = await export_store(source, first)
        async with opened(url_factory(), clock) as target:
            report = await import_file(target, first)
            await export_store(target, second)
    assert (exported.tenants, exported.folders, exported.sessions) == (2, 3, 6)
    assert (report.imported, report.folders_imported, report.failed) == (6, 3, 0)
    assert first.read_bytes() == second.read_bytes()
    assert b"short-lived" not in first.read_bytes()


async def test_migrate_to_and_from_memory_keeps_every_field(
    url_factory: Callable[[], str], clock: FrozenClock, tmp_path: Path
) -> None:
    """This engine -> memory -> a fresh store of this engine; the source is unchanged."""
    async with opened(url_factory(), clock) as source:
        await populate(source, clock)
        await export_store(source, tmp_path / "before.jsonl")
        async with opened("memory://", clock) as middle, opened(url_factory(), clock) as target:
            there = await migrate(source, middle, verify_after=True)
            back = await migrate(middle, target, verify_after=True)
            await export_store(target, tmp_path / "target.jsonl")
        await export_store(source, tmp_path / "after.jsonl")
    for report in (there, back):
        assert (report.copied, report.folders_copied, report.failed) == (6, 3, 0)
        assert report.verify is not None
        assert (report.verify.ok, report.verify.matched) == (True, 6)
    before = (tmp_path / "before.jsonl").read_bytes()
    assert (tmp_path / "after.jsonl").read_bytes() == before  # no renewal, no change
    assert (tmp_path / "target.jsonl").read_bytes() == before


async def test_a_second_migration_changes_nothing_and_picks_up_source_changes(
    url_factory: Callable[[], str], clock: FrozenClock
) -> None:
    async with opened(url_factory(), clock) as source, opened(url_factory(), clock) as target:
        await populate(source, clock)
        await migrate(source, target)
        again = await migrate(source, target)
        assert (again.copied, again.replaced, again.unchanged) == (0, 0, 6)
        await source.update_state("same-a", {"changed": True})
        await source.delete_session("same-b")
        clock.advance(1)
        third = await migrate(source, target)
        assert (third.copied, third.replaced, third.unchanged) == (0, 1, 4)
        assert (await target.get_session("same-a")).state == {"id": "same-a", "changed": True}
        checked = await verify(source, target)
        assert (checked.matched, checked.extra, checked.ok) == (5, 1, False)  # same-b stays


async def test_migrate_copies_the_analytics_counters_once(
    url_factory: Callable[[], str], clock: FrozenClock
) -> None:
    async with opened(url_factory(), clock) as source, opened(url_factory(), clock) as target:
        await populate(source, clock)
        await source.delete_session("same-b")  # its creation stays in the history
        before = await source.analytics(days=2)
        acme = await source.for_tenant("acme").analytics(days=2)
        await target.create_session(session_id="target-own")  # counted in the target
        await target.flush_analytics()
        dry = await migrate(source, target, dry_run=True)
        assert dry.daily_rows > 0
        assert (await target.analytics(days=2)).totals.created == 1
        first = await migrate(source, target)
        again = await migrate(source, target)  # set, not added: the same figures
        assert first.daily_rows == again.daily_rows == dry.daily_rows
        after = await target.analytics(days=2)
        assert after.series == before.series  # the target's own day row was replaced
        assert await target.for_tenant("acme").analytics(days=2) == acme
        assert before.totals.created == 6  # the short-lived and the deleted ones too
        assert (before.totals.messages, before.totals.cost) == (5, 0.000523)


# --- every engine in one chain ----------------------------------------------------------


@pytest.fixture
def any_url(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Makes a fresh URL of the engine named, dropped at teardown."""
    made: list[str] = []

    def make(name: str) -> str:
        template = ENGINE_URLS[name]
        cluster = request.getfixturevalue("redis_cluster") if "{cluster}" in template else ""
        namespace = f"sk_t_{secrets.token_hex(5)}"
        folder = tmp_path / namespace
        folder.mkdir()
        url = template.format(tmp=folder, ns=namespace, cluster=cluster)
        made.append(url)
        return url

    yield make
    for url in made:
        drop_namespace(url)


@pytest.mark.server
async def test_a_chain_through_every_engine_gives_byte_identical_exports(
    any_url: Callable[[str], str], clock: FrozenClock, tmp_path: Path
) -> None:
    """memory -> file -> sqlite -> file -> postgresql -> ... -> memory gives equal exports
    at every step, and so does the same chain by migrate."""
    chain = ["memory", *(name for name in ENGINE_URLS if name != "memory"), "memory"]
    assert set(chain) >= SERVER_ENGINES
    async with AsyncExitStack() as stack:
        imported = [await stack.enter_async_context(opened(any_url(n), clock)) for n in chain]
        migrated = [imported[0]]
        migrated += [await stack.enter_async_context(opened(any_url(n), clock)) for n in chain[1:]]
        await populate(imported[0], clock)
        await export_store(imported[0], tmp_path / "0.jsonl.gz")
        expected = (tmp_path / "0.jsonl.gz").read_bytes()
        for step, name in enumerate(chain[1:], 1):
            await import_file(imported[step], tmp_path / f"{step - 1}.jsonl.gz")
            await export_store(imported[step], tmp_path / f"{step}.jsonl.gz")
            assert (tmp_path / f"{step}.jsonl.gz").read_bytes() == expected, name
            report = await migrate(migrated[step - 1], migrated[step], verify_after=True)
            assert report.verify is not None
            assert report.verify.ok, (name, report)
            await export_store(migrated[step], tmp_path / f"m{step}.jsonl.gz")
            assert (tmp_path / f"m{step}.jsonl.gz").read_bytes() == expected, name
