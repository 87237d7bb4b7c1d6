"""`sessionkeeper archive`, `restore` and `purge`: counts, --dry-run, --json, moving to
another store and back, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from sessionkeeper import FrozenClock, NotFound, open_store_sync
from sessionkeeper.cli import app

runner = CliRunner()
DAY = 86_400.0


@pytest.fixture(autouse=True)
def _no_sessionkeeper_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("SESSIONKEEPER_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'live.db'}"


@pytest.fixture
def archive_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'archive.db'}"


def run(url: str, *args: str) -> Result:
    return runner.invoke(app, ["--url", url, *args])


def run_json(url: str, *args: str, code: int = 0) -> Any:
    result = run(url, *args, "--json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def make_sessions(url: str, days_ago: float, *ids: str, **fields: Any) -> None:
    """Sessions last active ``days_ago`` days ago (the CLI runs on the real clock)."""
    clock = FrozenClock(time.time() - days_ago * DAY)
    with open_store_sync(url, clock=clock) as store:
        for session_id in ids:
            store.create_session(session_id=session_id, **fields)
            store.append_message(session_id, "user", "hello")


def statuses(url: str) -> dict[str, str]:
    with open_store_sync(url) as store:
        return {s.id: s.status for s in store.list_sessions().items}


def test_archive_sets_the_status_of_old_sessions(url: str) -> None:
    make_sessions(url, 100, "old1", "old2")
    make_sessions(url, 10, "recent")
    dry = run_json(url, "archive", "--older-than", "90d", "--dry-run")
    assert (dry["dry_run"], dry["archived"], dry["ok"]) == (True, 2, True)
    assert sorted(dry["sample"]) == ["default/old1", "default/old2"]
    assert set(statuses(url).values()) == {"active"}

    done = run_json(url, "archive", "--older-than", "90d")
    assert (done["archived"], done["skipped"], done["failed"]) == (2, 0, 0)
    assert statuses(url) == {"old1": "archived", "old2": "archived", "recent": "active"}
    assert run_json(url, "archive", "--older-than", "12w")["archived"] == 0

    table = run(url, "archive", "--older-than", "2w", "--no-progress")
    assert table.exit_code == 0, table.output
    assert "archived" in table.stdout
    assert "default/recent" not in table.stdout  # 10 days is not older than 2 weeks

    restored = run_json(url, "restore", "old1")
    assert (restored["reactivated"], restored["status"]) == (True, "active")
    assert statuses(url)["old1"] == "active"


def test_archive_to_another_store_and_restore_from_it(url: str, archive_url: str) -> None:
    make_sessions(url, 100, "old", owner="alice")
    make_sessions(url, 1, "recent")
    moved = run_json(url, "archive", "--older-than", "90d", "--to", archive_url)
    assert (moved["moved"], moved["archived"], moved["messages"]) == (True, 1, 1)
    assert statuses(url) == {"recent": "active"}
    assert statuses(archive_url) == {"old": "active"}

    back = run_json(url, "restore", "old", "--from", archive_url)
    assert (back["moved"], back["messages"]) == (True, 1)
    assert statuses(archive_url) == {}
    with open_store_sync(url) as store:
        assert [m.content for m in store.last_messages("old")] == ["hello"]
        assert store.get_session("old").owner == "alice"

    missing = run(url, "restore", "nobody", "--from", archive_url)
    assert missing.exit_code == 1
    assert "error: no session 'nobody' in the archive nor in the store" in missing.stderr


def test_a_session_that_cannot_be_moved_is_reported_and_exits_1(url: str, archive_url: str) -> None:
    with open_store_sync(url, clock=FrozenClock(time.time() - 100 * DAY)) as store:
        folder = store.create_folder("work", owner="alice")
        store.create_session(session_id="filed", owner="alice", folder=folder.id)
        store.create_session(session_id="loose", owner="alice")
    with open_store_sync(archive_url) as archive:
        archive.create_folder("work", owner="alice")  # the name is taken there, another id
    result = run(url, "archive", "--older-than", "90d", "--to", archive_url, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["archived"], report["failed"], report["ok"]) == (1, 1, False)
    assert report["errors"][0].startswith("default/filed: ")
    assert statuses(url) == {"filed": "active"}  # kept where it was


def test_purge_old_and_expired_sessions(url: str) -> None:
    make_sessions(url, 400, "ancient", status="completed")
    make_sessions(url, 400, "short", ttl=60)
    make_sessions(url, 30, "recent")
    dry = run_json(url, "purge", "--older-than", "365d", "--expired", "--dry-run")
    assert (dry["old"], dry["expired"], dry["purged"]) == (1, None, 1)
    assert set(statuses(url)) == {"ancient", "recent"}

    done = run_json(url, "purge", "--older-than", "365d", "--expired")
    assert (done["old"], done["expired"], done["purged"]) == (1, 1, 2)
    assert set(statuses(url)) == {"recent"}
    assert run_json(url, "purge") == {"purged": 0}
    assert run_json(url, "purge", "--expired") == {"purged": 0}
    text = run(url, "purge", "--older-than", "1w", "--all-tenants")
    assert text.exit_code == 0, text.output
    assert "purged" in text.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("archive", "--older-than", "3x"),
        ("archive", "--older-than", "0d"),
        ("archive", "--older-than", "90"),
        ("archive",),
        ("purge", "--older-than", "1y"),
        ("purge", "--older-than", "-1d"),
    ],
)
def test_bad_durations_exit_2_naming_the_option(url: str, args: tuple[str, ...]) -> None:
    make_sessions(url, 100, "kept")
    result = run(url, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --older-than: ")
    assert len(result.stderr.splitlines()) == 1
    assert statuses(url) == {"kept": "active"}


def test_the_archive_must_be_another_store(url: str) -> None:
    make_sessions(url, 100, "kept")
    moved = run(url, "archive", "--older-than", "1d", "--to", url)
    assert moved.exit_code == 2
    assert moved.stderr.startswith("error: --to: is the store itself")
    back = run(url, "restore", "kept", "--from", url)
    assert back.exit_code == 2
    assert back.stderr.startswith("error: --from: is the store itself")
    assert statuses(url) == {"kept": "active"}


def test_bad_batch_sizes_and_unknown_sessions(url: str) -> None:
    bad = run(url, "archive", "--older-than", "1d", "--batch-size", "0")
    assert bad.exit_code == 2
    assert bad.stderr.startswith("error: batch_size: ")
    unknown = run(url, "restore", "nobody")
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: no session 'nobody'")
    with open_store_sync(url) as store, pytest.raises(NotFound):
        store.get_session("nobody")
