"""Engines chosen by URL, through one explicit, lazy table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import InvalidInput
from ..settings import Settings
from .base import Engine

__all__ = ["ENGINES", "engine_from_url"]


def _memory(url: str, settings: Settings) -> Engine:
    from .memory import MemoryEngine

    if url.rstrip("/") not in ("memory:", "memory://"):
        raise InvalidInput("url", "memory:// takes no host, path or options")
    return MemoryEngine()


def _sqlite(url: str, settings: Settings) -> Engine:
    from .sqlite import SQLiteEngine

    return SQLiteEngine(sqlite_path(url), settings)


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel.db`` is relative to the working directory; ``sqlite:////abs.db`` not."""
    parts = urlsplit(url)
    if parts.netloc:
        raise InvalidInput("url", "a sqlite URL has no host: write sqlite:///path/to/file.db")
    if parts.query:
        raise InvalidInput("url", "sqlite URLs take no options; use settings instead")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path or path == ":memory:":
        raise InvalidInput(
            "url", "a sqlite URL needs a file path (sqlite:///sessions.db); use memory:// for RAM"
        )
    return Path(path)


def _files(url: str, settings: Settings) -> Engine:
    from .files import FilesEngine

    return FilesEngine(files_path(url), settings)


def files_path(url: str) -> Path:
    """``file:///abs/dir`` is absolute; ``file:rel/dir`` (no slashes) is relative to the
    working directory. The path is taken as written: no host, options or percent-decoding."""
    parts = urlsplit(url)
    if parts.netloc:
        raise InvalidInput(
            "url", "a file URL has no host: write file:///abs/dir or file:relative/dir"
        )
    if parts.query or parts.fragment:
        raise InvalidInput("url", "file URLs take no options; use settings instead")
    if not parts.path or parts.path == "/":
        raise InvalidInput("url", "a file URL needs a folder (file:///path/to/dir)")
    return Path(parts.path)


def _postgres(url: str, settings: Settings) -> Engine:
    from .postgres import PostgresEngine

    return PostgresEngine(url, settings)


def _redis(url: str, settings: Settings) -> Engine:
    from .redis import RedisEngine

    return RedisEngine(url, settings)


#: scheme -> (factory, the extra that installs its driver, or None if it needs none)
ENGINES: dict[str, tuple[Callable[[str, Settings], Engine], str | None]] = {
    "memory": (_memory, None),
    "file": (_files, None),
    "sqlite": (_sqlite, None),
    "postgresql": (_postgres, "postgres"),
    "postgres": (_postgres, "postgres"),
    "redis": (_redis, "redis"),
    "rediss": (_redis, "redis"),
}


def engine_from_url(url: str, settings: Settings) -> Engine:
    """Build the engine a URL names. Unknown schemes and missing drivers name the fix."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    entry = ENGINES.get(scheme)
    if entry is None:
        known = ", ".join(f"{name}://" for name in ENGINES)
        raise InvalidInput("url", f"unknown store URL {url!r}; use one of {known}")
    factory, extra = entry
    try:
        return factory(url, settings)
    except ModuleNotFoundError as exc:
        raise InvalidInput(
            "url", f"the {scheme} engine needs its driver: pip install 'sessionkeeper[{extra}]'"
        ) from exc
