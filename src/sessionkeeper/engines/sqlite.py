"""The SQLite engine: WAL, one writer thread that group-commits, and reader threads.

Writes from every task queue up for one writer thread, which runs all that are waiting in
one ``BEGIN IMMEDIATE`` transaction, then commits once and hands out the results. A job
raises a domain error only before its first write; any other failure rolls the batch back
and each job is run again alone, so one failing write leaves the others whole. Readers run on
their own threads and connections and never wait for the writer. Other processes are kept
out by SQLite's write lock, waited for up to ``sqlite_busy_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .. import rules
from ..errors import (
    AlreadyExists,
    BackendUnavailable,
    NotFound,
    SessionKeeperError,
)
from ..models import (
    DAILY_COUNTERS,
    Change,
    CheckReport,
    DailyRecord,
    DoctorReport,
    FolderRecord,
    GuardRecord,
    GuardUpdate,
    MessageDraft,
    MessageRecord,
    OwnerCost,
    OwnerCount,
    SessionQuery,
    SessionRecord,
    Stats,
)
from ..settings import Settings
from .base import (
    Engine,
    T,
    Tally,
    Totals,
    TotalsKey,
    has_gap,
    tally_differs,
    totals_differing,
)

__all__ = ["SCHEMA_VERSION", "STATS_SQL", "SQLiteEngine", "list_sql"]

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE sessions (
            pk INTEGER PRIMARY KEY,
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            owner TEXT,
            folder TEXT,
            title TEXT NOT NULL,
            status TEXT NOT NULL,
            step TEXT,
            version INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            expires_at REAL,
            idle_ttl REAL,
            deadline REAL,
            message_count INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost REAL NOT NULL,
            metadata TEXT NOT NULL
        )""",
        "CREATE UNIQUE INDEX sessions_by_id ON sessions (tenant, id)",
        "CREATE INDEX sessions_by_created ON sessions (tenant, created_at, id)",
        "CREATE INDEX sessions_by_updated ON sessions (tenant, updated_at, id)",
        "CREATE INDEX sessions_by_owner_created ON sessions (tenant, owner, created_at, id)",
        "CREATE INDEX sessions_by_owner_updated ON sessions (tenant, owner, updated_at, id)",
        "CREATE INDEX sessions_by_folder ON sessions (tenant, folder, created_at, id)",
        "CREATE INDEX sessions_by_status ON sessions (tenant, status, created_at, id)",
        "CREATE INDEX sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL",
        # State lives apart so appends and listings never read or rewrite it.
        "CREATE TABLE states (session_pk INTEGER PRIMARY KEY, state TEXT NOT NULL)",
        """CREATE TABLE messages (
            session_pk INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost REAL NOT NULL,
            metadata TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (session_pk, seq)
        ) WITHOUT ROWID""",
        """CREATE TABLE folders (
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            owner TEXT,
            name TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, id)
        )""",
        "CREATE UNIQUE INDEX folders_by_name ON folders (tenant, ifnull(owner, ''), name)",
    ),
    2: (
        """CREATE TABLE guards (
            tenant TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            expires_at REAL,
            PRIMARY KEY (tenant, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX guards_by_expiry ON guards (expires_at) WHERE expires_at IS NOT NULL",
    ),
    # Stats without reading every session: per (tenant, owner, status) totals, kept by
    # triggers (so every write path keeps them, repair and load included) and read with a
    # correction for the expired sessions that purge has not removed yet. An owner id is
    # never empty (rules.check_id), so '' stands for none in the key.
    3: (
        """CREATE TABLE totals (
            tenant TEXT NOT NULL,
            owner_key TEXT NOT NULL,
            status TEXT NOT NULL,
            sessions INTEGER NOT NULL,
            messages INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost REAL NOT NULL,
            PRIMARY KEY (tenant, owner_key, status)
        ) WITHOUT ROWID""",
        "INSERT INTO totals SELECT tenant, ifnull(owner, ''), status, count(*), "
        "sum(message_count), sum(input_tokens), sum(output_tokens), total(cost) "
        "FROM sessions GROUP BY 1, 2, 3",
        "CREATE INDEX sessions_by_tenant_expiry ON sessions (tenant, expires_at) "
        "WHERE expires_at IS NOT NULL",
        """CREATE TRIGGER totals_insert AFTER INSERT ON sessions BEGIN
            INSERT INTO totals VALUES (NEW.tenant, ifnull(NEW.owner, ''), NEW.status, 1,
                NEW.message_count, NEW.input_tokens, NEW.output_tokens, NEW.cost)
            ON CONFLICT (tenant, owner_key, status) DO UPDATE SET sessions = sessions + 1,
                messages = messages + excluded.messages,
                input_tokens = input_tokens + excluded.input_tokens,
                output_tokens = output_tokens + excluded.output_tokens,
                cost = cost + excluded.cost;
        END""",
        # A key whose last session goes, goes with it (which also drops its rounding).
        """CREATE TRIGGER totals_delete AFTER DELETE ON sessions BEGIN
            UPDATE totals SET sessions = sessions - 1, messages = messages - OLD.message_count,
                input_tokens = input_tokens - OLD.input_tokens,
                output_tokens = output_tokens - OLD.output_tokens, cost = cost - OLD.cost
            WHERE tenant = OLD.tenant AND owner_key = ifnull(OLD.owner, '')
                AND status = OLD.status;
            DELETE FROM totals WHERE tenant = OLD.tenant AND owner_key = ifnull(OLD.owner, '')
                AND status = OLD.status AND sessions = 0;
        END""",
        # An append moves the counted columns of one key: one UPDATE of its row. Writes
        # that move none of them (renewals, folder moves, titles) fire nothing.
        """CREATE TRIGGER totals_count AFTER UPDATE OF message_count, input_tokens,
            output_tokens, cost ON sessions
        WHEN OLD.tenant = NEW.tenant AND OLD.owner IS NEW.owner AND OLD.status = NEW.status
            AND (OLD.message_count != NEW.message_count OR OLD.input_tokens != NEW.input_tokens
            OR OLD.output_tokens != NEW.output_tokens OR OLD.cost != NEW.cost)
        BEGIN
            UPDATE totals SET messages = messages + (NEW.message_count - OLD.message_count),
                input_tokens = input_tokens + (NEW.input_tokens - OLD.input_tokens),
                output_tokens = output_tokens + (NEW.output_tokens - OLD.output_tokens),
                cost = cost + (NEW.cost - OLD.cost)
            WHERE tenant = NEW.tenant AND owner_key = ifnull(NEW.owner, '')
                AND status = NEW.status;
        END""",
        """CREATE TRIGGER totals_move AFTER UPDATE OF tenant, owner, status ON sessions
        WHEN OLD.tenant != NEW.tenant OR OLD.owner IS NOT NEW.owner OR OLD.status != NEW.status
        BEGIN
            UPDATE totals SET sessions = sessions - 1, messages = messages - OLD.message_count,
                input_tokens = input_tokens - OLD.input_tokens,
                output_tokens = output_tokens - OLD.output_tokens, cost = cost - OLD.cost
            WHERE tenant = OLD.tenant AND owner_key = ifnull(OLD.owner, '')
                AND status = OLD.status;
            DELETE FROM totals WHERE tenant = OLD.tenant AND owner_key = ifnull(OLD.owner, '')
                AND status = OLD.status AND sessions = 0;
            INSERT INTO totals VALUES (NEW.tenant, ifnull(NEW.owner, ''), NEW.status, 1,
                NEW.message_count, NEW.input_tokens, NEW.output_tokens, NEW.cost)
            ON CONFLICT (tenant, owner_key, status) DO UPDATE SET sessions = sessions + 1,
                messages = messages + excluded.messages,
                input_tokens = input_tokens + excluded.input_tokens,
                output_tokens = output_tokens + excluded.output_tokens,
                cost = cost + excluded.cost;
        END""",
    ),
    # Analytics: counters per tenant, UTC day and owner ('' for none), added to by
    # add_daily; one row per day and owner, so a month of figures reads a month of rows.
    4: (
        """CREATE TABLE daily (
            tenant TEXT NOT NULL,
            day INTEGER NOT NULL,
            owner_key TEXT NOT NULL,
            created INTEGER NOT NULL,
            completed INTEGER NOT NULL,
            completed_messages INTEGER NOT NULL,
            messages INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost REAL NOT NULL,
            PRIMARY KEY (tenant, day, owner_key)
        ) WITHOUT ROWID""",
    ),
}
SCHEMA_VERSION = max(_MIGRATIONS)
# The indexes the migrations create, which doctor looks for in the catalog.
EXPECTED_INDEXES = tuple(
    found[1]
    for statements in _MIGRATIONS.values()
    for statement in statements
    if (found := re.match(r"CREATE (?:UNIQUE )?INDEX (\w+)", statement))
)
# The totals stats read, and the triggers that keep them, which doctor looks for too.
EXPECTED_TRIGGERS = tuple(
    found[1]
    for statements in _MIGRATIONS.values()
    for statement in statements
    if (found := re.match(r"CREATE TRIGGER (\w+)", statement))
)
_CHECK_BATCH = 500
_DAILY_COLUMNS = ", ".join(DAILY_COUNTERS)
# The first day of a day's ISO week (day 0, 1970-01-01, was a Thursday) and month.
_PERIOD_START = {
    "week": "day - (day + 3) % 7",
    "month": "CAST(julianday(day * 86400, 'unixepoch', 'start of month') - 2440587.5 AS INTEGER)",
}
_ADD_DAILY = (
    f"INSERT INTO daily (tenant, day, owner_key, {_DAILY_COLUMNS}) "
    f"VALUES (?, ?, ?, {', '.join('?' * len(DAILY_COUNTERS))}) "
    "ON CONFLICT (tenant, day, owner_key) DO UPDATE SET "
    + ", ".join(f"{name} = {name} + excluded.{name}" for name in DAILY_COUNTERS)
)
_SET_DAILY = (
    _ADD_DAILY.split(" DO UPDATE SET ")[0]
    + " DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in DAILY_COUNTERS)
)
_SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}

_RECORD = (
    "s.tenant, s.id, s.owner, s.folder, s.title, s.status, s.step, s.metadata, {state}, "
    "s.version, s.created_at, s.updated_at, s.expires_at, s.idle_ttl, s.deadline, "
    "s.message_count, s.last_seq, s.input_tokens, s.output_tokens, s.cost"
)
_WITH_STATE = (
    f"SELECT s.pk, {_RECORD.format(state='st.state')} FROM sessions s "
    "JOIN states st ON st.session_pk = s.pk WHERE s.tenant = ? AND s.id = ?"
)
_WITHOUT_STATE = (
    f"SELECT s.pk, {_RECORD.format(state='NULL')} FROM sessions s WHERE s.tenant = ? AND s.id = ?"
)
_UPDATE_SESSION = (
    "UPDATE sessions SET owner = ?, folder = ?, title = ?, status = ?, step = ?, metadata = ?, "
    "version = ?, updated_at = ?, expires_at = ?, message_count = ?, last_seq = ?, "
    "input_tokens = ?, output_tokens = ?, cost = ? WHERE pk = ?"
)
_INSERT_SESSION = (
    "INSERT INTO sessions (tenant, id, owner, folder, title, status, step, metadata, version, "
    "created_at, updated_at, expires_at, idle_ttl, deadline, message_count, last_seq, "
    "input_tokens, output_tokens, cost) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (session_pk, seq, role, content, input_tokens, output_tokens, cost, "
    "metadata, created_at) VALUES (?,?,?,?,?,?,?,?,?)"
)
# An append moves only these columns (so the owner, folder, status and expiry indexes stay
# untouched) in one statement, and reads back what numbering and idle renewal need.
_APPEND = (
    "UPDATE sessions SET version = version + 1, updated_at = ?, "
    "message_count = message_count + ?, last_seq = last_seq + ?, "
    "input_tokens = input_tokens + ?, output_tokens = output_tokens + ?, cost = cost + ? "
    "WHERE tenant = ? AND id = ? AND (expires_at IS NULL OR expires_at > ?)"
)
_RETURNING = " RETURNING pk, last_seq, expires_at, idle_ttl, deadline"
_APPEND_IF_VERSION = f"{_APPEND} AND version = ?{_RETURNING}"
_APPEND = f"{_APPEND}{_RETURNING}"
_MESSAGE = "seq, role, content, input_tokens, output_tokens, cost, metadata, created_at"
# One statement each (its own snapshot): the session's expiry, then its messages; a
# session with none in range gives one row of NULL message columns.
_READ_AFTER = (
    "SELECT s.expires_at, s.idle_ttl, m.seq, m.role, m.content, m.input_tokens, "
    "m.output_tokens, m.cost, m.metadata, m.created_at FROM sessions s "
    "LEFT JOIN messages m ON m.session_pk = s.pk AND m.seq > ? "
    "WHERE s.tenant = ? AND s.id = ? ORDER BY m.seq LIMIT ?"
)
_READ_LAST = (
    "SELECT s.expires_at, s.idle_ttl, m.seq, m.role, m.content, m.input_tokens, "
    "m.output_tokens, m.cost, m.metadata, m.created_at FROM sessions s "
    "LEFT JOIN messages m ON m.session_pk = s.pk "
    "WHERE s.tenant = ? AND s.id = ? ORDER BY m.seq DESC LIMIT ?"
)
_LIVE = "(s.expires_at IS NULL OR s.expires_at > ?)"
# Stats: the tenant's totals, less the expired sessions purge has not removed yet (a
# range of sessions_by_tenant_expiry), so no statement reads more than a tenant's owners,
# its unpurged expired sessions and its recently updated ones. Public for the plan tests.
_STATS_ROWS = (
    "WITH t AS (SELECT owner_key, status, sessions, messages, input_tokens, output_tokens, "
    "cost FROM totals WHERE tenant = :tenant UNION ALL "
    "SELECT ifnull(owner, ''), status, -1, -message_count, -input_tokens, -output_tokens, "
    "-cost FROM sessions WHERE tenant = :tenant AND expires_at <= :now) "
)
STATS_SQL = {
    "by_status": (
        f"{_STATS_ROWS}SELECT status, sum(sessions), sum(messages), sum(input_tokens), "
        "sum(output_tokens), total(cost) FROM t GROUP BY status"
    ),
    "recent": (
        "SELECT count(*) FROM sessions s WHERE s.tenant = :tenant AND s.updated_at >= :since "
        "AND (s.expires_at IS NULL OR s.expires_at > :now)"
    ),
    # An owner none of whose sessions is live has no rank.
    "top_by_sessions": (
        f"{_STATS_ROWS}SELECT nullif(owner_key, ''), sum(sessions) AS n FROM t "
        "GROUP BY owner_key HAVING n > 0 ORDER BY n DESC, owner_key LIMIT :top"
    ),
    "top_by_cost": (
        f"{_STATS_ROWS}SELECT nullif(owner_key, ''), total(cost) AS c FROM t "
        "GROUP BY owner_key HAVING sum(sessions) > 0 ORDER BY c DESC, owner_key LIMIT :top"
    ),
}
_FOLDER = (
    "SELECT f.tenant, f.id, f.owner, f.name, f.created_at, "
    f"(SELECT count(*) FROM sessions s WHERE s.tenant = f.tenant AND s.folder = f.id AND {_LIVE}) "
    "FROM folders f"
)


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _deliver(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _unavailable(what: str, exc: sqlite3.Error) -> BackendUnavailable:
    error = BackendUnavailable(f"sqlite: {what}: {exc}")
    error.__cause__ = exc
    return error


def _wrap(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        wrapped = BackendUnavailable(f"sqlite: {exc}")
        wrapped.__cause__ = exc
        return wrapped
    return exc


class _Worker:
    """A thread that owns one connection and runs queued jobs in batches.

    A writer runs each batch in one ``BEGIN IMMEDIATE`` transaction and commits once
    (group commit). Jobs follow one rule that makes this safe without a savepoint per job:
    a job raises a SessionKeeperError only before its first write. Any other failure
    (a driver error, a bug) rolls the batch back and replays each job in a transaction of
    its own, so one bad job never takes the others down. A reader runs each job as is; a
    job of several statements opens its own read transaction.
    """

    __slots__ = ("_conn", "_pending", "_queue", "_thread", "_writer")

    MAX_BATCH = 256

    def __init__(self, conn: sqlite3.Connection, name: str, writer: bool) -> None:
        self._conn = conn
        self._writer = writer
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # Jobs submitted during one turn of an event loop, handed over together at its end:
        # one wake-up of the thread per turn instead of one per job.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append(_Job(fn, future, loop))
        return future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = self._pending.pop(loop, None)
        if jobs:
            self._queue.put(jobs)

    def stop(self) -> None:
        """Run every job submitted so far, then end the thread."""
        for loop in list(self._pending):
            self._hand_over(loop)
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        conn = self._conn
        try:
            while True:
                jobs = self._queue.get()
                if jobs is None:
                    return
                batch = list(jobs)
                stopping = False
                while len(batch) < self.MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    batch += more
                results = self._write(conn, batch) if self._writer else self._read(conn, batch)
                self._hand_out(batch, results)
                if stopping:
                    return
        finally:
            conn.close()

    @staticmethod
    def _read(conn: sqlite3.Connection, batch: list[_Job]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        for job in batch:
            try:
                results.append((True, job.fn(conn)))
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                results.append((False, _wrap(exc)))
        return results

    @staticmethod
    def _write(conn: sqlite3.Connection, batch: list[_Job]) -> list[tuple[bool, Any]]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(False, _unavailable("could not start a write", exc))] * len(batch)
        results: list[tuple[bool, Any]] = []
        for job in batch:
            try:
                results.append((True, job.fn(conn)))
            except SessionKeeperError as exc:  # raised before the job wrote anything
                results.append((False, exc))
            except BaseException:
                conn.execute("ROLLBACK")
                return [_Worker._write_alone(conn, job) for job in batch]
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(False, _unavailable("the write was not committed", exc))] * len(batch)
        return results

    @staticmethod
    def _write_alone(conn: sqlite3.Connection, job: _Job) -> tuple[bool, Any]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            value = job.fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False, _wrap(exc)
        return True, value

    @staticmethod
    def _hand_out(batch: list[_Job], results: list[tuple[bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]]
        by_loop = {}
        for job, (ok, value) in zip(batch, results, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, ok, value))
        for loop, items in by_loop.items():
            # A loop that closed while the job ran has nobody waiting for the result.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()


def _session(row: tuple[Any, ...]) -> tuple[int, SessionRecord]:
    return row[0], SessionRecord(*row[1:])


def _live_row(
    conn: sqlite3.Connection, sql: str, tenant: str, session_id: str, now: float
) -> tuple[int, SessionRecord] | None:
    row = conn.execute(sql, (tenant, session_id)).fetchone()
    if row is None:
        return None
    pk, record = _session(row)
    if rules.is_expired(record.expires_at, now):
        return None
    return pk, record


def _writable(
    conn: sqlite3.Connection,
    sql: str,
    tenant: str,
    session_id: str,
    now: float,
    expected_version: int | None,
) -> tuple[int, SessionRecord]:
    found = _live_row(conn, sql, tenant, session_id, now)
    if found is None:
        raise NotFound(f"no session {session_id!r}")
    rules.check_version(found[1], expected_version)
    return found


def _save(conn: sqlite3.Connection, pk: int, r: SessionRecord) -> None:
    conn.execute(
        _UPDATE_SESSION,
        (
            r.owner,
            r.folder,
            r.title,
            r.status,
            r.step,
            r.metadata,
            r.version,
            r.updated_at,
            r.expires_at,
            r.message_count,
            r.last_seq,
            r.input_tokens,
            r.output_tokens,
            r.cost,
            pk,
        ),
    )


def _check_folder(
    conn: sqlite3.Connection, tenant: str, folder_id: str | None, owner: str | None
) -> None:
    if folder_id is None:
        return
    row = conn.execute(
        "SELECT 1 FROM folders WHERE tenant = ? AND id = ? AND owner IS ?",
        (tenant, folder_id, owner),
    ).fetchone()
    if row is None:
        raise NotFound(f"no folder {folder_id!r} of owner {owner!r}")


def _drop_sessions(conn: sqlite3.Connection, pks: list[tuple[int]]) -> None:
    conn.executemany("DELETE FROM messages WHERE session_pk = ?", pks)
    conn.executemany("DELETE FROM states WHERE session_pk = ?", pks)
    conn.executemany("DELETE FROM sessions WHERE pk = ?", pks)


def _where(tenant: str, query: SessionQuery, now: float) -> tuple[str, list[Any]]:
    clauses = ["s.tenant = ?", _LIVE]
    params: list[Any] = [tenant, now]
    if query.owner_set:
        clauses.append("s.owner IS ?")
        params.append(query.owner)
    if query.folder_set:
        clauses.append("s.folder IS ?")
        params.append(query.folder)
    if query.status is not None:
        clauses.append("s.status = ?")
        params.append(query.status)
    for column, op, value in (
        ("created_at", ">=", query.created_since),
        ("created_at", "<", query.created_before),
        ("updated_at", ">=", query.updated_since),
        ("updated_at", "<", query.updated_before),
    ):
        if value is not None:
            clauses.append(f"s.{column} {op} ?")
            params.append(value)
    if query.title_contains is not None:
        clauses.append("instr(lower(s.title), ?) > 0")
        params.append(query.title_contains)
    return " AND ".join(clauses), params


def list_sql(tenant: str, query: SessionQuery, now: float) -> tuple[str, list[Any]]:
    """The SELECT a listing runs (public so tests can check its query plan)."""
    where, params = _where(tenant, query, now)
    key = "s.created_at" if query.order_by == "created_at" else "s.updated_at"
    direction = "DESC" if query.descending else "ASC"
    if query.after_key is not None:
        where += f" AND ({key}, s.id) {'<' if query.descending else '>'} (?, ?)"
        params += [query.after_key, query.after_id]
    sql = (
        f"SELECT s.pk, {_RECORD.format(state='NULL')} FROM sessions s WHERE {where} "
        f"ORDER BY {key} {direction}, s.id {direction} LIMIT ?"
    )
    return sql, [*params, query.limit]


class SQLiteEngine(Engine):
    """Sessions in one SQLite file (WAL): durable, safe for many threads and processes."""

    __slots__ = (
        "_next_reader",
        "_readers",
        "_writer",
        "path",
        "settings",
    )
    name = "sqlite"

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = path
        self.settings = settings
        self._writer: _Worker | None = None
        self._readers: list[_Worker] = []
        self._next_reader = itertools.count()

    # --- plumbing ----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.settings.sqlite_busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.settings.sqlite_synchronous.upper()}")
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current > SCHEMA_VERSION:
                raise BackendUnavailable(
                    f"{self.path} has schema version {current}, newer than this sessionkeeper "
                    f"knows ({SCHEMA_VERSION}): upgrade sessionkeeper"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version VALUES (?, strftime('%s', 'now'))", (version,)
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _open_sync(self) -> None:
        if not self.path.parent.is_dir():
            raise BackendUnavailable(f"sqlite: the folder {self.path.parent} does not exist")
        try:
            writer = self._connect()
            self._migrate(writer)
            readers = [self._connect() for _ in range(self.settings.sqlite_readers)]
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"sqlite: cannot open {self.path}: {exc}") from exc
        self._writer = _Worker(writer, f"sessionkeeper-sqlite-writer:{self.path}", True)
        self._readers = [
            _Worker(conn, f"sessionkeeper-sqlite-reader-{i}:{self.path}", False)
            for i, conn in enumerate(readers)
        ]
        self._opened()

    async def open(self) -> None:
        if self._writer is None:
            await asyncio.to_thread(self._open_sync)

    async def close(self) -> None:
        workers = [w for w in (self._writer, *self._readers) if w is not None]
        self._writer, self._readers = None, []
        self._closed()
        if workers and not self._forked:
            await asyncio.to_thread(_stop_all, workers)

    def _check_usable(self) -> None:
        if self._forked:
            raise BackendUnavailable(
                "this SQLite store was opened before fork(); open a new one in the child"
            )

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        self._check_usable()
        if self._writer is None:
            raise BackendUnavailable("the SQLite engine is closed")
        return self._writer.submit(fn)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        self._check_usable()
        if not self._readers:
            raise BackendUnavailable("the SQLite engine is closed")
        return self._readers[next(self._next_reader) % len(self._readers)].submit(fn)

    async def _renew(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        """Renew an idle session's expiry in a write; None if it is gone."""
        return await self._write(partial(_w_touch, tenant, session_id, now))

    # --- sessions ----------------------------------------------------------------------

    async def insert_session(self, record: SessionRecord, now: float) -> None:
        await self._write(partial(_w_insert, record, now))

    async def get_session(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        found = await self._read(partial(_r_session, tenant, session_id, now))
        if found is None:
            return None
        record = found[1]
        if record.idle_ttl is None:
            return record
        renewed = await self._renew(tenant, session_id, now)
        if renewed is None:
            return None
        record.expires_at = renewed.expires_at
        return record

    async def delete_session(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> None:
        await self._write(partial(_w_delete, tenant, session_id, now, expected_version))

    async def change_session(
        self, tenant: str, session_id: str, change: Change, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        return await self._write(partial(_w_change, tenant, session_id, change, now))

    # --- messages ----------------------------------------------------------------------

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageDraft],
        now: float,
        expected_version: int | None,
    ) -> list[MessageRecord]:
        return await self._write(
            partial(_w_append, tenant, session_id, messages, now, expected_version)
        )

    async def _messages(
        self, tenant: str, session_id: str, now: float, sql: str, params: tuple[Any, ...]
    ) -> list[MessageRecord] | None:
        rows = await self._read(partial(_r_messages, sql, params))
        if not rows or rules.is_expired(rows[0][0], now):
            return None
        if rows[0][1] is not None and await self._renew(tenant, session_id, now) is None:
            return None
        if rows[0][2] is None:  # the session has no messages (in range)
            return []
        return [MessageRecord(session_id, *row[2:]) for row in rows]

    async def read_messages(
        self, tenant: str, session_id: str, now: float, after_seq: int, limit: int
    ) -> list[MessageRecord] | None:
        params = (after_seq, tenant, session_id, limit)
        return await self._messages(tenant, session_id, now, _READ_AFTER, params)

    async def last_messages(
        self, tenant: str, session_id: str, now: float, limit: int
    ) -> list[MessageRecord] | None:
        params = (tenant, session_id, limit)
        found = await self._messages(tenant, session_id, now, _READ_LAST, params)
        return None if found is None else found[::-1]

    async def pop_message(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, MessageRecord | None]:
        return await self._write(partial(_w_pop, tenant, session_id, now, expected_version))

    async def clear_messages(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, int]:
        return await self._write(partial(_w_clear, tenant, session_id, now, expected_version))

    # --- queries -----------------------------------------------------------------------

    async def list_sessions(
        self, tenant: str, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        sql, params = list_sql(tenant, query, now)

        def run(conn: sqlite3.Connection) -> list[SessionRecord]:
            return [_session(row)[1] for row in conn.execute(sql, params)]

        return await self._read(run)

    async def count_sessions(self, tenant: str, query: SessionQuery, now: float) -> int:
        where, params = _where(tenant, query, now)
        sql = f"SELECT count(*) FROM sessions s WHERE {where}"

        def run(conn: sqlite3.Connection) -> int:
            count: int = conn.execute(sql, params).fetchone()[0]
            return count

        return await self._read(run)

    async def stats(self, tenant: str, now: float, since: float, top: int) -> Stats:
        return await self._read(partial(_r_stats, tenant, now, since, top))

    # --- folders -----------------------------------------------------------------------

    async def insert_folder(self, record: FolderRecord) -> None:
        await self._write(partial(_w_insert_folder, record))

    async def get_folder(self, tenant: str, folder_id: str, now: float) -> FolderRecord | None:
        return await self._read(partial(_r_folder, tenant, folder_id, now))

    async def rename_folder(
        self, tenant: str, folder_id: str, name: str, now: float
    ) -> FolderRecord:
        return await self._write(partial(_w_rename_folder, tenant, folder_id, name, now))

    async def list_folders(
        self, tenant: str, owner: str | None, owner_set: bool, now: float
    ) -> list[FolderRecord]:
        sql = f"{_FOLDER} WHERE f.tenant = ?"
        params: list[Any] = [now, tenant]
        if owner_set:
            sql += " AND f.owner IS ?"
            params.append(owner)
        sql += " ORDER BY ifnull(f.owner, ''), f.name, f.id"

        def run(conn: sqlite3.Connection) -> list[FolderRecord]:
            return [FolderRecord(*row) for row in conn.execute(sql, params)]

        return await self._read(run)

    async def delete_folder(
        self,
        tenant: str,
        folder_id: str,
        now: float,
        reassign_to: str | None,
        cascade: bool,
    ) -> int:
        return await self._write(
            partial(_w_delete_folder, tenant, folder_id, now, reassign_to, cascade)
        )

    # --- expiry ------------------------------------------------------------------------

    async def purge_expired(
        self, tenant: str | None, now: float, limit: int
    ) -> list[tuple[str, str]]:
        return await self._write(partial(_w_purge, tenant, now, limit))

    # --- transfer ----------------------------------------------------------------------

    async def list_tenants(self, now: float) -> list[str]:
        sql = (
            f"SELECT DISTINCT s.tenant FROM sessions s WHERE {_LIVE} "
            "UNION SELECT tenant FROM folders ORDER BY 1"
        )

        def run(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute(sql, (now,))]

        return await self._read(run)

    async def export_session(
        self, tenant: str, session_id: str, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]] | None:
        return await self._read(partial(_r_export, tenant, session_id, now))

    async def load_session(
        self, record: SessionRecord, messages: list[MessageRecord], now: float, replace: bool
    ) -> bool:
        return await self._write(partial(_w_load, record, messages, now, replace))

    async def load_folder(self, record: FolderRecord, replace: bool) -> bool:
        return await self._write(partial(_w_load_folder, record, replace))

    # --- analytics ---------------------------------------------------------------------

    async def add_daily(self, tenant: str, rows: list[DailyRecord], replace: bool = False) -> None:
        params = [
            (tenant, r.day, r.owner or "", *(getattr(r, name) for name in DAILY_COUNTERS))
            for r in rows
        ]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(_SET_DAILY if replace else _ADD_DAILY, params)

        await self._write(run)

    async def read_daily(
        self,
        tenant: str,
        first: int,
        last: int,
        owner: str | None,
        owner_set: bool,
        group_by: str = "day",
    ) -> list[DailyRecord]:
        # summed per period here: a year by month is 12 rows an owner, not 365
        period = _PERIOD_START.get(group_by, "day")
        sums = ", ".join(f"sum({name})" for name in DAILY_COUNTERS)
        sql = f"SELECT {period} AS p, owner_key, {sums} FROM daily "
        sql += "WHERE tenant = ? AND day BETWEEN ? AND ?"
        params: list[Any] = [tenant, first, last]
        if owner_set:
            sql += " AND owner_key = ?"
            params.append(owner or "")
        sql += " GROUP BY p, owner_key"

        def run(conn: sqlite3.Connection) -> list[DailyRecord]:
            return [
                DailyRecord(day, key or None, *counters)
                for day, key, *counters in conn.execute(sql, params)
            ]

        return await self._read(run)

    async def session_owners(self, tenant: str, session_ids: list[str]) -> dict[str, str | None]:
        def run(conn: sqlite3.Connection) -> dict[str, str | None]:
            found: dict[str, str | None] = {}
            for at in range(0, len(session_ids), _CHECK_BATCH):
                chunk = session_ids[at : at + _CHECK_BATCH]
                marks = ", ".join("?" * len(chunk))
                found.update(
                    conn.execute(
                        f"SELECT id, owner FROM sessions WHERE tenant = ? AND id IN ({marks})",
                        (tenant, *chunk),
                    ).fetchall()
                )
            return found

        return await self._read(run)

    # --- backup ------------------------------------------------------------------------

    async def backup(self, dest: Path) -> None:
        """Copy the whole database to ``dest`` with SQLite's online backup API, on a reader
        thread: one step from one read snapshot, so writers go on meanwhile (WAL) and the
        copy is consistent. ``dest`` is written beside itself and renamed into place, so
        it appears whole or not at all."""
        partial_path = dest.with_name(dest.name + ".part")

        def run(conn: sqlite3.Connection) -> None:
            target = sqlite3.connect(partial_path)
            try:
                conn.backup(target)  # pages=-1: every page in one step
            finally:
                target.close()

        try:
            await self._read(run)
            partial_path.replace(dest)
        finally:
            partial_path.unlink(missing_ok=True)

    # --- check and doctor --------------------------------------------------------------

    async def check(self, tenant: str | None, now: float, repair: bool) -> CheckReport:
        report = CheckReport()
        after = 0
        while True:
            rows = await self._read(partial(_r_check_batch, tenant, after))
            if not rows:
                break
            after = rows[-1][0]
            for pk, name, session_id, stored, tally, folder_lost in rows:
                subject = f"{name}/{session_id}"
                if has_gap(tally):
                    report.found("seq_gaps", subject)
                if tally_differs(stored, tally):
                    fixed = repair and await self._write(partial(_w_fix_aggregates, pk))
                    report.found("aggregates", subject, fixed)
                if folder_lost:
                    fixed = repair and await self._write(partial(_w_fix_folder, pk))
                    report.found("missing_folder", subject, fixed)
        await self._check_totals(tenant, repair, report)
        if tenant is None:  # messages of no session have no tenant either
            after = 0
            while orphans := await self._read(partial(_r_orphans, after)):
                after = orphans[-1][0]
                for session_pk, count in orphans:
                    fixed = repair and await self._write(partial(_w_drop_orphans, session_pk))
                    report.found("orphan_messages", f"session pk {session_pk}", fixed, count)
        return report

    async def _check_totals(self, tenant: str | None, repair: bool, report: CheckReport) -> None:
        """Totals (which stats read) that disagree with the sessions; repair rebuilds the
        totals of each tenant concerned."""
        stored, actual = await self._read(partial(_r_totals, tenant))
        differing = totals_differing(stored, actual)
        rebuilt: set[str] = set()
        for key in differing:
            name, owner_key, status = key
            if repair and name not in rebuilt:
                rebuilt.add(name)
                await self._write(partial(_w_rebuild_totals, name))
            report.found("totals", f"{name}/{owner_key or '(no owner)'}/{status}", repair)

    async def doctor(self, now: float) -> DoctorReport:
        report: DoctorReport = await self._read(_r_doctor)
        report.sizes = await asyncio.to_thread(_file_sizes, self.path)
        return report

    # --- guards ------------------------------------------------------------------------

    async def update_guard(self, tenant: str, key: str, update: GuardUpdate[T], now: float) -> T:
        return await self._write(partial(_w_update_guard, tenant, key, update, now))

    async def get_guard(self, tenant: str, key: str, now: float) -> str | None:
        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT value FROM guards WHERE tenant = ? AND key = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (tenant, key, now),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._read(run)

    async def list_guards(self, tenant: str, prefix: str, now: float) -> list[GuardRecord]:
        # The keys with the prefix are one range of the primary key: from the prefix up to
        # the prefix with its last character's successor (text compares as UTF-8 bytes, in
        # code point order), so a poll of one prefix never reads the others' rows.
        sql = "SELECT key, value, expires_at FROM guards WHERE tenant = ? AND key >= ? "
        params: list[Any] = [tenant, prefix]
        if prefix and prefix[-1] < "\U0010ffff":
            sql += "AND key < ? "
            params.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        sql += "AND substr(key, 1, ?) = ? AND (expires_at IS NULL OR expires_at > ?) ORDER BY key"
        params += [len(prefix), prefix, now]

        def run(conn: sqlite3.Connection) -> list[GuardRecord]:
            return [GuardRecord(*row) for row in conn.execute(sql, params)]

        return await self._read(run)


# --- jobs: each runs on a worker thread with that worker's connection -------------------
# Writers run inside the writer's transaction; readers in autocommit (a reader that needs
# one snapshot for several statements BEGINs one). The connection comes last for ``partial``.


def _w_insert(record: SessionRecord, now: float, conn: sqlite3.Connection) -> None:
    row = conn.execute(
        "SELECT pk, expires_at FROM sessions WHERE tenant = ? AND id = ?",
        (record.tenant, record.id),
    ).fetchone()
    if row is not None and not rules.is_expired(row[1], now):
        raise AlreadyExists(f"session {record.id!r} already exists")
    _check_folder(conn, record.tenant, record.folder, record.owner)
    if row is not None:  # an expired session with this id goes, with its messages
        _drop_sessions(conn, [(row[0],)])
    _write_session(conn, record)


def _write_session(conn: sqlite3.Connection, r: SessionRecord) -> int:
    """Insert a session's row and its state exactly as ``r`` holds them; its pk."""
    cursor = conn.execute(
        _INSERT_SESSION,
        (
            r.tenant,
            r.id,
            r.owner,
            r.folder,
            r.title,
            r.status,
            r.step,
            r.metadata,
            r.version,
            r.created_at,
            r.updated_at,
            r.expires_at,
            r.idle_ttl,
            r.deadline,
            r.message_count,
            r.last_seq,
            r.input_tokens,
            r.output_tokens,
            r.cost,
        ),
    )
    pk = cursor.lastrowid
    assert pk is not None  # an INSERT into a rowid table always sets it
    conn.execute("INSERT INTO states VALUES (?, ?)", (pk, r.state))
    return pk


def _r_session(
    tenant: str, session_id: str, now: float, conn: sqlite3.Connection
) -> tuple[int, SessionRecord] | None:
    return _live_row(conn, _WITH_STATE, tenant, session_id, now)


def _w_touch(
    tenant: str, session_id: str, now: float, conn: sqlite3.Connection
) -> SessionRecord | None:
    found = _live_row(conn, _WITHOUT_STATE, tenant, session_id, now)
    if found is None:
        return None
    pk, record = found
    renewed = rules.renewed_expiry(record.expires_at, record.idle_ttl, record.deadline, now)
    if renewed != record.expires_at:
        conn.execute("UPDATE sessions SET expires_at = ? WHERE pk = ?", (renewed, pk))
        record.expires_at = renewed
    return record


def _w_delete(
    tenant: str,
    session_id: str,
    now: float,
    expected_version: int | None,
    conn: sqlite3.Connection,
) -> None:
    pk, _ = _writable(conn, _WITHOUT_STATE, tenant, session_id, now, expected_version)
    _drop_sessions(conn, [(pk,)])


def _w_change(
    tenant: str, session_id: str, change: Change, now: float, conn: sqlite3.Connection
) -> tuple[SessionRecord, list[MessageRecord]]:
    sql = _WITH_STATE if change.want_state or change.has_state_patch else _WITHOUT_STATE
    pk, current = _writable(conn, sql, tenant, session_id, now, None)
    new, appended = rules.apply_change(current, change, now)
    if "owner" in change.fields or "folder" in change.fields:
        _check_folder(conn, tenant, new.folder, new.owner)
    _save(conn, pk, new)
    if new.state is not current.state:
        conn.execute("UPDATE states SET state = ? WHERE session_pk = ?", (new.state, pk))
    if appended:
        conn.executemany(_INSERT_MESSAGE, [(pk, *_message_row(m)) for m in appended])
    return new, appended


def _w_append(
    tenant: str,
    session_id: str,
    drafts: list[MessageDraft],
    now: float,
    expected_version: int | None,
    conn: sqlite3.Connection,
) -> list[MessageRecord]:
    tokens_in = tokens_out = 0
    cost = 0.0
    for draft in drafts:
        tokens_in += draft.input_tokens
        tokens_out += draft.output_tokens
        cost += draft.cost
    moved = (now, len(drafts), len(drafts), tokens_in, tokens_out, cost, tenant, session_id, now)
    if expected_version is None:
        row = conn.execute(_APPEND, moved).fetchone()
    else:
        row = conn.execute(_APPEND_IF_VERSION, (*moved, expected_version)).fetchone()
    if row is None:  # nothing was written: say why
        _writable(conn, _WITHOUT_STATE, tenant, session_id, now, expected_version)
        raise AssertionError("unreachable: the session is live and at the expected version")
    pk, last_seq, expires_at, idle_ttl, deadline = row
    renewed = rules.renewed_expiry(expires_at, idle_ttl, deadline, now)
    if renewed != expires_at:
        conn.execute("UPDATE sessions SET expires_at = ? WHERE pk = ?", (renewed, pk))
    appended = rules.number_messages(session_id, last_seq - len(drafts), drafts, now)
    conn.executemany(_INSERT_MESSAGE, [(pk, *_message_row(m)) for m in appended])
    return appended


def _message_row(m: MessageRecord) -> tuple[Any, ...]:
    return (
        m.seq,
        m.role,
        m.content,
        m.input_tokens,
        m.output_tokens,
        m.cost,
        m.metadata,
        m.created_at,
    )


def _w_pop(
    tenant: str,
    session_id: str,
    now: float,
    expected_version: int | None,
    conn: sqlite3.Connection,
) -> tuple[SessionRecord, MessageRecord | None]:
    pk, current = _writable(conn, _WITHOUT_STATE, tenant, session_id, now, expected_version)
    row = conn.execute(
        f"SELECT {_MESSAGE} FROM messages WHERE session_pk = ? ORDER BY seq DESC LIMIT 1", (pk,)
    ).fetchone()
    if row is None:
        return current, None
    popped = MessageRecord(session_id, *row)
    conn.execute("DELETE FROM messages WHERE session_pk = ? AND seq = ?", (pk, popped.seq))
    new = rules.remove_messages(
        current, 1, popped.input_tokens, popped.output_tokens, popped.cost, now
    )
    _save(conn, pk, new)
    return new, popped


def _w_clear(
    tenant: str,
    session_id: str,
    now: float,
    expected_version: int | None,
    conn: sqlite3.Connection,
) -> tuple[SessionRecord, int]:
    pk, current = _writable(conn, _WITHOUT_STATE, tenant, session_id, now, expected_version)
    removed = conn.execute("DELETE FROM messages WHERE session_pk = ?", (pk,)).rowcount
    new = rules.remove_messages(
        current, removed, current.input_tokens, current.output_tokens, current.cost, now
    )
    _save(conn, pk, new)
    return new, removed


def _r_messages(
    sql: str, params: tuple[Any, ...], conn: sqlite3.Connection
) -> list[tuple[Any, ...]]:
    return conn.execute(sql, params).fetchall()


def _r_stats(tenant: str, now: float, since: float, top: int, conn: sqlite3.Connection) -> Stats:
    params = {"tenant": tenant, "now": now, "since": since, "top": top}
    conn.execute("BEGIN")  # every statement sees one snapshot
    try:
        by_status = {
            row[0]: row[1:] for row in conn.execute(STATS_SQL["by_status"], params).fetchall()
        }
        (recent,) = conn.execute(STATS_SQL["recent"], params).fetchone()
        owners = conn.execute(STATS_SQL["top_by_sessions"], params).fetchall()
        costs = conn.execute(STATS_SQL["top_by_cost"], params).fetchall()
    finally:
        conn.execute("COMMIT")
    sums = [sum(figures[i] for figures in by_status.values()) for i in range(5)]
    total, messages, tokens_in, tokens_out, cost = sums
    completed = by_status.get("completed", (0,))[0]
    return Stats(
        total=total,
        active=by_status.get("active", (0,))[0],
        completed=completed,
        archived=by_status.get("archived", (0,))[0],
        recently_active=recent,
        completion_rate=completed / total if total else 0.0,
        messages=messages,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost=float(cost),
        top_owners=[OwnerCount(owner=owner, sessions=n) for owner, n in owners],
        top_owners_by_cost=[OwnerCost(owner=owner, cost=c) for owner, c in costs],
    )


def _r_folder(
    tenant: str, folder_id: str, now: float, conn: sqlite3.Connection
) -> FolderRecord | None:
    row = conn.execute(f"{_FOLDER} WHERE f.tenant = ? AND f.id = ?", (now, tenant, folder_id))
    found = row.fetchone()
    return None if found is None else FolderRecord(*found)


def _w_insert_folder(record: FolderRecord, conn: sqlite3.Connection) -> None:
    try:
        conn.execute(
            "INSERT INTO folders VALUES (?, ?, ?, ?, ?)",
            (record.tenant, record.id, record.owner, record.name, record.created_at),
        )
    except sqlite3.IntegrityError as exc:
        raise AlreadyExists(f"owner {record.owner!r} already has a folder {record.name!r}") from exc


def _w_rename_folder(
    tenant: str, folder_id: str, name: str, now: float, conn: sqlite3.Connection
) -> FolderRecord:
    folder = _r_folder(tenant, folder_id, now, conn)
    if folder is None:
        raise NotFound(f"no folder {folder_id!r}")
    try:
        conn.execute(
            "UPDATE folders SET name = ? WHERE tenant = ? AND id = ?", (name, tenant, folder_id)
        )
    except sqlite3.IntegrityError as exc:
        raise AlreadyExists(f"owner {folder.owner!r} already has a folder {name!r}") from exc
    folder.name = name
    return folder


def _w_delete_folder(
    tenant: str,
    folder_id: str,
    now: float,
    reassign_to: str | None,
    cascade: bool,
    conn: sqlite3.Connection,
) -> int:
    folder = _r_folder(tenant, folder_id, now, conn)
    if folder is None:
        raise NotFound(f"no folder {folder_id!r}")
    if reassign_to is not None:
        _check_folder(conn, tenant, reassign_to, folder.owner)
    if cascade:
        pks = conn.execute(
            "SELECT pk FROM sessions WHERE tenant = ? AND folder = ?", (tenant, folder_id)
        ).fetchall()
        _drop_sessions(conn, pks)
    else:
        conn.execute(
            "UPDATE sessions SET folder = ?, version = version + 1, updated_at = ? "
            "WHERE tenant = ? AND folder = ?",
            (reassign_to, now, tenant, folder_id),
        )
    conn.execute("DELETE FROM folders WHERE tenant = ? AND id = ?", (tenant, folder_id))
    return folder.session_count


def _w_purge(
    tenant: str | None, now: float, limit: int, conn: sqlite3.Connection
) -> list[tuple[str, str]]:
    if tenant is None:
        rows = conn.execute(
            "SELECT pk, tenant, id FROM sessions WHERE expires_at <= ? LIMIT ?", (now, limit)
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT pk, tenant, id FROM sessions WHERE expires_at <= ? AND tenant = ? LIMIT ?",
            (now, tenant, limit),
        ).fetchall()
    _drop_sessions(conn, [(pk,) for pk, _, _ in rows])
    # Expired guards go too (they are absent already); only sessions are counted.
    scope, params = (
        ("", (now, limit)) if tenant is None else (" AND tenant = ?", (now, tenant, limit))
    )
    conn.execute(
        "DELETE FROM guards WHERE (tenant, key) IN "
        f"(SELECT tenant, key FROM guards WHERE expires_at <= ?{scope} LIMIT ?)",
        params,
    )
    return [(name, sid) for _, name, sid in rows]


def _r_export(
    tenant: str, session_id: str, now: float, conn: sqlite3.Connection
) -> tuple[SessionRecord, list[MessageRecord]] | None:
    conn.execute("BEGIN")  # the session and its messages from one snapshot
    try:
        found = _live_row(conn, _WITH_STATE, tenant, session_id, now)
        if found is None:
            return None
        pk, record = found
        rows = conn.execute(
            f"SELECT {_MESSAGE} FROM messages WHERE session_pk = ? ORDER BY seq", (pk,)
        )
        return record, [MessageRecord(session_id, *row) for row in rows]
    finally:
        conn.execute("COMMIT")


def _w_load(
    record: SessionRecord,
    messages: list[MessageRecord],
    now: float,
    replace: bool,
    conn: sqlite3.Connection,
) -> bool:
    row = conn.execute(
        "SELECT pk, expires_at FROM sessions WHERE tenant = ? AND id = ?",
        (record.tenant, record.id),
    ).fetchone()
    if row is not None and not replace and not rules.is_expired(row[1], now):
        return False
    _check_folder(conn, record.tenant, record.folder, record.owner)
    if row is not None:
        _drop_sessions(conn, [(row[0],)])
    pk = _write_session(conn, record)
    conn.executemany(_INSERT_MESSAGE, [(pk, *_message_row(m)) for m in messages])
    return True


def _w_load_folder(record: FolderRecord, replace: bool, conn: sqlite3.Connection) -> bool:
    r = record
    taken = conn.execute(
        "SELECT id FROM folders WHERE tenant = ? AND owner IS ? AND name = ? AND id != ?",
        (r.tenant, r.owner, r.name, r.id),
    ).fetchone()
    exists = conn.execute(
        "SELECT 1 FROM folders WHERE tenant = ? AND id = ?", (r.tenant, r.id)
    ).fetchone()
    if exists is not None and not replace:
        return False
    if taken is not None:
        raise AlreadyExists(f"owner {r.owner!r} already has a folder {r.name!r}")
    conn.execute(
        "INSERT INTO folders VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, id) DO UPDATE SET "
        "owner = excluded.owner, name = excluded.name, created_at = excluded.created_at",
        (r.tenant, r.id, r.owner, r.name, r.created_at),
    )
    return True


def _w_update_guard(
    tenant: str, key: str, update: GuardUpdate[T], now: float, conn: sqlite3.Connection
) -> T:
    row = conn.execute(
        "SELECT value, expires_at FROM guards WHERE tenant = ? AND key = ?", (tenant, key)
    ).fetchone()
    current = None if row is None or rules.is_expired(row[1], now) else row[0]
    value, expires_at, result = update(current)
    if value is None:
        if row is not None:
            conn.execute("DELETE FROM guards WHERE tenant = ? AND key = ?", (tenant, key))
    else:
        conn.execute(
            "INSERT INTO guards VALUES (?, ?, ?, ?) ON CONFLICT (tenant, key) DO UPDATE SET "
            "value = excluded.value, expires_at = excluded.expires_at",
            (tenant, key, value, expires_at),
        )
    return result


def _file_sizes(path: Path) -> dict[str, int]:
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            sizes[f"file{suffix}"] = os.path.getsize(f"{path}{suffix}")
    return sizes


def _r_check_batch(
    tenant: str | None, after: int, conn: sqlite3.Connection
) -> list[tuple[int, str, str, tuple[int, int, int, float, int], Tally, bool]]:
    """The next sessions by pk, with what their messages add up to (one GROUP BY)."""
    where = "pk > ?" + ("" if tenant is None else " AND tenant = ?")
    args: tuple[Any, ...] = (after,) if tenant is None else (after, tenant)
    rows = conn.execute(
        "SELECT s.pk, s.tenant, s.id, s.message_count, s.input_tokens, s.output_tokens, "
        "s.cost, s.last_seq, count(m.seq), coalesce(sum(m.input_tokens), 0), "
        "coalesce(sum(m.output_tokens), 0), coalesce(sum(m.cost), 0.0), "
        "coalesce(min(m.seq), 0), coalesce(max(m.seq), 0), "
        "s.folder IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM folders f WHERE f.tenant = s.tenant AND f.id = s.folder) "
        f"FROM (SELECT * FROM sessions WHERE {where} ORDER BY pk LIMIT ?) s "
        "LEFT JOIN messages m ON m.session_pk = s.pk GROUP BY s.pk ORDER BY s.pk",
        (*args, _CHECK_BATCH),
    ).fetchall()
    return [(r[0], r[1], r[2], tuple(r[3:8]), tuple(r[8:14]), bool(r[14])) for r in rows]


def _w_fix_aggregates(pk: int, conn: sqlite3.Connection) -> bool:
    """Recompute a session's aggregates from its messages, if they still disagree."""
    row = conn.execute(
        "SELECT message_count, input_tokens, output_tokens, cost, last_seq FROM sessions "
        "WHERE pk = ?",
        (pk,),
    ).fetchone()
    tally = conn.execute(
        "SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), "
        "coalesce(sum(cost), 0.0), coalesce(min(seq), 0), coalesce(max(seq), 0) "
        "FROM messages WHERE session_pk = ?",
        (pk,),
    ).fetchone()
    if row is None or not tally_differs(tuple(row), tuple(tally)):
        return False
    conn.execute(
        "UPDATE sessions SET message_count = ?, input_tokens = ?, output_tokens = ?, "
        "cost = ?, last_seq = max(last_seq, ?), version = version + 1 WHERE pk = ?",
        (tally[0], tally[1], tally[2], tally[3], tally[5], pk),
    )
    return True


def _w_fix_folder(pk: int, conn: sqlite3.Connection) -> bool:
    """Take a session out of a folder that does not exist (any more)."""
    return (
        conn.execute(
            "UPDATE sessions SET folder = NULL, version = version + 1 WHERE pk = ? "
            "AND folder IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM folders f WHERE f.tenant = sessions.tenant AND f.id = sessions.folder)",
            (pk,),
        ).rowcount
        == 1
    )


_TOTALS_OF_SESSIONS = (
    "SELECT tenant, ifnull(owner, ''), status, count(*), sum(message_count), "
    "sum(input_tokens), sum(output_tokens), total(cost) FROM sessions{where} GROUP BY 1, 2, 3"
)


def _r_totals(
    tenant: str | None, conn: sqlite3.Connection
) -> tuple[dict[TotalsKey, Totals], dict[TotalsKey, Totals]]:
    """The stored totals and what the sessions add up to, from one snapshot."""
    where, args = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
    conn.execute("BEGIN")
    try:
        stored = conn.execute(
            "SELECT tenant, owner_key, status, sessions, messages, input_tokens, "
            f"output_tokens, cost FROM totals{where}",
            args,
        ).fetchall()
        actual = conn.execute(_TOTALS_OF_SESSIONS.format(where=where), args).fetchall()
    finally:
        conn.execute("COMMIT")
    return (
        {tuple(row[:3]): tuple(row[3:]) for row in stored},
        {tuple(row[:3]): tuple(row[3:]) for row in actual},
    )


def _w_rebuild_totals(tenant: str, conn: sqlite3.Connection) -> bool:
    """Recompute a tenant's totals from its sessions (in the writer's transaction, so no
    write comes between)."""
    conn.execute("DELETE FROM totals WHERE tenant = ?", (tenant,))
    conn.execute(
        f"INSERT INTO totals {_TOTALS_OF_SESSIONS.format(where=' WHERE tenant = ?')}", (tenant,)
    )
    return True


def _r_orphans(after: int, conn: sqlite3.Connection) -> list[tuple[int, int]]:
    return conn.execute(
        "SELECT session_pk, count(*) FROM messages WHERE session_pk > ? "
        "AND session_pk NOT IN (SELECT pk FROM sessions) "
        "GROUP BY session_pk ORDER BY session_pk LIMIT ?",
        (after, _CHECK_BATCH),
    ).fetchall()


def _w_drop_orphans(session_pk: int, conn: sqlite3.Connection) -> bool:
    conn.execute(
        "DELETE FROM messages WHERE session_pk = ? "
        "AND NOT EXISTS (SELECT 1 FROM sessions WHERE pk = ?)",
        (session_pk, session_pk),
    )
    conn.execute(
        "DELETE FROM states WHERE session_pk = ? "
        "AND NOT EXISTS (SELECT 1 FROM sessions WHERE pk = ?)",
        (session_pk, session_pk),
    )
    return True


def _r_doctor(conn: sqlite3.Connection) -> DoctorReport:
    journal = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    synchronous = _SYNCHRONOUS.get(conn.execute("PRAGMA synchronous").fetchone()[0], "?")
    catalog = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
    present = {name for kind, name in catalog if kind == "index"}
    triggers = {name for kind, name in catalog if kind == "trigger"}
    has_totals = ("table", "totals") in catalog
    report = DoctorReport(
        engine="sqlite",
        server_version=f"SQLite {sqlite3.sqlite_version}",
        schema_version=conn.execute("SELECT max(version) FROM schema_version").fetchone()[0],
        settings={"journal_mode": journal, "synchronous": synchronous},
        counts={
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("sessions", "messages", "folders", "guards")
        },
        missing_indexes=[name for name in EXPECTED_INDEXES if name not in present],
    )
    if journal != "wal":
        report.warnings.append(
            f"journal_mode is {journal}: readers and the writer block each other; "
            "sessionkeeper sets WAL when it opens the file, so something else changed it"
        )
    if synchronous == "off":
        report.warnings.append(
            "synchronous is off: a crash of the machine can lose or corrupt committed "
            "writes; set SESSIONKEEPER_SQLITE_SYNCHRONOUS=normal (or full)"
        )
    for name in report.missing_indexes:
        report.warnings.append(
            f"index {name} is missing: the queries it serves scan the table; recreate it "
            "(CREATE INDEX as in sessionkeeper's schema) or restore from a backup"
        )
    if report.schema_version is not None and report.schema_version >= 3:
        missing = [name for name in EXPECTED_TRIGGERS if name not in triggers]
        if not has_totals:
            report.warnings.append(
                "table totals is missing: stats fail; restore from a backup (the table and "
                "its triggers come from schema version 3)"
            )
        elif missing:
            report.warnings.append(
                f"trigger(s) {', '.join(missing)} of the totals table are missing: stats "
                "drift from the sessions with every write; recreate them (CREATE TRIGGER as "
                "in sessionkeeper's schema), then run check --repair to rebuild the totals"
            )
    if report.schema_version != SCHEMA_VERSION:
        report.warnings.append(
            f"schema version {report.schema_version}, this sessionkeeper expects "
            f"{SCHEMA_VERSION}: open the store once with this version to upgrade it"
        )
    return report
