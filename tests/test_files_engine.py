"""The files engine: what it alone has.

Names that never become paths, locks that other descriptors cannot drop, repair of what a
crash leaves, quarantine of damaged files, caches that see other processes' writes,
checkpoints, group commit, a layout people can read, and its URL.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from sessionkeeper import (
    AlreadyExists,
    BackendUnavailable,
    FrozenClock,
    InvalidInput,
    NotFound,
    SessionStore,
    Settings,
    open_store,
)
from sessionkeeper.engines import files
from sessionkeeper.engines.files import FileLock, FilesEngine
from sessionkeeper.engines.urls import files_path
from sessionkeeper.models import FolderRecord, SessionRecord

START = 1_700_000_000.0


def url_of(root: Path) -> str:
    return f"file://{root}"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
async def store(root: Path) -> AsyncIterator[SessionStore]:
    async with open_store(url_of(root), clock=FrozenClock(START)) as opened:
        yield opened


def engine_of(store: SessionStore) -> FilesEngine:
    return cast(FilesEngine, store.engine)


def tree(top: Path) -> dict[str, bytes | None]:
    """Every path under ``top`` with its bytes (None for a folder)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(top.rglob("*")):
        name = str(path.relative_to(top))
        found[name] = None if path.is_dir() else path.read_bytes()
    return found


def log_of(root: Path, session_id: str, tenant: str = "default") -> Path:
    return root / "tenants" / tenant / "sessions" / f"{session_id}.jsonl"


def record_of(root: Path, session_id: str, tenant: str = "default") -> Path:
    return root / "tenants" / tenant / "sessions" / f"{session_id}.json"


# --- names never become paths ----------------------------------------------------------

BAD_NAMES = [
    "../x",
    "..",
    "../../etc/passwd",
    "%2e%2e%2f",
    "%2e%2e",
    "a/b",
    "/abs",
    "a\\b",
    "..\\x",
    "a\x00b",
    "x" * 129,
    "x" * 4096,
    "\uff0e\uff0e",  # full-width dots
    "\uff0e\uff0e\uff0fx",  # and a full-width slash
    ".hidden",
    "",
]


async def test_bad_names_change_nothing_anywhere(store: SessionStore, tmp_path: Path) -> None:
    session = await store.create_session(session_id="kept", state={"a": 1})
    await store.append_message(session.id, "user", "hello")
    folder = await store.create_folder("Work", owner="alice")
    before = tree(tmp_path)  # the store's parent too: nothing may appear beside the root
    attempts: list[Any] = []
    for bad in BAD_NAMES:
        attempts += [
            store.create_session(session_id=bad),
            store.get_session(bad),
            store.append_message(bad, "user", "x"),
            store.read_messages(bad),
            store.last_messages(bad),
            store.update_state(bad, {"a": 2}),
            store.pop_message(bad),
            store.clear_messages(bad),
            store.delete_session(bad),
            store.get_folder(bad),
            store.rename_folder(bad, "x"),
            store.delete_folder(bad),
            store.create_session(folder=bad, owner="alice"),
            store.delete_folder(folder.id, reassign_to=bad),
        ]
    for attempt in attempts:
        with pytest.raises((InvalidInput, NotFound)):
            await attempt
    for bad in BAD_NAMES:
        if bad:  # no tenant at all is the default one
            with pytest.raises(InvalidInput):
                await in_tenant(store, bad)
    assert tree(tmp_path) == before


async def in_tenant(store: SessionStore, tenant: str) -> None:
    view = store.for_tenant(tenant)
    await view.create_session(session_id="kept")


async def test_the_engine_checks_names_itself(store: SessionStore, tmp_path: Path) -> None:
    """Called directly, without the store's checks, it still refuses every bad name."""
    engine = engine_of(store)
    await store.create_session(session_id="kept")
    before = tree(tmp_path)
    for bad in BAD_NAMES:
        record = SessionRecord(bad, "ok", None, None, "", "active", None, "{}", "{}", 1, 0, 0,
                               None, None, None)  # fmt: skip
        calls: list[Any] = [
            engine.get_session(bad, "kept", START),
            engine.get_session("default", bad, START),
            engine.insert_session(record, START),
            engine.insert_session(SessionRecord("default", bad, *_rest(record)), START),
            engine.append_messages("default", bad, [], START, None),
            engine.append_messages(bad, "kept", [], START, None),
            engine.read_messages(bad, "kept", START, 0, 10),
            engine.last_messages("default", bad, START, 10),
            engine.delete_session("default", bad, START, None),
            engine.pop_message(bad, "kept", START, None),
            engine.clear_messages("default", bad, START, None),
            engine.get_folder("default", bad, START),
            engine.insert_folder(FolderRecord("default", bad, None, "n", START)),
            engine.insert_folder(FolderRecord(bad, "f", None, "n", START)),
            engine.load_session(SessionRecord("default", bad, *_rest(record)), [], START, True),
            engine.load_folder(FolderRecord("default", bad, None, "n", START), True),
            engine.export_session(bad, "kept", START),
            engine.delete_folder("default", bad, START, None, False),
            engine.list_folders(bad, None, False, START),
            engine.purge_expired(bad, START, 10),
            engine.get_guard(bad, "rate:x", START),
        ]
        for call in calls:
            with pytest.raises(InvalidInput):
                await call
    assert tree(tmp_path) == before


