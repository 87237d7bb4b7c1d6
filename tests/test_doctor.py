"""`sessionkeeper check` and `doctor` from the CLI, and doctor's warnings: each made on
purpose (a dropped index, quarantined files, an evicting Redis on a server of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from sessionkeeper import checks, open_store, open_store_sync
from sessionkeeper.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_sessionkeeper_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("SESSIONKEEPER_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "doctor.db"


def run(url: str, *args: str) -> Result:
    return runner.invoke(app, ["--url", url, *args])


def run_json(url: str, *args: str, code: int = 0) -> Any:
    result = run(url, *args, "--json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def conversation(url: str) -> str:
    with open_store_sync(url) as store:
        session = store.create_session()
        store.append_message(session.id, "user", "hello", input_tokens=5)
        store.append_message(session.id, "assistant", "hi", output_tokens=3, cost=0.5)
        return session.id


def test_check_finds_repairs_and_exits_by_what_is_left(db: Path) -> None:
    url = f"sqlite:///{db}"
    session_id = conversation(url)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("UPDATE sessions SET message_count = 7, cost = 0")

    found = run_json(url, "check", code=1)
    assert found["ok"] is False
    assert found["counts"]["aggregates"] == {
        "found": 1,
        "repaired": 0,
        "repairable": True,
        "samples": [f"default/{session_id}"],
    }
    repaired = run_json(url, "check", "--repair", "--all-tenants")
    assert repaired["counts"]["aggregates"]["repaired"] == 1
    assert repaired["ok"] is True
    assert run_json(url, "check")["left"] == 0
    with open_store_sync(url) as store:
        session = store.get_session(session_id)
    assert (session.message_count, session.cost) == (2, 0.5)

    table = run(url, "check")
    assert table.exit_code == 0
    assert "aggregates" in table.stdout


def test_doctor_on_a_sound_sqlite_store(db: Path) -> None:
    url = f"sqlite:///{db}"
    conversation(url)
    report = run_json(url, "doctor")
    assert report["verdict"] == "ok"
    assert report["engine"] == "sqlite"
    assert report["server_version"].startswith("SQLite 3.")
    assert report["settings"] == {"journal_mode": "wal", "synchronous": "normal"}
    assert report["counts"]["sessions"] == 1
    assert report["counts"]["messages"] == 2
    assert report["sizes"]["file"] > 0
    assert report["schema_version"] >= 1
    assert report["missing_indexes"] == []
    table = run(url, "doctor")
    assert table.exit_code == 0
    assert "journal mode" in table.stdout


def test_doctor_names_a_missing_index(db: Path) -> None:
    url = f"sqlite:///{db}"
    conversation(url)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("DROP INDEX sessions_by_status")
    report = run_json(url, "doctor", code=1)
    assert report["verdict"] == "warnings"
    assert report["missing_indexes"] == ["sessions_by_status"]
    assert any("sessions_by_status" in warning for warning in report["warnings"])


def test_doctor_warns_of_quarantined_files(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/files"
    session_id = conversation(url)
    record = tmp_path / "files" / "tenants" / "default" / "sessions" / f"{session_id}.json"
    record.write_text("{damaged")
    with open_store_sync(url) as store:
        assert store.list_sessions().items == []  # the scan quarantines it
    report = run_json(url, "doctor", code=1)
    assert report["counts"]["quarantined"] == 2
    assert "quarantine" in report["warnings"][0]
    checked = run_json(url, "check", "--repair", code=1)
    assert checked["counts"]["quarantined_file"]["found"] == 2
    assert checked["counts"]["quarantined_file"]["repairable"] is False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def evicting_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test's own that evicts keys when full (the shared server's
    settings are left alone)."""
    port = _free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.server
def test_doctor_warns_of_a_redis_that_evicts_keys(evicting_redis: str) -> None:
    async def scenario() -> checks.DoctorResult:
        async with open_store(evicting_redis) as store:
            await store.create_session()
            return await checks.doctor(store)

    result = asyncio.run(scenario())
    report = result.to_dict()
    assert report["verdict"] == "warnings"
    assert report["settings"]["maxmemory-policy"] == "allkeys-lru"
    assert report["server_version"].startswith("Redis ")
    assert report["counts"]["sessions"] == 1
    assert report["sizes"]["used_memory"] > 0
    assert any("noeviction" in warning for warning in report["warnings"])
    assert any("appendonly" in warning for warning in report["warnings"])
