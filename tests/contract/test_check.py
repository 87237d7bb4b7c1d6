"""Contract: check finds each kind of damage, made on purpose in the storage, and repair
fixes it without losing what can be kept; doctor reports on every engine.

The damage is written straight into each engine's storage (that is the point), so the
helpers that make it know the engine; the check API they are tested through is one.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sessionkeeper import SessionStore, checks
from sessionkeeper.engines.files import FilesEngine
from sessionkeeper.engines.memory import MemoryEngine
from sessionkeeper.engines.postgres import PostgresEngine
from sessionkeeper.engines.redis import RedisEngine
from sessionkeeper.engines.sqlite import SQLiteEngine


class Damage:
    """Makes damage in one store's storage, as a crash, a bug or a person could."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.engine = store.engine
        self.tenant = store.tenant

    async def aggregates(self, session_id: str) -> None:
        """Counts and sums that disagree with the messages."""
        e = self.engine
        wrong: dict[str, int | float] = {
            "message_count": 99,
            "input_tokens": 0,
            "output_tokens": 7,
            "cost": 5.5,
        }
        if isinstance(e, MemoryEngine):
            space = e._tenants[self.tenant]
            record = space.sessions[session_id]
            for name, value in wrong.items():
                setattr(record, name, value)
        elif isinstance(e, FilesEngine):
            path = e.root / "tenants" / self.tenant / "sessions" / f"{session_id}.json"
            doc = json.loads(path.read_text())
            doc.update(wrong)
            path.write_text(json.dumps(doc))
            e._remember((self.tenant, session_id), None)  # the engine's cache of heads
        else:
            sets = ", ".join(f"{name} = {value}" for name, value in wrong.items())
            await self._sql(f"UPDATE {{s}}sessions SET {sets} WHERE id = '{session_id}'")
            if isinstance(e, RedisEngine):
                meta = e._meta(self.tenant, session_id)
                for name, value in wrong.items():
                    await e._redis.hset(meta, name, value)

    async def drop_folder(self, folder_id: str) -> None:
        """The folder's own storage gone, its sessions still naming it."""
        e = self.engine
        if isinstance(e, MemoryEngine):
            del e._tenants[self.tenant].folders[folder_id]
        elif isinstance(e, FilesEngine):
            (e.root / "tenants" / self.tenant / "folders" / f"{folder_id}.json").unlink()
        elif isinstance(e, RedisEngine):
            t = e._tenant(self.tenant)
            await e._redis.delete(t.folder(folder_id))
            await e._redis.srem(t.folders, folder_id)
        else:
            await self._sql(f"DELETE FROM {{s}}folders WHERE id = '{folder_id}'")

    async def orphan_messages(self, session_id: str) -> None:
        """The session gone, its messages left behind."""
        e = self.engine
        if isinstance(e, MemoryEngine):
            del e._tenants[self.tenant].sessions[session_id]
        elif isinstance(e, FilesEngine):
            (e.root / "tenants" / self.tenant / "sessions" / f"{session_id}.json").unlink()
            e._remember((self.tenant, session_id), None)
        elif isinstance(e, RedisEngine):
            meta, state, _ = e._session_keys(self.tenant, session_id)
            await e._redis.delete(meta)
            await e._redis.delete(state)
        else:
            await self._sql(f"DELETE FROM {{s}}sessions WHERE id = '{session_id}'")

    async def dangling_index(self, session_id: str, lost_entry: bool = False) -> None:
        """Index entries left of a session whose records are gone (Redis's indexes, the
        activity table of PostgreSQL); ``lost_entry``: on Redis, the hash that says where
        they are lost its field too."""
        e = self.engine
        if isinstance(e, PostgresEngine):  # its activity table indexes the sessions
            await self._sql(
                f"WITH gone AS (DELETE FROM {{s}}sessions WHERE id = '{session_id}' "
                "RETURNING pk) DELETE FROM {s}messages WHERE session_pk IN (SELECT pk FROM gone)"
            )
            return
        if not isinstance(e, RedisEngine):
            pytest.skip(f"{e.name} keeps no index apart from its records")
        for key in e._session_keys(self.tenant, session_id):
            await e._redis.delete(key)
        if lost_entry:
            await e._redis.hdel(e._tenant(self.tenant).entries, session_id)

    async def totals(self) -> None:
        """The stats totals of the SQL engines, or Redis's counters, off: one owner's
        inflated, the sessions without an owner lost."""
        e = self.engine
        if isinstance(e, RedisEngine):
            counters, sep = e._tenant(self.tenant).counters, "\x1f"
            await e._redis.hincrby(counters, f"n{sep}active{sep}=ann", 5)
            await e._redis.hincrby(counters, f"m{sep}active{sep}=ann", 1)
            await e._redis.hdel(counters, *(f"{m}{sep}active{sep}-" for m in "nmioc"))
            return
        if not isinstance(e, SQLiteEngine | PostgresEngine):
            pytest.skip(f"{e.name} keeps no totals apart from its records")
        await self._sql(
            "UPDATE {s}totals SET sessions = sessions + 5, messages = messages + 1 "
            "WHERE owner_key = 'ann'"
        )
        await self._sql("DELETE FROM {s}totals WHERE owner_key = ''")

    def quarantine(self, session_id: str) -> None:
        """A record that is not JSON (only the files engine quarantines)."""
        e = self.engine
        if not isinstance(e, FilesEngine):
            pytest.skip(f"{e.name} has no files to quarantine")
        path = e.root / "tenants" / self.tenant / "sessions" / f"{session_id}.json"
        path.write_text("{not json")
        e._remember((self.tenant, session_id), None)

    def kept(self, path: str) -> bool:
        """Whether a file the check listed is still there, under the store's root."""
        assert isinstance(self.engine, FilesEngine)
        return (self.engine.root / path).exists()

    async def _sql(self, statement: str) -> None:
        e = self.engine
        if isinstance(e, SQLiteEngine):
            conn = sqlite3.connect(e.path, isolation_level=None)
            try:
                conn.execute(statement.replace("{s}", ""))
            finally:
                conn.close()
        elif isinstance(e, PostgresEngine):
            sql = statement.replace("{s}", f'"{e.schema}".')

            async def run(conn: Any) -> None:
                await conn.execute(sql)

            await e._run(run)