def _rest(record: SessionRecord) -> tuple[Any, ...]:
    fields = [
        record.owner, record.folder, record.title, record.status, record.step,
        record.metadata, record.state, record.version, record.created_at,
        record.updated_at, record.expires_at, record.idle_ttl, record.deadline,
    ]  # fmt: skip
    return tuple(fields)


async def test_guard_keys_of_any_text_stay_in_the_guards_folder(
    store: SessionStore, root: Path, tmp_path: Path
) -> None:
    engine = engine_of(store)
    await store.create_session()
    before = tree(tmp_path)
    keys = ["rate:../../../etc/passwd", "login:a/b\\c", "budget:\uff0e\uff0e", "rate:" + "x" * 300]

    def bump(value: str | None) -> tuple[str, float, int]:
        n = json.loads(value or "0") + 1
        return json.dumps(n), START + 60, n

    for key in keys:
        assert await engine.update_guard("default", key, bump, START) == 1
        assert await engine.get_guard("default", key, START) == "1"
    added = {Path(k) for k in tree(tmp_path)} - {Path(k) for k in before}
    guards = root.relative_to(tmp_path) / "tenants" / "default" / "guards"
    locks = root.relative_to(tmp_path) / "locks"
    assert {p.parent for p in added} == {guards, locks}, added
    assert len([p for p in added if p.parent == guards]) == len(keys)
    assert [g.key for g in await engine.list_guards("default", "", START)] == sorted(keys)


# --- locks -----------------------------------------------------------------------------

PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    if sys.argv[2] == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
sys.exit(0)
"""


def another_process_can_lock(path: Path, kind: str = "flock") -> bool:
    result = subprocess.run([sys.executable, "-c", PROBE, str(path), kind], check=False)
    assert result.returncode in (0, 1)
    return result.returncode == 0


def touch_from_other_descriptors(*paths: Path) -> None:
    """Open and close each file through fresh descriptors, as unrelated code might."""
    for path in paths:
        os.close(os.open(path, os.O_RDONLY))
        with open(path, "rb") as again:
            again.read(1)


async def test_other_descriptors_never_drop_a_session_lock(store: SessionStore, root: Path) -> None:
    session = await store.create_session()
    await store.append_message(session.id, "user", "hello")
    engine = engine_of(store)
    where = engine._session("default", session.id)
    assert where is not None
    lock_file = root / "locks" / f"sessions-{where.stripe:02x}.lock"
    with engine._locks.hold(where.stripe, True):
        touch_from_other_descriptors(
            lock_file, record_of(root, session.id), log_of(root, session.id)
        )
        assert not another_process_can_lock(lock_file)
        # another thread of this process is kept out too (through its own descriptor)
        fd = os.open(lock_file, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert engine._locks.busy(where.stripe)
    assert another_process_can_lock(lock_file)


def test_other_descriptors_never_drop_a_file_lock(tmp_path: Path) -> None:
    path = tmp_path / "tenant-x.lock"
    with FileLock(str(path), exclusive=True):
        touch_from_other_descriptors(path)
        assert not another_process_can_lock(path)
        with pytest.raises(BlockingIOError):  # a second descriptor, even in this thread
            FileLock(str(path), exclusive=False, blocking=False)
    assert another_process_can_lock(path)


def test_the_pitfall_these_tests_guard_against(tmp_path: Path) -> None:
    """POSIX record locks (fcntl/lockf) belong to the process and go with the first close
    of any descriptor of the file: the test above would catch an engine that used them."""
    path = tmp_path / "posix.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        assert not another_process_can_lock(path, "lockf")
        touch_from_other_descriptors(path)
        assert another_process_can_lock(path, "lockf")  # gone, though fd is still open
    finally:
        os.close(fd)


async def test_threads_of_one_process_exclude_each_other(root: Path) -> None:
    """Appends from several threads, each with its own event loop and store view of one
    engine, still get every seq once."""
    async with open_store(url_of(root)) as store:
        session = await store.create_session()
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        async def run() -> None:
            async with open_store(url_of(root)) as mine:
                for i in range(40):
                    await mine.append_message(session.id, "user", {"t": index, "i": i})

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    async with open_store(url_of(root)) as store:
        messages = await store.read_messages(session.id, limit=1000)
        assert [m.seq for m in messages] == list(range(1, 161))
        assert (await store.get_session(session.id)).message_count == 160


# --- what a crash leaves ---------------------------------------------------------------


def torn_tails(log: bytes) -> list[bytes]:
    """What a writer killed mid-write can leave after a log whose last call was seqs 1-3
    made at version 2: a cut line, or one whole line of a call of two."""
    first = json.loads(log.splitlines()[0])
    half_call = {**first, "seq": 4, "version": 3, "batch_end": 5}
    return [b'{"seq":4,"role":"user","con', json.dumps(half_call).encode() + b"\n"]


@pytest.mark.parametrize("tail", [0, 1])
async def test_a_torn_tail_is_never_returned_and_the_next_write_cuts_it(
    root: Path, tail: int
) -> None:
    async with open_store(url_of(root)) as store:
        session = await store.create_session()
        await store.append_messages(session.id, [{"role": "user", "content": i} for i in range(3)])
    log = log_of(root, session.id)
    log.write_bytes(log.read_bytes() + torn_tails(log.read_bytes())[tail])
    async with open_store(url_of(root)) as store:  # a fresh process, as after a crash
        assert [m.content for m in await store.last_messages(session.id, 10)] == [0, 1, 2]
        assert [m.seq for m in await store.read_messages(session.id)] == [1, 2, 3]
        again = await store.get_session(session.id)
        assert (again.message_count, again.last_seq, again.version) == (3, 3, 2)
        assert (await store.append_message(session.id, "user", "after")).seq == 4
    assert [json.loads(line)["seq"] for line in log.read_bytes().splitlines()] == [1, 2, 3, 4]


async def test_a_change_whose_record_was_not_written_drops_its_messages(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(url_of(root)) as store:
        session = await store.create_session(state={"step": 1})
        await store.append_message(session.id, "user", "first")
        real = FilesEngine._write_atomic

        def crash(self: FilesEngine, path: str, data: bytes, sync_dir: bool) -> None:
            if path.endswith(".json"):
                raise OSError("the process died here")
            real(self, path, data, sync_dir)

        monkeypatch.setattr(FilesEngine, "_write_atomic", crash)
        with pytest.raises(BackendUnavailable):
            await store.change_session(
                session.id,
                state_patch={"step": 2},
                messages=[{"role": "assistant", "content": "lost with the change"}],
            )
        monkeypatch.undo()
    assert b"lost with the change" in log_of(root, session.id).read_bytes()  # written, ...
    async with open_store(url_of(root)) as store:  # ... but never counted
        again = await store.get_session(session.id)
        assert (again.state, again.message_count, again.version) == ({"step": 1}, 1, 2)
        assert [m.content for m in await store.last_messages(session.id)] == ["first"]
        assert (await store.append_message(session.id, "user", "second")).seq == 2
    assert b"lost with the change" not in log_of(root, session.id).read_bytes()


async def test_a_pop_whose_log_was_not_cut_stays_popped(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(url_of(root)) as store:
        session = await store.create_session()
        for text in ("a", "b", "c"):
            await store.append_message(session.id, "user", text, input_tokens=1)

        def crash(fd: int, length: int) -> None:
            raise OSError("the process died here")

        monkeypatch.setattr(os, "ftruncate", crash)
        with pytest.raises(BackendUnavailable):
            await store.pop_message(session.id)  # the record (the commit) was written
        monkeypatch.undo()
    async with open_store(url_of(root)) as store:
        again = await store.get_session(session.id)
        assert (again.message_count, again.last_seq, again.input_tokens) == (2, 3, 2)
        assert [m.content for m in await store.last_messages(session.id)] == ["a", "b"]
        assert (await store.append_message(session.id, "user", "d")).seq == 4
        assert [m.content for m in await store.read_messages(session.id)] == ["a", "b", "d"]


async def test_stale_temp_files_go_when_their_process_is_gone(root: Path) -> None:
    async with open_store(url_of(root)):
        pass
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()  # reaped: its pid names no process now
    dead = root / "tmp" / f"{gone.pid}.7.tmp"
    mine = root / "tmp" / f"{os.getpid()}.999999.tmp"  # a writer of this very process
    dead.write_bytes(b"half a record")
    mine.write_bytes(b"being written")
    async with open_store(url_of(root)):
        assert not dead.exists()
        assert mine.exists()


# --- quarantine ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    ["not json", "wrong shape", "log shorter than record", "damaged committed line"],
)
async def test_damaged_sessions_go_to_quarantine_and_the_store_goes_on(
    root: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(url_of(root)) as store:
        bad = await store.create_session(session_id="bad", state={"n": 1})
        for i in range(200):  # past a checkpoint, so the record names most of the log
            await store.append_message(bad.id, "user", f"message {i}")
        good = await store.create_session(session_id="good")
    record, log = record_of(root, "bad"), log_of(root, "bad")
    if damage == "not json":
        record.write_bytes(record.read_bytes()[:-20])
    elif damage == "wrong shape":
        record.write_text(json.dumps({"format": 1, "tenant": "default", "id": "bad"}))
    elif damage == "log shorter than record":
        log.write_bytes(log.read_bytes()[:100])
    else:
        data = bytearray(log.read_bytes())
        data[1000:1010] = b"##########"
        log.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sessionkeeper.files"):
        async with open_store(url_of(root)) as store:
            reading = (
                store.read_messages("bad", limit=1000)
                if damage == "damaged committed line"
                else store.get_session("bad")
            )
            with pytest.raises(NotFound):
                await reading
            assert [s.id for s in (await store.list_sessions()).items] == [good.id]
            quarantined = await engine_of(store).quarantined()
            assert sorted(p.name.split("-", 1)[1] for p in quarantined) == ["bad.json", "bad.jsonl"]
            assert all(p.parts[:3] == ("quarantine", "default", "sessions") for p in quarantined)
            assert not record.exists()
            assert not log.exists()
            again = await store.create_session(session_id="bad")  # the id is free again
            assert again.message_count == 0
    assert any("quarantine" in r.getMessage() for r in caplog.records)


async def test_a_damaged_folder_goes_to_quarantine(root: Path) -> None:
    async with open_store(url_of(root)) as store:
        kept = await store.create_folder("Kept", owner="alice")
        broken = await store.create_folder("Broken", owner="alice")
    (root / "tenants" / "default" / "folders" / f"{broken.id}.json").write_text("{")
    async with open_store(url_of(root)) as store:
        assert [f.id for f in await store.list_folders()] == [kept.id]
        with pytest.raises(NotFound):
            await store.get_folder(broken.id)
        quarantined = await engine_of(store).quarantined()
        assert [p.parts[:3] for p in quarantined] == [("quarantine", "default", "folders")]


async def test_names_that_differ_only_in_case_never_take_each_others_files(
    root: Path,
) -> None:
    """On a file system that ignores case, "Alice.json" opens alice's file: it is read as
    someone else's, never as damaged, and never written over."""
    async with open_store(url_of(root)) as store:
        await store.create_session(session_id="alice", state={"mine": True})
        await store.append_message("alice", "user", "hello")
    for suffix in (".json", ".jsonl"):  # what a case-blind lookup of "Alice" would find
        found = record_of(root, "alice").with_suffix(suffix)
        found.with_name("Alice" + suffix).write_bytes(found.read_bytes())
    async with open_store(url_of(root)) as store:
        with pytest.raises(NotFound):
            await store.get_session("Alice")
        with pytest.raises(AlreadyExists, match="differs only in case"):
            await store.create_session(session_id="Alice")
        assert [s.id for s in (await store.list_sessions()).items] == ["alice"]
        assert (await store.get_session("alice")).state == {"mine": True}
        assert await engine_of(store).quarantined() == []


