"""Legacy import: both hand-rolled layouts from the fixtures, messy values, the report, a
second run that adds nothing, --map, and ids that never become paths unchecked."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sessionkeeper import InvalidInput, SessionStore, open_store
from sessionkeeper.cli import app
from sessionkeeper.legacy import _time, import_legacy, parse_map

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
async def store() -> AsyncIterator[SessionStore]:
    async with open_store("memory://") as opened:
        yield opened


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-01T09:15:00Z", at("2024-03-01T09:15:00")),
        ("2024-03-01T11:15:00+02:00", at("2024-03-01T09:15:00")),
        ("2024-03-01 09:15:00", at("2024-03-01T09:15:00")),  # no zone: UTC
        ("2024-03-01", at("2024-03-01T00:00:00")),
        (1709284500, 1709284500.0),
        (1709284500.5, 1709284500.5),
        (1709284500000, 1709284500.0),  # milliseconds
        ("1709284500", 1709284500.0),
        ("last week", None),
        (None, None),
        (True, None),
        (-5, None),
        ([2024], None),
    ],
)
def test_times_are_read_in_every_common_shape(value: object, expected: float | None) -> None:
    assert _time(value) == expected


async def test_a_folder_of_session_files_becomes_sessions(store: SessionStore) -> None:
    report = await import_legacy(store, FIXTURES / "sessions")
    assert (report.layout, report.imported, report.messages, report.existing) == (
        "sessions-folder",
        4,
        6,
        0,
    )
    assert {(s.source, s.reason.split(":")[0]) for s in report.skipped} == {
        ("bad-message.json", "conversation_history[0].role"),
        ("broken.json", "cannot be read as JSON"),
        ("list.json", "is not a JSON object"),
    }
    acme = await store.get_session("acme-hiring-1")
    assert (acme.owner, acme.title, acme.step, acme.status) == (
        "acme",
        "Acme Corp",
        "review",
        "active",
    )
    assert acme.state == {
        "title": "Backend Engineer",
        "remote": True,
        "salary": {"min": 90000, "max": 120000},
    }
    assert acme.created_at.timestamp() == at("2024-03-01T09:15:00")
    assert acme.updated_at.timestamp() == at("2024-03-01T09:42:10.25")
    assert (acme.message_count, acme.input_tokens, acme.output_tokens, acme.cost) == (
        3,
        11,
        6,
        0.00012,
    )
    assert acme.expires_at is None
    messages = await store.read_messages("acme-hiring-1")
    assert [(m.seq, m.role) for m in messages] == [(1, "user"), (2, "assistant"), (3, "user")]
    assert messages[1].created_at.timestamp() == at("2024-03-01T09:15:07")
    globex = await store.get_session("2002")  # numbers as ids and owners
    assert (globex.owner, globex.title, globex.status, globex.step) == (
        "77",
        "Globex Inc.",
        "completed",
        "done",
    )
    assert globex.state == {"job_data": ["not", "an", "object"]}
    assert globex.metadata["legacy"] == {"notes": "imported from the old CRM"}
    assert (globex.output_tokens, globex.cost) == (3, 0.0004)  # from strings
    assert globex.updated_at.timestamp() == 1707580800.0
    read = await store.read_messages("2002")
    assert [(m.role, m.content) for m in read] == [
        ("user", "Hi"),
        ("assistant", {"text": "Hello", "card": [1, 2]}),
    ]
    assert read[0].created_at == globex.created_at  # no time of its own
    assert read[1].created_at.timestamp() == 1707573601.0  # milliseconds


async def test_an_id_that_is_not_valid_is_replaced_the_same_way_every_time(
    store: SessionStore,
) -> None:
    report = await import_legacy(store, FIXTURES / "sessions")
    (renamed,) = report.renamed
    assert renamed.startswith("'../../etc/passwd' -> legacy-")
    new_id = renamed.split(" -> ")[1].split(" ")[0]
    session = await store.get_session(new_id)
    assert session.metadata["legacy_id"] == "../../etc/passwd"
    no_times = await store.get_session("no-times")  # named after its file
    assert report.notes == [
        f"no-times.json: no readable creation time, used {no_times.created_at.timestamp():.0f}"
    ]
    again = await import_legacy(store, FIXTURES / "sessions")
    assert (again.imported, again.existing) == (0, 4)
    assert await store.count_sessions() == 4


async def test_users_json_and_user_data_become_one_session_per_conversation(
    store: SessionStore,
) -> None:
    report = await import_legacy(store, FIXTURES / "users" / "users.json")
    assert (report.layout, report.imported, report.messages) == ("users-json", 3, 5)
    assert [s.source for s in report.skipped] == [
        "users.json[3]",
        "users.json user '../escape'",
        "user_data/u3.json",
        "user_data/u2.json[1]",
    ]
    assert report.notes == ["user 'u4' has no user_data/u4.json"]
    trip = await store.get_session("u1-trip")
    assert (trip.owner, trip.title, trip.metadata) == (
        "u1",
        "Trip to Lisbon",
        {"provider": "openai", "model": "gpt-4o"},
    )
    assert (trip.input_tokens, trip.output_tokens, trip.cost) == (8, 120, 0.0001 + 0.0024)
    assert trip.updated_at.timestamp() == at("2024-04-02T08:00:09")
    untitled = await store.get_session("u2-1")  # no id: the user and its place
    assert (untitled.owner, untitled.input_tokens, untitled.output_tokens) == ("u2", 2, 2)
    assert {s.owner for s in (await store.list_sessions()).items} == {"u1", "u2"}


async def test_an_unchecked_id_never_becomes_a_path(store: SessionStore, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "users", root)
    (tmp_path / "escape.json").write_text(json.dumps([{"id": "stolen", "messages": []}]))
    await import_legacy(store, root)
    assert "stolen" not in {s.id for s in (await store.list_sessions()).items}


async def test_map_renames_fields_before_mapping(store: SessionStore) -> None:
    pairs = ["sid=session_id", "org=company_id", "history=conversation_history"]
    mapping = parse_map([*pairs, "sender=role", "text=content", "at=timestamp"])
    report = await import_legacy(store, FIXTURES / "custom", field_map=mapping)
    assert (report.imported, report.skipped) == (1, [])
    session = await store.get_session("custom-1")
    assert (session.owner, session.message_count) == ("hooli", 1)
    (message,) = await store.read_messages("custom-1")
    assert (message.role, message.content) == ("user", "Hi there")
    assert message.created_at.timestamp() == at("2024-05-01T08:00:00")


async def test_a_dry_run_reads_and_checks_but_writes_nothing(store: SessionStore) -> None:
    report = await import_legacy(store, FIXTURES / "sessions", dry_run=True)
    assert (report.dry_run, report.imported) == (True, 4)
    assert await store.count_sessions() == 0


@pytest.mark.parametrize(
    ("call", "field", "reason"),
    [
        ({"path": FIXTURES / "missing"}, "path", "is not a folder"),
        ({"path": FIXTURES / "sessions", "layout": "csv"}, "layout", "must be one of"),
        ({"path": FIXTURES / "sessions", "layout": "users-json"}, "path", "has no users.json"),
        ({"path": FIXTURES, "layout": "auto"}, "path", "has neither users.json"),
        ({"path": FIXTURES / "users", "on_conflict": "merge"}, "on_conflict", "must be"),
    ],
)
async def test_bad_arguments_are_refused_by_name(
    store: SessionStore, call: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await import_legacy(store, **call)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_a_bad_map_is_refused() -> None:
    for pairs, reason in [(["sid"], "is not old=new"), (["a=nonsense"], "is not a field")]:
        with pytest.raises(InvalidInput, match=reason):
            parse_map(pairs)


def test_the_cli_imports_into_the_tenant_and_exits_2_when_something_was_skipped(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    runner = CliRunner()
    result = runner.invoke(
        app, ["--tenant", "acme", "import-legacy", url, str(FIXTURES / "users"), "--json"]
    )
    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)
    assert (report["imported"], len(report["skipped"])) == (3, 4)
    maps = ["--map", "sid=session_id", "--map", "history=conversation_history"]
    mapped = runner.invoke(
        app, ["import-legacy", url, str(FIXTURES / "custom"), *maps, "--map", "sender=role"]
    )
    assert mapped.exit_code == 0, mapped.output
    assert "import-legacy" in mapped.stdout
    listed = json.loads(runner.invoke(app, ["--url", url, "list", "--json"]).stdout)
    assert [s["id"] for s in listed["items"]] == ["custom-1"]  # the default tenant
    bad = runner.invoke(app, ["import-legacy", url, str(FIXTURES), "--map", "x"])
    assert (bad.exit_code, bad.stderr) == (2, "error: map: 'x' is not old=new\n")