@pytest.fixture
def damage(store: SessionStore) -> Damage:
    return Damage(store)


def counts(result: checks.CheckResult) -> dict[str, tuple[int, int]]:
    """(found, repaired) of each kind that found anything."""
    return {c.kind: (c.found, c.repaired) for c in result.counts if c.found}


async def conversation(store: SessionStore, **options: Any) -> str:
    session = await store.create_session(**options)
    await store.append_messages(
        session.id,
        [
            {"role": "user", "content": "a", "input_tokens": 10},
            {"role": "assistant", "content": "b", "output_tokens": 4, "cost": 0.25},
            {"role": "user", "content": "c", "input_tokens": 1, "cost": 0.5},
        ],
    )
    return session.id


async def test_a_sound_store_checks_clean(store: SessionStore) -> None:
    folder = await store.create_folder("work", owner="ann")
    await conversation(store, owner="ann", folder=folder.id)
    await conversation(store)
    result = await checks.check(store)
    assert counts(result) == {}
    assert result.ok
    assert result.left == 0
    assert counts(await checks.check(store, all_tenants=True)) == {}


async def test_aggregates_are_recomputed_from_the_messages(
    store: SessionStore, damage: Damage
) -> None:
    sound = await conversation(store)
    session_id = await conversation(store)
    before = await store.get_session(session_id)
    await damage.aggregates(session_id)

    found = await checks.check(store)
    assert counts(found) == {"aggregates": (1, 0)}
    assert not found.ok
    assert found.to_dict()["counts"]["aggregates"]["samples"] == [f"{store.tenant}/{session_id}"]

    repaired = await checks.check(store, repair=True)
    assert counts(repaired) == {"aggregates": (1, 1)}
    assert repaired.ok
    after = await store.get_session(session_id)
    assert (after.message_count, after.last_seq) == (3, 3)
    assert (after.input_tokens, after.output_tokens, after.cost) == (11, 4, 0.75)
    assert after.version > before.version
    assert [m.content for m in await store.read_messages(session_id)] == ["a", "b", "c"]
    assert (await store.get_session(sound)).version == before.version
    assert counts(await checks.check(store)) == {}
    appended = await store.append_message(session_id, "user", "d")
    assert appended.seq == 4


async def test_seq_gaps_are_reported_never_renumbered(store: SessionStore) -> None:
    session_id = await conversation(store)
    await store.pop_message(session_id)
    await store.append_message(session_id, "user", "again")  # seqs 1, 2, 4
    result = await checks.check(store, repair=True)
    assert counts(result) == {"seq_gaps": (1, 0)}
    assert result.ok  # a gap is no damage
    assert [m.seq for m in await store.read_messages(session_id)] == [1, 2, 4]