# --- caches and other processes --------------------------------------------------------


async def test_each_engine_sees_what_another_wrote(root: Path) -> None:
    """Two engines on one folder stand for two processes: each keeps its own cache."""
    async with open_store(url_of(root)) as a, open_store(url_of(root)) as b:
        session = await a.create_session(state={"n": 0})
        await a.append_message(session.id, "user", "one")
        assert [m.content for m in await b.last_messages(session.id)] == ["one"]
        await a.append_message(session.id, "user", "two")  # b's cache: the log grew
        assert [m.content for m in await b.last_messages(session.id)] == ["one", "two"]
        await b.update_state(session.id, {"n": 1})  # a's cache: the record changed
        appended = await a.append_message(session.id, "user", "three")
        assert appended.seq == 3
        assert (await a.get_session(session.id)).state == {"n": 1}
        # b pops and appends a message of the same size: the log is as long as before
        before = await a.get_session(session.id)
        await b.pop_message(session.id)
        await b.append_message(session.id, "user", "tres")
        after = await a.get_session(session.id)
        assert after.version == before.version + 2
        assert [m.content for m in await a.last_messages(session.id)] == ["one", "two", "tres"]
        assert [m.seq for m in await a.last_messages(session.id)] == [1, 2, 4]


async def test_appends_write_a_checkpoint_now_and_then(root: Path) -> None:
    async with open_store(url_of(root)) as store:
        session = await store.create_session()
        for i in range(files.CHECKPOINT_LINES + 5):
            await store.append_message(session.id, "user", i, input_tokens=1)
    record = json.loads(record_of(root, session.id).read_text())
    assert record["message_count"] == files.CHECKPOINT_LINES
    assert 0 < record["log_size"] < log_of(root, session.id).stat().st_size
    async with open_store(url_of(root)) as store:  # rolled forward over the rest
        again = await store.get_session(session.id)
        assert again.message_count == again.input_tokens == files.CHECKPOINT_LINES + 5


