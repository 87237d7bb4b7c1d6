"""Engines chosen by URL: known schemes, clear errors for the rest."""

from __future__ import annotations

import pytest

from sessionkeeper import InvalidInput, Settings, open_store
from sessionkeeper.engines.memory import MemoryEngine
from sessionkeeper.engines.urls import engine_from_url, sqlite_path


def test_known_schemes() -> None:
    assert isinstance(engine_from_url("memory://", Settings()), MemoryEngine)
    assert str(sqlite_path("sqlite:///rel/x.db")) == "rel/x.db"
    assert str(sqlite_path("sqlite:////abs/x.db")) == "/abs/x.db"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mongodb://x", "unknown store URL"),
        ("nonsense", "unknown store URL"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite:///:memory:", "memory://"),
        ("sqlite:///", "needs a file path"),
        ("memory://x", "takes no"),
    ],
)
def test_bad_urls_name_the_fix(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        open_store(url)
    assert caught.value.field == "url"


def test_importing_sessionkeeper_pulls_in_no_engine_driver() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sessionkeeper; "
        "print(sorted(m for m in sys.modules if m.startswith('sessionkeeper.engines.') "
        "or m in ('sqlite3', 'redis', 'asyncpg', 'psycopg')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['sessionkeeper.engines.base', 'sessionkeeper.engines.urls']"
