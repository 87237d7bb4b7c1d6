"""Export, import, migrate and verify on memory and SQLite: the file format, every way a
file can be bad, the store's checks on loaded records, and a migration killed mid-way."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from sessionkeeper import (
    AlreadyExists,
    FrozenClock,
    InvalidInput,
    NotFound,
    SessionStore,
    Settings,
    open_store,
    open_store_sync,
)
from sessionkeeper.models import FolderRecord, MessageRecord, SessionRecord
from sessionkeeper.transfer import (
    FORMAT,
    backup,
    export_store,
    import_file,
    migrate,
    session_checksum,
    verify,
)

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
async def store(clock: FrozenClock) -> AsyncIterator[SessionStore]:
    async with open_store("memory://", clock=clock) as opened:
        yield opened


@pytest.fixture
async def target(clock: FrozenClock) -> AsyncIterator[SessionStore]:
    async with open_store("memory://", clock=clock) as opened:
        yield opened


async def sample(store: SessionStore, count: int = 3) -> list[str]:
    """``count`` sessions with two messages each; the first in a folder of alice."""
    folder = await store.create_folder("Work", owner="alice")
    ids = []
    for n in range(count):
        session = await store.create_session(
            session_id=f"s{n}",
            owner="alice",
            folder=folder.id if n == 0 else None,
            state={"n": n},
        )
        await store.append_messages(
            session.id,
            [
                {"role": "user", "content": f"hello {n}", "input_tokens": 5, "cost": 0.25},
                {"role": "assistant", "content": {"text": "hi"}, "output_tokens": 7},
            ],
        )
        ids.append(session.id)
    return ids


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


async def exported_lines(store: SessionStore, tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "export.jsonl"
    await export_store(store, path)
    return lines(path)


# --- the format ------------------------------------------------------------------------


async def test_an_export_is_a_header_folders_sessions_and_an_end_line(
    store: SessionStore, tmp_path: Path
) -> None:
    await sample(store, 2)
    rows = await exported_lines(store, tmp_path)
    assert rows[0] == {"format": FORMAT, "version": 2}
    assert [row["type"] for row in rows[1:]] == ["folder", "session", "session", "daily", "end"]
    assert rows[-1] == {
        "type": "end",
        "tenants": 1,
        "folders": 1,
        "sessions": 2,
        "messages": 4,
        "daily": 1,
    }
    assert rows[-2] == {
        "type": "daily",
        "tenant": "default",
        "day": "2023-11-14",
        "owner": "alice",
        "created": 2,
        "completed": 0,
        "completed_messages": 0,
        "messages": 4,
        "input_tokens": 10,
        "output_tokens": 14,
        "cost": 0.5,
    }
    session = rows[2]
    assert session["id"] == "s0"
    assert session["state"] == {"n": 0}
    assert [m["seq"] for m in session["messages"]] == [1, 2]
    assert session["messages"][1]["content"] == {"text": "hi"}
    assert session["created_at"] == 1_700_000_000.0
    assert (session["input_tokens"], session["output_tokens"], session["cost"]) == (5, 7, 0.25)
    text = (tmp_path / "export.jsonl").read_text().splitlines()
    assert all(list(json.loads(t)) == sorted(json.loads(t)) for t in text)  # sorted keys
    assert all(" " not in t.replace("hello ", "") for t in text)  # no spaces


async def test_compressed_exports_are_deterministic_and_read_back(
    store: SessionStore, target: SessionStore, tmp_path: Path
) -> None:
    await sample(store)
    plain = tmp_path / "a.jsonl"
    await export_store(store, plain)
    for suffix in (".jsonl.gz", ".jsonl.zst"):
        first, second = tmp_path / f"1{suffix}", tmp_path / f"2{suffix}"
        await export_store(store, first)
        await export_store(store, second)
        assert first.read_bytes() == second.read_bytes()
        assert first.stat().st_size < plain.stat().st_size
    assert gzip.decompress((tmp_path / "1.jsonl.gz").read_bytes()) == plain.read_bytes()
    report = await import_file(target, tmp_path / "1.jsonl.zst")
    assert (report.imported, report.messages, report.folders_imported) == (3, 6, 1)


async def test_an_export_path_must_name_a_known_suffix(store: SessionStore, tmp_path: Path) -> None:
    for path in (tmp_path / "x.json", tmp_path / "x.jsonl.bz2", ""):
        with pytest.raises(InvalidInput) as caught:
            await export_store(store, path)
        assert caught.value.field == "path"
    with pytest.raises(InvalidInput, match="cannot write"):
        await export_store(store, tmp_path / "missing" / "x.jsonl")
    assert os.listdir(tmp_path) == []


async def test_an_export_that_fails_leaves_no_file(store: SessionStore, tmp_path: Path) -> None:
    await sample(store)

    def explode(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        await export_store(store, tmp_path / "x.jsonl.gz", progress=explode)
    assert os.listdir(tmp_path) == []


async def test_export_skips_expired_sessions_and_renews_nothing(
    store: SessionStore, clock: FrozenClock, tmp_path: Path
) -> None:
    idle = await store.create_session(session_id="idle", idle_ttl=100)
    await store.create_session(session_id="brief", ttl=10)
    clock.advance(50)
    rows = await exported_lines(store, tmp_path)
    assert [row["id"] for row in rows if row.get("type") == "session"] == ["idle"]
    assert rows[1]["expires_at"] == idle.expires_at.timestamp() if idle.expires_at else False
    clock.advance(50)  # had the export renewed it, it would live on
    with pytest.raises(NotFound):
        await store.get_session("idle")


def test_the_checksum_is_of_the_canonical_line() -> None:
    record = SessionRecord(
        "t",
        "s",
        None,
        None,
        "",
        "active",
        None,
        '{"b":1,"a":2}',
        "{}",
        1,
        1.0,
        1.0,
        None,
        None,
        None,
    )
    reordered = dataclasses.replace(record, metadata='{"a": 2, "b": 1}')
    assert session_checksum(record, []) == session_checksum(reordered, [])
    assert session_checksum(record, []) != session_checksum(
        dataclasses.replace(record, version=2), []
    )


# --- import: conflicts, expiry, dry run ------------------------------------------------


async def test_on_conflict_skip_overwrite_or_fail(
    store: SessionStore, target: SessionStore, tmp_path: Path
) -> None:
    await sample(store)
    path = tmp_path / "a.jsonl"
    await export_store(store, path)
    await import_file(target, path)
    await target.update_state("s1", {"local": True})
    skipped = await import_file(target, path)
    assert (skipped.imported, skipped.skipped, skipped.folders_skipped) == (0, 3, 1)
    assert (await target.get_session("s1")).state == {"n": 1, "local": True}
    with pytest.raises(AlreadyExists, match="line 2: folder"):
        await import_file(target, path, on_conflict="fail")
    overwritten = await import_file(target, path, on_conflict="overwrite")
    assert (overwritten.imported, overwritten.folders_imported) == (3, 1)
    assert (await target.get_session("s1")).state == {"n": 1}
    with pytest.raises(InvalidInput, match="on_conflict"):
        await import_file(target, path, on_conflict="merge")  # type: ignore[arg-type]


async def test_expired_sessions_are_counted_and_not_written(
    store: SessionStore, target: SessionStore, clock: FrozenClock, tmp_path: Path
) -> None:
    await store.create_session(session_id="brief", ttl=10)
    await store.create_session(session_id="long")
    await export_store(store, tmp_path / "a.jsonl")
    clock.advance(10)
    report = await import_file(target, tmp_path / "a.jsonl")
    assert (report.imported, report.expired) == (1, 1)
    assert [s.id for s in (await target.list_sessions()).items] == ["long"]


async def test_a_dry_run_counts_and_writes_nothing(
    store: SessionStore, target: SessionStore, tmp_path: Path
) -> None:
    await sample(store)
    await export_store(store, tmp_path / "a.jsonl")
    await target.create_session(session_id="s0")
    report = await import_file(target, tmp_path / "a.jsonl", dry_run=True)
    assert (report.dry_run, report.imported, report.skipped, report.folders_imported) == (
        True,
        2,
        1,
        1,
    )
    assert await target.count_sessions() == 1
    assert await target.list_folders() == []


# --- import: bad files and bad lines ---------------------------------------------------


async def good_rows(store: SessionStore, tmp_path: Path) -> list[dict[str, Any]]:
    await sample(store)
    return await exported_lines(store, tmp_path)


def session_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row.get("type") == "session"]


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda s: s.update(version=0), "version: must be at least 1"),
        (lambda s: s.pop("state"), "state: is missing from the session line"),
        (lambda s: s.update(colour="red"), "colour: is not a field of a session line"),
        (lambda s: s.update(id="../etc"), "id: must be 1-128 characters"),
        (lambda s: s.update(state=[1]), "state: must be a JSON object, not list"),
        (lambda s: s.update(status="done"), "status: must be one of"),
        (lambda s: s.update(created_at="yesterday"), "created_at: must be Unix seconds"),
        (lambda s: s.update(updated_at=0.0), "updated_at: must not be before created_at"),
        (lambda s: s.update(message_count=5), "message_count: is 5, but the messages add up to 2"),
        (lambda s: s.update(input_tokens=1), "input_tokens: is 1, but the messages add up to 5"),
        (lambda s: s.update(cost=9.5), "cost: is 9.5, but the messages add up to 0.25"),
        (lambda s: s.update(last_seq=1), "last_seq: is 1, below the highest message seq 2"),
        (lambda s: s.update(expires_at=1e10), "deadline: must equal expires_at"),
        (lambda s: s.update(tenant="a/b"), "tenant: must be 1-128 characters"),
        (lambda s: s.update(messages={}), "messages: must be a list"),
        (lambda s: s["messages"][1].update(seq=1), "messages[1].seq: is 1, not above"),
        (lambda s: s["messages"][0].pop("role"), "messages[0].role: is missing from the message"),
        (lambda s: s["messages"][1].update(role=""), "messages[1].role: must not be empty"),
        (lambda s: s["messages"][1].update(metadata=[]), "messages[1].metadata: must be a JSON"),
        (lambda s: s["messages"][0].update(input_tokens=-5), "messages[0].input_tokens: must be"),
    ],
)
async def test_a_bad_session_line_stops_the_import_naming_line_and_reason(
    store: SessionStore,
    target: SessionStore,
    tmp_path: Path,
    damage: Any,
    error: str,
) -> None:
    rows = await good_rows(store, tmp_path)
    damage(session_rows(rows)[1])  # line 4: s1
    path = write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidInput) as caught:
        await import_file(target, path)
    assert str(caught.value).startswith(f"line 4: {error}"), str(caught.value)
    assert [s.id for s in (await target.list_sessions(descending=False)).items] == ["s0"]


async def test_a_session_over_the_limits_is_refused_whole(
    store: SessionStore, tmp_path: Path
) -> None:
    rows = await good_rows(store, tmp_path)
    session_rows(rows)[0]["messages"][1]["content"] = "x" * 300
    path = write_lines(tmp_path / "big.jsonl", rows)
    settings = Settings(url="memory://", max_message_bytes=200)
    async with open_store("memory://", settings=settings) as small:
        with pytest.raises(InvalidInput, match=r"line 3: messages\[1\].content: is 302 bytes"):
            await import_file(small, path)
        assert await small.count_sessions() == 0


async def test_keep_going_reports_every_bad_line_and_imports_the_rest(
    store: SessionStore, target: SessionStore, tmp_path: Path
) -> None:
    rows = await good_rows(store, tmp_path)
    session_rows(rows)[0]["version"] = "one"
    path = write_lines(tmp_path / "bad.jsonl", rows)
    text = path.read_bytes().splitlines(keepends=True)
    text.insert(4, b"{not json\n")
    path.write_bytes(b"".join(text))
    report = await import_file(target, path, keep_going=True)
    assert (report.imported, report.failed) == (2, 2)
    assert [(e.line, e.error.split(":")[1].strip()) for e in report.errors] == [
        (3, "version"),
        (5, "line"),
    ]
    assert "is not JSON" in report.errors[1].error


async def test_daily_lines_are_set_and_a_version_1_file_still_imports(
    store: SessionStore, target: SessionStore, tmp_path: Path
) -> None:
    rows = await good_rows(store, tmp_path)
    figures = await store.analytics(days=1)
    path = write_lines(tmp_path / "v2.jsonl", rows)
    dry = await import_file(target, path, dry_run=True)
    assert (dry.daily, (await target.analytics(days=1)).totals.created) == (1, 0)
    for _ in range(2):  # set, not added: a second import changes nothing
        report = await import_file(target, path, on_conflict="overwrite")
        assert report.daily == 1
        assert await target.analytics(days=1) == figures
    old = [{"format": FORMAT, "version": 1}]
    old += [row for row in rows[1:-1] if row["type"] != "daily"]
    old.append({key: value for key, value in rows[-1].items() if key != "daily"})
    async with open_store("memory://", clock=FrozenClock()) as fresh:
        report = await import_file(fresh, write_lines(tmp_path / "v1.jsonl", old))
        assert (report.imported, report.daily) == (3, 0)
    bad = [*old[:-1], {**old[-1], "daily": 0}]
    with pytest.raises(InvalidInput, match="daily: is not a field of a end line"):
        async with open_store("memory://", clock=FrozenClock()) as fresh:
            await import_file(fresh, write_lines(tmp_path / "v1-bad.jsonl", bad))


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda rows: rows.__setitem__(0, {"format": "other"}), "line 1: is not a"),
        (
            lambda rows: rows.__setitem__(0, {"format": FORMAT, "version": 3}),
            "line 1: is format version 3",
        ),
        (lambda rows: rows.pop(), "line 7: end: the file ends without its end line"),
        (lambda rows: rows[-1].update(sessions=9), "line 7: sessions: the end line counts 9"),
        (lambda rows: rows.append({"type": "session"}), "line 8: comes after the end line"),
        (
            lambda rows: rows[2].update(type="note"),
            "line 3: type: must be folder, session, daily or end",
        ),
        (lambda rows: rows[5].update(day="14/11/2023"), "line 6: day: must be a date"),
        (lambda rows: rows[5].update(messages=-1), "line 6: messages: must be a whole number"),
        (lambda rows: rows[5].update(cost="1"), "line 6: cost: must be a number"),
        (lambda rows: rows[5].update(extra=1), "line 6: extra: is not a field of a daily"),
        (lambda rows: rows[-1].update(daily=2), "line 7: daily: the end line counts 2"),
        (lambda rows: rows[1].update(name=""), "line 2: name: must not be empty"),
    ],
)
async def test_a_bad_file_is_refused_naming_the_line(
    store: SessionStore, target: SessionStore, tmp_path: Path, edit: Any, error: str
) -> None:
    rows = await good_rows(store, tmp_path)
    edit(rows)
    path = write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidInput) as caught:
        await import_file(target, path)
    assert str(caught.value).startswith(error), str(caught.value)


async def test_a_missing_empty_or_misnamed_file_is_refused(
    target: SessionStore, tmp_path: Path
) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    for path, error in [
        (tmp_path / "missing.jsonl", "path: cannot read"),
        (tmp_path / "empty.jsonl", "path: "),
        (tmp_path / "x.csv", "path: must end with"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            await import_file(target, path)
        assert str(caught.value).startswith(error), str(caught.value)


async def test_a_truncated_compressed_file_imports_what_is_whole(
    store: SessionStore, target: SessionStore, tmp_path: Path
) -> None:
    await sample(store, 50)
    whole = tmp_path / "a.jsonl"
    await export_store(store, whole)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    report = await import_file(target, cut, keep_going=True)
    assert report.failed == 2  # the cut line, and the missing end line
    assert report.imported == await target.count_sessions() > 10
    assert report.errors[-1].error.endswith("the file ends without its end line: it was cut off")


# --- the store's checks on loaded records ---------------------------------------------


async def test_load_session_checks_the_tenant_and_the_record(
    store: SessionStore, target: SessionStore
) -> None:
    (session_id,) = await sample(store, 1)
    record, messages = await store.export_session(session_id)
    other = target.for_tenant("other")
    with pytest.raises(InvalidInput, match=r"store.for_tenant\('default'\)"):
        await other.load_session(record, messages)
    with pytest.raises(InvalidInput) as caught:
        await target.load_session(dataclasses.replace(record, state="{bad"), messages)
    assert (caught.value.field, caught.value.reason) == ("state", "is not valid JSON text")
    with pytest.raises(InvalidInput, match=r"messages\[0\].session_id"):
        await target.load_session(
            record, [dataclasses.replace(messages[0], session_id="x"), messages[1]]
        )
    with pytest.raises(InvalidInput, match="record: must be a SessionRecord"):
        await target.load_session({"id": "x"}, [])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="replace: must be true or false"):
        await target.load_session(record, messages, replace="yes")  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="no folder"):  # its folder is not in the target
        await target.load_session(record, messages)
    assert await target.count_sessions() == 0


async def test_load_session_keeps_every_field_and_reencodes_json(
    store: SessionStore, target: SessionStore
) -> None:
    record, messages = await store.export_session((await sample(store, 2))[1])
    spaced = dataclasses.replace(record, state='{ "n" : 1 }', version=7)
    assert await target.load_session(spaced, messages) == "loaded"
    again, again_messages = await target.export_session(record.id)
    assert again == dataclasses.replace(record, state='{"n":1}', version=7)
    assert again_messages == messages
    assert await target.load_session(record, messages) == "kept"
    assert await target.load_session(record, messages, replace=True) == "loaded"
    assert (await target.get_session(record.id)).version == record.version


async def test_load_folder_checks_and_keeps_by_id(store: SessionStore) -> None:
    folder = FolderRecord("default", "f1", "alice", "Work", 1.5)
    assert await store.load_folder(folder) is True
    assert await store.load_folder(dataclasses.replace(folder, name="Other")) is False
    assert (await store.get_folder("f1")).name == "Work"
    with pytest.raises(AlreadyExists):
        await store.load_folder(dataclasses.replace(folder, id="f2"))
    for bad, field in [
        (dataclasses.replace(folder, id=".x"), "id"),
        (dataclasses.replace(folder, name=" "), "name"),
        (dataclasses.replace(folder, created_at=float("nan")), "created_at"),
        (dataclasses.replace(folder, tenant="acme"), "tenant"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            await store.load_folder(bad)
        assert caught.value.field == field


async def test_cost_may_differ_from_the_messages_by_rounding_only(store: SessionStore) -> None:
    message = MessageRecord("s", 1, "user", '"x"', 0, 0, 0.1, "{}", 1.0)
    record = SessionRecord(
        "default", "s", None, None, "", "active", None, "{}", "{}", 1, 1.0, 1.0, None, None,
        None, message_count=1, last_seq=1, cost=0.1 + 1e-15,
    )  # fmt: skip
    assert await store.load_session(record, [message]) == "loaded"


# --- migrate and verify ----------------------------------------------------------------


async def test_a_dry_run_migration_counts_and_writes_nothing(
    store: SessionStore, target: SessionStore
) -> None:
    await sample(store)
    await target.create_session(session_id="s0")  # differs: would be replaced
    report = await migrate(store, target, dry_run=True)
    assert (report.copied, report.replaced, report.folders_copied) == (2, 1, 1)
    assert [s.id for s in (await target.list_sessions()).items] == ["s0"]
    assert await target.list_folders() == []


async def test_migrate_reports_a_session_it_cannot_copy_and_goes_on(
    store: SessionStore,
) -> None:
    await sample(store)
    settings = Settings(url="memory://", max_state_bytes=7)
    await store.update_state("s2", {"n": 2, "long": "x" * 10})
    async with open_store("memory://", settings=settings) as small:
        report = await migrate(store, small)
        assert (report.copied, report.failed) == (2, 1)
        assert report.errors[0].startswith("default/s2: state: is ")
        checked = await verify(store, small)
        assert (checked.matched, checked.missing, checked.ok) == (2, 1, False)
        assert checked.samples == ["missing: default/s2"]


async def test_verify_finds_sessions_and_folders_that_differ(
    store: SessionStore, target: SessionStore
) -> None:
    await sample(store)
    await migrate(store, target)
    assert (await verify(store, target)).ok
    await target.append_message("s1", "user", "only here")
    await target.create_session(session_id="extra")
    folder = (await target.list_folders())[0]
    await target.rename_folder(folder.id, "Renamed")
    checked = await verify(store, target)
    assert (checked.matched, checked.different, checked.extra) == (2, 1, 1)
    assert (checked.folders_different, checked.ok) == (1, False)
    assert checked.samples == ["different: default/s1"]


async def test_migrate_and_verify_refuse_a_bad_concurrency(
    store: SessionStore, target: SessionStore
) -> None:
    for bad in (0, 1000, True):
        with pytest.raises(InvalidInput, match="concurrency"):
            await migrate(store, target, concurrency=bad)
        with pytest.raises(InvalidInput, match="concurrency"):
            await verify(store, target, concurrency=bad)


# --- a migration killed with SIGKILL, then run again -----------------------------------

_SESSIONS = 1500


def _count(path: Path) -> int:
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
            return int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
    except sqlite3.OperationalError:  # not made yet
        return 0


@pytest.mark.slow
def test_a_migration_killed_mid_way_finishes_on_the_next_run(tmp_path: Path) -> None:
    source, destination = tmp_path / "src.db", tmp_path / "dst.db"
    with open_store_sync(f"sqlite:///{source}") as store:
        for start in range(0, _SESSIONS, 250):
            for n in range(start, start + 250):
                store.create_session(session_id=f"s{n:05}", state={"n": n})
            store.append_messages(f"s{start:05}", [{"role": "user", "content": "x"}] * 3)
    command = [
        sys.executable, "-c", "from sessionkeeper.cli import main; main()",
        "migrate", f"sqlite:///{source}", f"sqlite:///{destination}",
        "--concurrency", "2", "--json",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while _count(destination) < _SESSIONS // 5 and time.monotonic() < deadline:
        assert process.poll() is None, "the migration ended before it was killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    copied = _count(destination)
    assert 0 < copied < _SESSIONS, copied
    rerun = subprocess.run(
        [*command, "--verify"], capture_output=True, text=True, timeout=120, check=False
    )
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["copied"] + report["unchanged"] == _SESSIONS
    assert report["unchanged"] == copied  # each load is atomic: what landed is whole
    assert (report["failed"], report["replaced"]) == (0, 0)
    assert report["verify"]["ok"] is True
    assert report["verify"]["destination_sessions"] == _SESSIONS


# --- backups ---------------------------------------------------------------------------

_WRITER = """
import sys, time
from sessionkeeper import open_store_sync