async def test_a_session_in_a_missing_folder_is_kept_out_of_it(
    store: SessionStore, damage: Damage
) -> None:
    folder = await store.create_folder("work", owner="ann")
    session_id = await conversation(store, owner="ann", folder=folder.id)
    await damage.drop_folder(folder.id)

    assert counts(await checks.check(store)) == {"missing_folder": (1, 0)}
    assert counts(await checks.check(store, repair=True)) == {"missing_folder": (1, 1)}
    after = await store.get_session(session_id)
    assert after.folder is None
    assert after.message_count == 3
    assert [s.id for s in (await store.list_sessions(folder=None)).items] == [session_id]
    assert counts(await checks.check(store)) == {}


async def test_orphan_messages_are_deleted_by_repair(store: SessionStore, damage: Damage) -> None:
    kept = await conversation(store)
    session_id = await conversation(store)
    await damage.orphan_messages(session_id)

    found = counts(await checks.check(store, all_tenants=True))
    assert found.pop("orphan_messages") == (3, 0)
    assert set(found) <= {"dangling_index"}  # Redis: the indexes name it too
    repaired = counts(await checks.check(store, repair=True, all_tenants=True))
    assert repaired.pop("orphan_messages") == (3, 3)
    assert all(done == seen for seen, done in repaired.values())
    assert counts(await checks.check(store, all_tenants=True)) == {}
    assert (await store.get_session(kept)).message_count == 3


async def test_index_entries_of_no_session_are_removed(store: SessionStore, damage: Damage) -> None:
    kept = await conversation(store, owner="ann")
    session_id = await conversation(store, owner="ann")
    other = await conversation(store)
    await damage.dangling_index(session_id)
    await damage.dangling_index(other, lost_entry=True)

    assert counts(await checks.check(store)) == {"dangling_index": (2, 0)}
    assert counts(await checks.check(store, repair=True)) == {"dangling_index": (2, 2)}
    assert counts(await checks.check(store)) == {}
    assert [s.id for s in (await store.list_sessions(owner="ann")).items] == [kept]


async def test_stats_totals_that_disagree_with_the_sessions_are_rebuilt(
    store: SessionStore, damage: Damage
) -> None:
    await conversation(store, owner="ann")
    await conversation(store, owner="ann")
    await conversation(store)
    sound = await store.stats()
    await damage.totals()
    assert await store.stats() != sound

    found = await checks.check(store)
    assert counts(found) == {"totals": (2, 0)}
    assert found.to_dict()["counts"]["totals"]["samples"] == [
        f"{store.tenant}/(no owner)/active",
        f"{store.tenant}/ann/active",
    ]
    assert counts(await checks.check(store, repair=True)) == {"totals": (2, 2)}
    assert await store.stats() == sound
    assert counts(await checks.check(store, all_tenants=True)) == {}
    session_id = await conversation(store, owner="bob")  # the triggers still keep them
    await store.update_session(session_id, status="completed")
    stats = await store.stats()
    assert (stats.total, stats.completed, stats.messages) == (4, 1, 12)
    assert counts(await checks.check(store)) == {}


async def test_quarantined_files_are_listed_never_deleted(
    store: SessionStore, damage: Damage
) -> None:
    session_id = await conversation(store)
    damage.quarantine(session_id)

    result = await checks.check(store, repair=True)
    assert counts(result) == {"quarantined_file": (2, 0)}  # the record and its log
    assert not result.ok
    paths = result.counts[-1].samples
    assert {Path(p).suffix for p in paths} == {".json", ".jsonl"}
    for path in paths:
        assert path.startswith(f"quarantine/{store.tenant}/sessions/")
        assert session_id in path
        assert damage.kept(path)
    assert counts(await checks.check(store, repair=True)) == {"quarantined_file": (2, 0)}


async def test_doctor_reports_on_every_engine(store: SessionStore) -> None:
    await conversation(store)
    result = await checks.doctor(store)
    data = result.to_dict()
    assert data["engine"] == store.engine.name
    assert data["server_version"]
    assert data["verdict"] in ("ok", "warnings")
    assert result.ok == (data["verdict"] == "ok") == (not data["warnings"])
    assert data["missing_indexes"] == []
    assert data["counts"]["sessions"] >= 1
    json.dumps(data)
