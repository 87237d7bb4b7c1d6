"""The synchronous twin: generated from the async store, and it works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sessionkeeper import FrozenClock, NotFound, VersionConflict, open_store_sync

ROOT = Path(__file__).resolve().parent.parent


def test_sync_module_is_generated_from_the_store() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_sync.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_twin_does_what_the_store_does(tmp_path: Path) -> None:
    clock = FrozenClock()
    with open_store_sync(f"sqlite:///{tmp_path / 's.db'}", clock=clock) as store:
        session = store.create_session(state={"n": 0})
        store.append_message(session.id, "user", "hello")
        updated = store.update_state(session.id, {"n": 1}, expected_version=2)
        assert updated.state == {"n": 1}
        with pytest.raises(VersionConflict):
            store.update_state(session.id, {"n": 2}, expected_version=2)
        other = store.for_tenant("other")
        with pytest.raises(NotFound):
            other.get_session(session.id)
        assert [m.content for m in store.last_messages(session.id)] == ["hello"]


def test_the_twin_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    import asyncio

    async def main() -> int:
        with open_store_sync("memory://") as store:
            store.create_session()
            return store.count_sessions()

    assert asyncio.run(main()) == 1
