"""`sessionkeeper logins list|unlock` and `sessionkeeper usage`: output, --json and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from sessionkeeper import Settings, open_store_sync
from sessionkeeper.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_sessionkeeper_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("SESSIONKEEPER_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'guards.db'}"


def run(url: str, *args: str) -> Result:
    return runner.invoke(app, ["--url", url, *args])


def run_json(url: str, *args: str) -> Any:
    result = run(url, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_logins_list_and_unlock(url: str) -> None:
    with open_store_sync(url) as store:
        for _ in range(5):
            store.login_failed(ip="198.51.100.7", account="alice")
        store.login_failed(account="bob")
    listed = run_json(url, "logins", "list")
    assert {row["who"] for row in listed} == {"ip:198.51.100.7", "account:alice", "account:bob"}
    locked = run_json(url, "logins", "list", "--locked")
    assert {row["who"] for row in locked} == {"ip:198.51.100.7", "account:alice"}
    assert all(row["retry_after"] > 0 for row in locked)
    table = run(url, "logins", "list")
    assert table.exit_code == 0
    assert "account:alice" in table.stdout
    assert run_json(url, "logins", "unlock", "--account", "alice") == {"cleared": 1}
    assert {row["who"] for row in run_json(url, "logins", "list", "--locked")} == {
        "ip:198.51.100.7"
    }
    unlocked = run(url, "logins", "unlock", "--ip", "198.51.100.7")
    assert unlocked.exit_code == 0
    assert "cleared 1" in unlocked.stdout


def test_logins_unlock_needs_someone(url: str) -> None:
    result = run(url, "logins", "unlock")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ip:")
    bad = run(url, "logins", "unlock", "--account", "a\tb")
    assert bad.exit_code == 2
    assert "account" in bad.stderr


def test_usage_shows_what_an_owner_used(url: str) -> None:
    with open_store_sync(url, settings=Settings(url=url, owner_token_budget=500)) as store:
        session = store.create_session(owner="carol")
        store.append_message(session.id, "user", "hi", input_tokens=120, cost=0.25)
    shown = run(url, "usage", "--owner", "carol")
    assert shown.exit_code == 0, shown.output
    assert "owner:carol" in shown.stdout
    usage = run_json(url, "usage", "--owner", "carol")
    assert usage["input_tokens"] == 120
    assert usage["cost"] == 0.25
    assert usage["period"] == "monthly"
    both = run(url, "usage", "--owner", "carol", "--session", session.id)
    assert both.exit_code == 2
    assert "owner" in both.stderr