async def test_concurrent_appends_to_one_session_share_fsyncs(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await store.create_session()
    await store.append_message(session.id, "user", "first")
    synced: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    appended = await asyncio.gather(
        *(store.append_message(session.id, "user", i) for i in range(50))
    )
    assert sorted(m.seq for m in appended) == list(range(2, 52))
    assert len(synced) < 50 / 2  # most calls rode along with another's write and fsync


# --- the files -------------------------------------------------------------------------


async def test_a_person_can_read_the_files(store: SessionStore, root: Path) -> None:
    session = await store.create_session(
        session_id="trip", owner="alice", title="Trip", state={"city": "Lyon", "days": 3}
    )
    await store.append_message(session.id, "user", "Find me a train", input_tokens=4)
    await store.append_message(session.id, "assistant", {"trains": ["9:12"]}, cost=0.5)
    text = record_of(root, "trip").read_text()
    assert text.startswith('{\n  "format": 1,\n  "tenant": "default",\n  "id": "trip",')
    record = json.loads(text)
    assert record["state"] == {"city": "Lyon", "days": 3}
    assert (record["owner"], record["title"]) == ("alice", "Trip")
    lines = [json.loads(line) for line in log_of(root, "trip").read_text().splitlines()]
    assert [(m["seq"], m["role"], m["content"]) for m in lines] == [
        (1, "user", "Find me a train"),
        (2, "assistant", {"trains": ["9:12"]}),
    ]
    assert json.loads((root / "sessionkeeper.json").read_text()) == {"format": 1}


async def test_a_folder_of_other_files_or_a_newer_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a store")
    with pytest.raises(BackendUnavailable, match="other files"):
        async with open_store(url_of(tmp_path / "mine")):
            pass
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "sessionkeeper.json").write_text('{"format": 99}')
    with pytest.raises(BackendUnavailable, match="upgrade sessionkeeper"):
        async with open_store(url_of(tmp_path / "newer")):
            pass
    with pytest.raises(BackendUnavailable, match="does not exist"):
        async with open_store(url_of(tmp_path / "no" / "such" / "dir")):
            pass


def test_urls() -> None:
    assert files_path("file:///abs/dir") == Path("/abs/dir")
    assert files_path("file:relative/dir") == Path("relative/dir")
    assert files_path("file:./here") == Path("here")
    for url, message in [
        ("file://host/dir", "no host"),
        ("file:///dir?x=1", "no options"),
        ("file://", "needs a folder"),
        ("file:///", "needs a folder"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            open_store(url, settings=Settings(url=url))


async def test_a_relative_url_is_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_store("file:sessions") as store:
        await store.create_session(session_id="here")
    assert record_of(tmp_path / "sessions", "here").exists()


async def test_an_empty_append_fails_alone_in_its_batch(store: SessionStore) -> None:
    """The contract asks for at least one message; a caller that breaks it must not take
    the appends batched with it down (the first append below goes alone; the two that
    queue behind it share the next batch)."""
    session = await store.create_session()
    engine = engine_of(store)
    results = await asyncio.gather(
        store.append_message(session.id, "user", "first"),
        engine.append_messages("default", session.id, [], START, None),
        store.append_message(session.id, "user", "second"),
        return_exceptions=True,
    )
    assert isinstance(results[1], InvalidInput)
    contents = [m.content for m in await store.read_messages(session.id)]
    assert contents == ["first", "second"]