with open_store_sync(sys.argv[1]) as store:
    n = 0
    while True:
        store.append_message(f"w{n % 20}", "user", "x" * 200, input_tokens=1)
        n += 1
        print(n, time.time(), flush=True)
"""


@pytest.mark.slow
async def test_a_sqlite_backup_taken_while_a_process_writes_is_whole_and_opens(
    tmp_path: Path,
) -> None:
    """The writer's acknowledgements carry times: some fall inside the backup's window,
    so the backup did not hold the writer up; the copy opens, consistent."""
    db, copy = tmp_path / "live.db", tmp_path / "copy.db"
    url = f"sqlite:///{db}"
    async with open_store(url) as store:
        for n in range(20):
            await store.create_session(session_id=f"w{n}", state={"blob": "y" * 500_000})
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, url, stdout=asyncio.subprocess.PIPE
        )
        assert writer.stdout is not None
        try:
            await writer.stdout.readline()  # it is writing
            windows = []
            for _ in range(3):
                started = time.time()
                report = await backup(store, copy)
                windows.append((started, time.time()))
            await writer.stdout.readline()
        finally:
            writer.kill()
            acks = [line.split() for line in (await writer.stdout.read()).decode().splitlines()]
            await writer.wait()
    assert report.method == "sqlite-backup"
    assert report.bytes == os.stat(copy).st_size > 10_000_000
    during = [n for n, at in acks if any(a <= float(at) <= b for a, b in windows)]
    assert during, (windows, acks[:3], acks[-3:])
    async with open_store(f"sqlite:///{copy}") as restored:
        assert await restored.count_sessions() == 20
        total = 0
        for n in range(20):
            session = await restored.get_session(f"w{n}")
            read = await restored.read_messages(session.id, limit=1000)
            assert [m.seq for m in read] == list(range(1, session.message_count + 1))
            assert session.input_tokens == session.message_count  # aggregates in step
            total += session.message_count
        assert 0 < total <= int(acks[-1][0]) + 1
    with closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


async def test_a_backup_of_any_engine_is_an_export_and_import_restores_it(
    store: SessionStore, target: SessionStore, tmp_path: Path
) -> None:
    await sample(store)
    report = await backup(store, tmp_path / "backup.jsonl.zst")
    assert report.method == "export"
    assert report.export is not None
    assert report.export.sessions == 3
    restored = await import_file(target, tmp_path / "backup.jsonl.zst")
    assert restored.imported == 3
    await export_store(store, tmp_path / "a.jsonl")
    await export_store(target, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


async def test_a_backup_refuses_a_bad_destination(store: SessionStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="dest: a memory store is backed up by export"):
        await backup(store, tmp_path / "copy.db")
    with pytest.raises(InvalidInput, match="dest: the memory engine has no file backup"):
        await store.backup_file(tmp_path / "copy.db")
    db = tmp_path / "live.db"
    async with open_store(f"sqlite:///{db}") as sqlite_store:
        cases: list[tuple[str | Path, str]] = [
            (db, "is the database itself"),
            (tmp_path, "is a folder"),
            (tmp_path / "no" / "copy.db", "the folder"),
            ("", "must be a file path"),
        ]
        for dest, reason in cases:
            with pytest.raises(InvalidInput) as caught:
                await backup(sqlite_store, dest)
            assert (caught.value.field, reason in caught.value.reason) == ("dest", True)
    assert sorted(os.listdir(tmp_path)) == ["live.db"]


async def test_the_readme_example_export_imports_and_exports_byte_for_byte(
    tmp_path: Path,
) -> None:
    readme = README.read_text()
    start = readme.index('{"format":"sessionkeeper-export"')
    end = readme.index('"type":"end"}', start) + len('"type":"end"}')
    example = tmp_path / "example.jsonl"
    example.write_text(readme[start:end] + "\n")
    async with open_store("memory://", clock=FrozenClock(1_717_236_100)) as store:
        report = await import_file(store, example)
        assert (report.imported, report.messages, report.folders_imported) == (1, 2, 1)
        await export_store(store, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == example.read_bytes()


async def test_a_folder_that_cannot_be_copied_is_reported_and_the_rest_goes_on(
    store: SessionStore, target: SessionStore
) -> None:
    await sample(store)  # s0 is in alice's folder "Work"
    await target.create_folder("Work", owner="alice")  # the name is taken there
    report = await migrate(store, target)
    assert (report.folders_failed, report.copied, report.failed, report.ok) == (1, 2, 1, False)
    assert report.errors[0].startswith("default/folder ")
    assert report.errors[1].startswith("default/s0: no folder")
    assert report.to_dict()["ok"] is False


async def test_export_session_names_a_bad_id_and_a_missing_session(store: SessionStore) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.export_session("../x")
    assert caught.value.field == "session_id"
    with pytest.raises(NotFound, match="no session 'missing'"):
        await store.export_session("missing")


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
async def test_a_damaged_or_cut_compressed_file_is_bad_input_after_what_was_whole(
    store: SessionStore, target: SessionStore, tmp_path: Path, suffix: str
) -> None:
    await sample(store, 400)
    whole = tmp_path / f"whole{suffix}"
    await export_store(store, whole)
    data = whole.read_bytes()
    (tmp_path / f"garbage{suffix}").write_bytes(b"garbage" * 100)
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InvalidInput) as caught:
        await import_file(target, tmp_path / f"garbage{suffix}")
    assert str(caught.value).startswith("line 1: ")
    with pytest.raises(InvalidInput):  # the decompressor's error, or the cut last line
        await import_file(target, tmp_path / f"cut{suffix}")
    landed = (await target.list_sessions(limit=400)).items
    assert 0 < len(landed) < 400
    for session in landed:
        assert await target.export_session(session.id) == await store.export_session(session.id)
