"""The PostgreSQL engine: one schema of tables, reached through an asyncpg pool.

Every hook is one statement where one suffices (an append is one UPDATE ... INSERT CTE, a
read one SELECT, followed by an UPDATE only when it renews an idle session), and one
transaction where it must read before it writes (a change locks its row with
``SELECT ... FOR UPDATE`` and applies ``rules.apply_change`` in Python). Row locks
serialise writers of one session across processes; the schema is created and upgraded by
versioned migrations under an advisory lock. Every driver, socket and timeout error
leaves as BackendUnavailable.

The hot calls are batched: appends, and message reads, that arrive in one event-loop turn
share one statement (so one round trip and, for appends, one commit), each with its own
result; an append that the batch could not write (its session absent, at another version,
or locked by another writer) runs again on its own, which says why or waits its turn.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg

from .. import rules
from ..errors import AlreadyExists, BackendUnavailable, InvalidInput, NotFound, VersionConflict
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
from .base import Engine, Tally, has_gap, tally_differs, totals_differing
from .turns import Turns, Waiting

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

__all__ = [
    "DEFAULT_SCHEMA",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostgresEngine",
    "list_sql",
    "migrate",
    "stats_sql",
]

T = TypeVar("T")
J = TypeVar("J", bound="_Job")
log = logging.getLogger("sessionkeeper")

DEFAULT_SCHEMA = "sessionkeeper"
# Unquoted-style names only, so a name can never break out of its quotes; PostgreSQL
# reserves the pg_ prefix and cuts identifiers at 63 bytes.
_SCHEMA_NAME = re.compile(r"(?!pg_)[A-Za-z_][A-Za-z0-9_]{0,62}", re.ASCII | re.IGNORECASE)
# Connection options asyncpg reads from a URL; it would send any other one to the server
# as a setting, so a typo would fail late and obscurely. Ours are schema and durable.
_DRIVER_OPTIONS = frozenset(
    {
        "application_name",
        "dbname",
        "database",
        "gsslib",
        "host",
        "krbsrvname",
        "passfile",
        "password",
        "port",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcrl",
        "sslkey",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "target_session_attrs",
        "user",
    }
)
_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# Server errors that say the connection itself is gone (classes 08 and 57).
_CONNECTION_LOST = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)
_DEADLOCK_RETRIES = 3
_GUARD_ATTEMPTS = 10_000  # compare-and-set rounds before a guard update gives up
_IDLE_IN_TRANSACTION = 5  # server_timeouts a transaction may wait for its client

# Statements take the schema's quoted name as {s}. Every text column that is compared or
# sorted is COLLATE "C": code-point order, as the other engines sort, whatever the
# database's locale. State and session metadata are jsonb; message content and metadata
# are text, stored and returned byte for byte (the hot path parses no JSON).
# What one statement on sessions adds to each key and shard of the totals: the rows it
# inserted count in, those it deleted count out, and a row it updated counts out as it was
# and in as it is, when a counted column or the key moved. One upsert per key and shard,
# in key order; then the rows that lost their last session go. Part of migration 5 (the
# function it creates): a change here is a new migration, never an edit of these strings.
_TOTALS_DELTA = (
    "SELECT {side}tenant, coalesce({side}owner, '') AS owner_key, {side}status, "
    "{side}pk % 8 AS shard, {sign}1 AS sessions, {sign}{side}message_count AS messages, "
    "{sign}{side}input_tokens AS input_tokens, {sign}{side}output_tokens AS output_tokens, "
    "{sign}{side}cost AS cost FROM {rows}"
)
_TOTALS_MOVED = (
    "new_rows n JOIN old_rows o ON o.pk = n.pk WHERE (n.tenant, n.owner, n.status, "
    "n.message_count, n.input_tokens, n.output_tokens, n.cost) IS DISTINCT FROM (o.tenant, "
    "o.owner, o.status, o.message_count, o.input_tokens, o.output_tokens, o.cost)"
)
_TOTALS_UPSERT = """WITH written AS (
                INSERT INTO {s}.totals AS t
                SELECT tenant, owner_key, status, shard, sum(sessions), sum(messages),
                    sum(input_tokens), sum(output_tokens), sum(cost) FROM (@DELTAS@) d
                GROUP BY tenant, owner_key, status, shard
                HAVING sum(sessions) <> 0 OR sum(messages) <> 0 OR sum(input_tokens) <> 0
                    OR sum(output_tokens) <> 0 OR sum(cost) <> 0
                ORDER BY tenant, owner_key, status, shard
                ON CONFLICT (tenant, owner_key, status, shard) DO UPDATE SET
                    sessions = t.sessions + excluded.sessions,
                    messages = t.messages + excluded.messages,
                    input_tokens = t.input_tokens + excluded.input_tokens,
                    output_tokens = t.output_tokens + excluded.output_tokens,
                    cost = t.cost + excluded.cost
                RETURNING t.sessions)
            SELECT count(*) FILTER (WHERE sessions = 0) INTO emptied FROM written;"""


def _totals_delta(side: str, sign: str, rows: str) -> str:
    return _TOTALS_DELTA.replace("{side}", side).replace("{sign}", sign).replace("{rows}", rows)


_TOTALS_TRACK = (
    """CREATE FUNCTION {s}.totals_track() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            emptied bigint;
        BEGIN
            IF TG_OP = 'INSERT' THEN
            """
    + _TOTALS_UPSERT.replace("@DELTAS@", _totals_delta("", "", "new_rows"))
    + """
            ELSIF TG_OP = 'DELETE' THEN
            """
    + _TOTALS_UPSERT.replace("@DELTAS@", _totals_delta("", "-", "old_rows"))
    + """
            ELSE
            """
    + _TOTALS_UPSERT.replace(
        "@DELTAS@",
        f"{_totals_delta('n.', '', _TOTALS_MOVED)} UNION ALL "
        f"{_totals_delta('o.', '-', _TOTALS_MOVED)}",
    )
    + """
            END IF;
            IF emptied > 0 AND TG_OP <> 'INSERT' THEN
                DELETE FROM {s}.totals t WHERE t.sessions = 0
                    AND (t.tenant, t.owner_key, t.status, t.shard) IN (SELECT tenant,
                    coalesce(owner, ''), status, pk % 8 FROM old_rows);
            END IF;
            RETURN NULL;
        END
        $$"""
)
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE {s}.sessions (
            pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant text COLLATE "C" NOT NULL,
            id text COLLATE "C" NOT NULL,
            owner text COLLATE "C",
            folder text COLLATE "C",
            title text COLLATE "C" NOT NULL,
            status text COLLATE "C" NOT NULL,
            step text COLLATE "C",
            metadata jsonb NOT NULL,
            version bigint NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            expires_at double precision,
            idle_ttl double precision,
            deadline double precision,
            message_count bigint NOT NULL,
            last_seq bigint NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            cost double precision NOT NULL
        )""",
        "CREATE UNIQUE INDEX sessions_by_id ON {s}.sessions (tenant, id)",
        "CREATE INDEX sessions_by_created ON {s}.sessions (tenant, created_at, id)",
        "CREATE INDEX sessions_by_updated ON {s}.sessions (tenant, updated_at, id)",
        # Owners and folders are indexed with '' for none (the store accepts no empty owner
        # or folder id): "= ''" fixes the column for the planner where "IS NULL" does not,
        # so a listing of sessions without one still reads its index in order.
        "CREATE INDEX sessions_by_owner_created "
        "ON {s}.sessions (tenant, coalesce(owner, ''), created_at, id)",
        "CREATE INDEX sessions_by_owner_updated "
        "ON {s}.sessions (tenant, coalesce(owner, ''), updated_at, id)",
        "CREATE INDEX sessions_by_folder "
        "ON {s}.sessions (tenant, coalesce(folder, ''), created_at, id)",
        "CREATE INDEX sessions_by_status ON {s}.sessions (tenant, status, created_at, id)",
        "CREATE INDEX sessions_by_expiry ON {s}.sessions (expires_at) WHERE expires_at IS NOT NULL",
        # State lives apart so that appends and listings never read or rewrite it.
        "CREATE TABLE {s}.states (session_pk bigint PRIMARY KEY, state jsonb NOT NULL)",
        """CREATE TABLE {s}.messages (
            session_pk bigint NOT NULL,
            seq bigint NOT NULL,
            role text NOT NULL,
            content text NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            cost double precision NOT NULL,
            metadata text NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (session_pk, seq)
        )""",
        """CREATE TABLE {s}.folders (
            tenant text COLLATE "C" NOT NULL,
            id text COLLATE "C" NOT NULL,
            owner text COLLATE "C",
            name text COLLATE "C" NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (tenant, id)
        )""",
        "CREATE UNIQUE INDEX folders_by_name ON {s}.folders (tenant, coalesce(owner, ''), name)",
    ),
    # A tenant's purge (the store's default) goes straight to that tenant's expired
    # sessions instead of walking past every other tenant's.
    2: (
        "CREATE INDEX sessions_by_tenant_expiry ON {s}.sessions (tenant, expires_at) "
        "WHERE expires_at IS NOT NULL",
    ),
    # Appends become HOT updates. Every append moves updated_at, which two indexes of
    # sessions held, so each one wrote a new entry into all of its indexes. The keys of the
    # listings by last activity now live in a narrow table of their own, kept in step by
    # every statement that moves updated_at or the owner; sessions keeps updated_at (for
    # its records, unindexed) and room on its pages for the new row versions.
    3: (
        """CREATE TABLE {s}.activity (
            session_pk bigint PRIMARY KEY,
            tenant text COLLATE "C" NOT NULL,
            owner_key text COLLATE "C" NOT NULL,
            id text COLLATE "C" NOT NULL,
            updated_at double precision NOT NULL
        )""",
        "INSERT INTO {s}.activity SELECT pk, tenant, coalesce(owner, ''), id, updated_at "
        "FROM {s}.sessions",
        "CREATE INDEX activity_by_updated ON {s}.activity (tenant, updated_at, id)",
        "CREATE INDEX activity_by_owner_updated "
        "ON {s}.activity (tenant, owner_key, updated_at, id)",
        "DROP INDEX {s}.sessions_by_updated",
        "DROP INDEX {s}.sessions_by_owner_updated",
        "ALTER TABLE {s}.sessions SET (fillfactor = 75)",
    ),
    # Guards: rate-limit logs, failed-login records and budget usage, one row per key.
    4: (
        """CREATE TABLE {s}.guards (
            tenant text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            value text NOT NULL,
            expires_at double precision,
            PRIMARY KEY (tenant, key)
        )""",
        "CREATE INDEX guards_by_expiry ON {s}.guards (expires_at) WHERE expires_at IS NOT NULL",
    ),
    # Stats without reading every session: per (tenant, owner, status) totals, kept by
    # statement triggers (so every write path keeps them, repair and load included) and
    # read with a correction for the expired sessions purge has not removed yet. '' is the
    # key of no owner (rules.check_id refuses an empty id). Each key is spread over
    # _TOTALS_SHARDS rows by the session's pk, so concurrent appends of one owner's
    # sessions seldom wait for one row lock; a trigger writes one row per key and shard
    # of its whole statement, in key order, so two statements never lock in opposite
    # orders. A shard whose last session leaves is deleted.
    5: (
        """CREATE TABLE {s}.totals (
            tenant text COLLATE "C" NOT NULL,
            owner_key text COLLATE "C" NOT NULL,
            status text COLLATE "C" NOT NULL,
            shard smallint NOT NULL,
            sessions bigint NOT NULL,
            messages bigint NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            cost double precision NOT NULL,
            PRIMARY KEY (tenant, owner_key, status, shard)
        )""",
        "INSERT INTO {s}.totals SELECT tenant, coalesce(owner, ''), status, pk % 8, count(*), "
        "sum(message_count), sum(input_tokens), sum(output_tokens), sum(cost) "
        "FROM {s}.sessions GROUP BY 1, 2, 3, 4",
        _TOTALS_TRACK,
        "CREATE TRIGGER totals_insert AFTER INSERT ON {s}.sessions "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.totals_track()",
        "CREATE TRIGGER totals_update AFTER UPDATE ON {s}.sessions "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION {s}.totals_track()",
        "CREATE TRIGGER totals_delete AFTER DELETE ON {s}.sessions "
        "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.totals_track()",
    ),
    # Analytics: counters per tenant, UTC day and owner ('' for none), added to by
    # add_daily in key order; a month of figures reads a month of rows.
    6: (
        """CREATE TABLE {s}.daily (
            tenant text COLLATE "C" NOT NULL,
            day integer NOT NULL,
            owner_key text COLLATE "C" NOT NULL,
            created bigint NOT NULL,
            completed bigint NOT NULL,
            completed_messages bigint NOT NULL,
            messages bigint NOT NULL,
            input_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            cost double precision NOT NULL,
            PRIMARY KEY (tenant, day, owner_key)
        )""",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


# The indexes the migrations leave, which doctor looks for in the catalog.
def _index_names(pattern: str) -> list[str]:
    statements = (statement for group in MIGRATIONS.values() for statement in group)
    return [found[1] for statement in statements if (found := re.match(pattern, statement))]


# The triggers on sessions that keep the totals stats read, which doctor looks for.
_TOTALS_TRIGGERS = ("totals_insert", "totals_update", "totals_delete")
_DROPPED_INDEXES = set(_index_names(r"DROP INDEX \{s\}\.(\w+)"))
EXPECTED_INDEXES = tuple(
    name for name in _index_names(r"CREATE (?:UNIQUE )?INDEX (\w+)") if name not in _DROPPED_INDEXES
)
_CHECK_BATCH = 500
_TALLY = (
    "count(*), coalesce(sum(input_tokens), 0)::bigint, coalesce(sum(output_tokens), 0)::bigint, "
    "coalesce(sum(cost), 0.0), coalesce(min(seq), 0), coalesce(max(seq), 0)"
)

# What the sessions add up to, per totals key: check compares it with the totals (summed
# over shards), and repair writes it back, by shard.
_TOTALS_OF_SESSIONS = (
    "SELECT tenant, coalesce(owner, ''), status, count(*), sum(message_count)::bigint, "
    "sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cost) "
    "FROM {s}.sessions{where} GROUP BY 1, 2, 3"
)
_TOTALS_REBUILD = (
    "SELECT tenant, coalesce(owner, ''), status, pk % 8, count(*), sum(message_count), "
    "sum(input_tokens), sum(output_tokens), sum(cost) FROM {s}.sessions WHERE tenant = $1 "
    "GROUP BY 1, 2, 3, 4"
)
_LIVE = "(s.expires_at IS NULL OR s.expires_at > {now})"
# rules.renewed_expiry in SQL. LEAST and GREATEST skip NULLs, so a NULL deadline or
# expires_at drops out exactly as the rule skips None; callers apply it only where
# idle_ttl IS NOT NULL, where the rule moves the expiry at all.
_RENEWED = "LEAST(deadline, GREATEST(expires_at, {now} + idle_ttl))"
_RECORD = (
    "s.tenant, s.id, s.owner, s.folder, s.title, s.status, s.step, s.metadata, {state}, "
    "s.version, s.created_at, s.updated_at, {expires_at}, s.idle_ttl, s.deadline, "
    "s.message_count, s.last_seq, s.input_tokens, s.output_tokens, s.cost"
)
_PLAIN_RECORD = _RECORD.format(state="NULL", expires_at="s.expires_at")
_MESSAGE = "seq, role, content, input_tokens, output_tokens, cost, metadata, created_at"
_MESSAGE_ARRAYS = (
    "$%d::text[], $%d::text[], $%d::bigint[], $%d::bigint[], $%d::float8[], $%d::text[]"
)
# The live session a hook is about: $1 tenant, $2 id, $3 now.
_ONE_LIVE = f"s.tenant = $1 AND s.id = $2 AND {_LIVE.format(now='$3')}"
# A read's messages come with the session's expiry, so that only a read of an idle
# session needs a second statement: the UPDATE that renews it.
_MESSAGES_OF_LIVE = (
    f"SELECT s.expires_at, s.idle_ttl, s.deadline, m.seq, m.role, m.content, m.input_tokens, "
    f"m.output_tokens, m.cost, m.metadata, m.created_at FROM {{s}}.sessions s "
    f"LEFT JOIN LATERAL (SELECT {_MESSAGE} FROM {{s}}.messages "
    "WHERE session_pk = s.pk {range}) m ON true "
    f"WHERE {_ONE_LIVE} ORDER BY m.seq"
)
# An append moves these columns only (state is elsewhere), none of them indexed unless an
# idle expiry moves (a HOT update), and takes the row lock that orders concurrent
# appenders: each numbers its messages after the last_seq the one before it left. Its
# activity row follows; that row is only ever written under its session's row lock.
_APPEND = (
    "WITH s AS (UPDATE {s}.sessions SET version = version + 1, updated_at = $3, "
    "message_count = message_count + $4, last_seq = last_seq + $4, "
    "input_tokens = input_tokens + $5, output_tokens = output_tokens + $6, cost = cost + $7, "
    "expires_at = CASE WHEN idle_ttl IS NULL THEN expires_at "
    f"ELSE {_RENEWED.format(now='$3')} END "
    "WHERE tenant = $1 AND id = $2 AND (expires_at IS NULL OR expires_at > $3) "
    "AND ($8::bigint IS NULL OR version = $8) RETURNING pk, last_seq), "
    "a AS (UPDATE {s}.activity a SET updated_at = $3 FROM s WHERE a.session_pk = s.pk), "
    "m AS (INSERT INTO {s}.messages (session_pk, seq, role, content, input_tokens, "
    "output_tokens, cost, metadata, created_at) {messages}) "
    "SELECT last_seq FROM s"
)
_READ_BATCH = (
    "SELECT j.n, s.expires_at, s.idle_ttl, s.deadline, m.seq, m.role, m.content, "
    "m.input_tokens, m.output_tokens, m.cost, m.metadata, m.created_at "
    "FROM unnest($1::text[], $2::text[], $3::float8[], $4::bigint[]{arrays}) WITH ORDINALITY "
    "AS j(tenant, id, now, n_limit, {after}n) "
    "CROSS JOIN LATERAL (SELECT pk, expires_at, idle_ttl, deadline FROM {s}.sessions "
    "WHERE tenant = j.tenant AND id = j.id AND (expires_at IS NULL OR expires_at > j.now) "
    "LIMIT 1) s "
    f"LEFT JOIN LATERAL (SELECT {_MESSAGE} FROM {{s}}.messages "
    "WHERE session_pk = s.pk {range}) m ON true ORDER BY j.n, m.seq"
)
_FOLDER = (
    "SELECT f.tenant, f.id, f.owner, f.name, f.created_at, (SELECT count(*) FROM {s}.sessions s "
    f"WHERE s.tenant = f.tenant AND coalesce(s.folder, '') = f.id AND {_LIVE.format(now='$1')}) "
    "FROM {s}.folders f"
)
# Every write of a locked session moves its activity row with it (an owner may change).
_SAVE_ACTIVITY = (
    "a AS (UPDATE {s}.activity SET owner_key = coalesce($2::text, ''), updated_at = $9 "
    "WHERE session_pk = $1)"
)
_SAVE = (
    "UPDATE {s}.sessions SET owner = $2, folder = $3, title = $4, status = $5, step = $6, "
    "metadata = $7, version = $8, updated_at = $9, expires_at = $10, message_count = $11, "
    "last_seq = $12, input_tokens = $13, output_tokens = $14, cost = $15 WHERE pk = $1"
)

_DAILY_COLUMNS = ", ".join(DAILY_COUNTERS)
_STATEMENTS: dict[str, str] = {
    # one row per (day, owner) of the flush, sorted, so two flushes lock in one order
    "add_daily": (
        f"INSERT INTO {{s}}.daily (tenant, day, owner_key, {_DAILY_COLUMNS}) "
        f"SELECT $1::text, u.* FROM unnest($2::integer[], $3::text[], $4::bigint[], "
        "$5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], "
        "$10::float8[]) AS u ORDER BY 2, 3 "
        "ON CONFLICT (tenant, day, owner_key) DO UPDATE SET "
        + ", ".join(f"{name} = daily.{name} + excluded.{name}" for name in DAILY_COUNTERS)
    ),
    "set_daily": (
        f"INSERT INTO {{s}}.daily (tenant, day, owner_key, {_DAILY_COLUMNS}) "
        f"SELECT $1::text, u.* FROM unnest($2::integer[], $3::text[], $4::bigint[], "
        "$5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], "
        "$10::float8[]) AS u ORDER BY 2, 3 "
        "ON CONFLICT (tenant, day, owner_key) DO UPDATE SET "
        + ", ".join(f"{name} = excluded.{name}" for name in DAILY_COUNTERS)
    ),
    # summed per period here ($5: 'day', 'week' or 'month'): a year by month is 12 rows
    # an owner, not 365
    "read_daily": (
        "SELECT CASE $5::text WHEN 'day' THEN day ELSE "
        "date_trunc($5::text, DATE '1970-01-01' + day)::date - DATE '1970-01-01' END AS p, "
        "owner_key, "
        + ", ".join(
            f"sum({name})::{'float8' if name == 'cost' else 'bigint'}" for name in DAILY_COUNTERS
        )
        + " FROM {s}.daily "
        "WHERE tenant = $1 AND day BETWEEN $2 AND $3 AND ($4::text IS NULL OR owner_key = $4) "
        "GROUP BY p, owner_key"
    ),
    "session_owners": (
        "SELECT id, owner FROM {s}.sessions WHERE tenant = $1 AND id = ANY($2::text[])"
    ),
    "insert": (
        "WITH s AS (INSERT INTO {s}.sessions (tenant, id, owner, folder, title, status, step, "
        "metadata, version, created_at, updated_at, expires_at, idle_ttl, deadline, "
        "message_count, last_seq, input_tokens, output_tokens, cost) "
        "SELECT $1, $2, $3, $4::text, $5, $6, $7::text, $8::jsonb, $9::bigint, $10::float8, "
        "$11::float8, $12::float8, $13::float8, $14::float8, $15::bigint, $16::bigint, "
        "$17::bigint, $18::bigint, $19::float8 "
        # The folder row is share-locked, so it cannot be deleted before this commits.
        "WHERE $4::text IS NULL OR EXISTS (SELECT 1 FROM {s}.folders f WHERE f.tenant = $1 "
        "AND f.id = $4 AND f.owner IS NOT DISTINCT FROM $3 FOR KEY SHARE) RETURNING pk), "
        "a AS (INSERT INTO {s}.activity (session_pk, tenant, owner_key, id, updated_at) "
        "SELECT pk, $1::text, coalesce($3::text, ''), $2::text, $11::float8 FROM s) "
        "INSERT INTO {s}.states (session_pk, state) SELECT pk, $20::jsonb FROM s "
        "RETURNING session_pk"
    ),
    "find": "SELECT pk, version, expires_at FROM {s}.sessions WHERE tenant = $1 AND id = $2",
    "lock_id": "SELECT pk, expires_at FROM {s}.sessions WHERE tenant = $1 AND id = $2 FOR UPDATE",
    "lock": f"SELECT s.pk, {_PLAIN_RECORD} FROM {{s}}.sessions s WHERE {_ONE_LIVE} FOR UPDATE",
    "lock_with_state": (
        f"SELECT s.pk, {_RECORD.format(state='st.state', expires_at='s.expires_at')} "
        f"FROM {{s}}.sessions s JOIN {{s}}.states st ON st.session_pk = s.pk "
        # Both rows: a state row read but not locked could be a version older than the
        # session row the lock waited for.
        f"WHERE {_ONE_LIVE} FOR UPDATE OF s, st"
    ),
    "get": (
        f"SELECT {_RECORD.format(state='st.state', expires_at='s.expires_at')} "
        "FROM {s}.sessions s JOIN {s}.states st ON st.session_pk = s.pk "
        f"WHERE {_ONE_LIVE}"
    ),
    "renew": (
        f"UPDATE {{s}}.sessions s SET expires_at = {_RENEWED.format(now='$3')} "
        f"WHERE {_ONE_LIVE} AND s.idle_ttl IS NOT NULL RETURNING s.expires_at"
    ),
    "read_after": _MESSAGES_OF_LIVE.replace("{range}", "AND seq > $4 ORDER BY seq LIMIT $5"),
    "read_last": _MESSAGES_OF_LIVE.replace("{range}", "ORDER BY seq DESC LIMIT $4"),
    # One statement per append; one message (the usual case) as plain parameters.
    "append_one": _APPEND.replace(
        "{messages}",
        "SELECT s.pk, s.last_seq, $9::text, $10::text, $11::bigint, $12::bigint, $13::float8, "
        "$14::text, $3 FROM s",
    ),
    "append": _APPEND.replace(
        "{messages}",
        "SELECT s.pk, s.last_seq - $4 + d.n, d.role, d.content, d.input_tokens, "
        "d.output_tokens, d.cost, d.metadata, $3 "
        f"FROM s, unnest({_MESSAGE_ARRAYS % (9, 10, 11, 12, 13, 14)}) WITH ORDINALITY "
        "AS d(role, content, input_tokens, output_tokens, cost, metadata, n)",
    ),
    # Appends to several sessions in one statement (see _append_batch). It never waits for a
    # lock: a job whose session is locked (by another writer of it), absent or at another
    # version is left out of the reply, and its caller appends on its own; so the other
    # jobs never wait behind it, and no two batches can deadlock.
    "append_batch": (
        "WITH l AS MATERIALIZED (SELECT s.pk, j.n, j.now, j.count, j.tokens_in, j.tokens_out, "
        "j.cost FROM unnest($1::text[], $2::text[], $3::float8[], $4::bigint[], $5::bigint[], "
        "$6::bigint[], $7::float8[], $8::bigint[]) WITH ORDINALITY "
        "AS j(tenant, id, now, count, tokens_in, tokens_out, cost, expected, n) "
        "CROSS JOIN LATERAL (SELECT pk FROM {s}.sessions WHERE tenant = j.tenant AND id = j.id "
        "AND (expires_at IS NULL OR expires_at > j.now) "
        "AND (j.expected IS NULL OR version = j.expected) FOR UPDATE SKIP LOCKED) s), "
        "u AS (UPDATE {s}.sessions s SET version = s.version + 1, updated_at = l.now, "
        "message_count = s.message_count + l.count, last_seq = s.last_seq + l.count, "
        "input_tokens = s.input_tokens + l.tokens_in, "
        "output_tokens = s.output_tokens + l.tokens_out, cost = s.cost + l.cost, "
        "expires_at = CASE WHEN s.idle_ttl IS NULL THEN s.expires_at "
        "ELSE LEAST(s.deadline, GREATEST(s.expires_at, l.now + s.idle_ttl)) END "
        # "= ANY": the rows are found on the primary key, whatever the planner thinks of
        # joining a few jobs to the whole table.
        "FROM l WHERE s.pk = l.pk AND s.pk = ANY(ARRAY(SELECT pk FROM l)) "
        "RETURNING s.pk, s.last_seq, l.n, l.count, l.now), "
        "a AS (UPDATE {s}.activity a SET updated_at = l.now FROM l WHERE a.session_pk = l.pk "
        "AND a.session_pk = ANY(ARRAY(SELECT pk FROM l))), "
        "m AS (INSERT INTO {s}.messages (session_pk, seq, role, content, input_tokens, "
        "output_tokens, cost, metadata, created_at) SELECT u.pk, u.last_seq - u.count + d.k, "
        "d.role, d.content, d.input_tokens, d.output_tokens, d.cost, d.metadata, u.now "
        "FROM u JOIN unnest($9::bigint[], $10::bigint[], "
        f"{_MESSAGE_ARRAYS % (11, 12, 13, 14, 15, 16)}) "
        "AS d(n, k, role, content, input_tokens, output_tokens, cost, metadata) ON d.n = u.n) "
        "SELECT n, last_seq FROM u"
    ),
    # Reads of several sessions in one statement (see _ReadBatch): per job, its session's
    # expiry and its messages in range, or no row if the session is absent. LIMIT 1 keeps
    # the session lookup a nested loop over the jobs, on the unique index.
    "read_last_batch": _READ_BATCH.replace("{arrays}", "")
    .replace("{after}", "")
    .replace("{range}", "ORDER BY seq DESC LIMIT j.n_limit"),
    "read_after_batch": _READ_BATCH.replace("{arrays}", ", $5::bigint[]")
    .replace("{after}", "after_seq, ")
    .replace("{range}", "AND seq > j.after_seq ORDER BY seq LIMIT j.n_limit"),
    "save": f"WITH {_SAVE_ACTIVITY} {_SAVE}",
    "save_state": (
        "WITH st AS (UPDATE {s}.states SET state = $16 WHERE session_pk = $1), "
        f"{_SAVE_ACTIVITY} {_SAVE}"
    ),
    "save_messages": (
        "WITH m AS (INSERT INTO {s}.messages (session_pk, seq, role, content, input_tokens, "
        "output_tokens, cost, metadata, created_at) SELECT $1, d.*, $9 FROM unnest($16::bigint[], "
        f"{_MESSAGE_ARRAYS % (17, 18, 19, 20, 21, 22)}) AS d), {_SAVE_ACTIVITY} {_SAVE}"
    ),
    "save_state_messages": (
        "WITH st AS (UPDATE {s}.states SET state = $16 WHERE session_pk = $1), "
        "m AS (INSERT INTO {s}.messages (session_pk, seq, role, content, input_tokens, "
        "output_tokens, cost, metadata, created_at) SELECT $1, d.*, $9 FROM unnest($17::bigint[], "
        f"{_MESSAGE_ARRAYS % (18, 19, 20, 21, 22, 23)}) AS d), {_SAVE_ACTIVITY} {_SAVE}"
    ),
    # Only for rows this transaction has locked: then no append can add a message that
    # the DELETE's snapshot misses.
    "drop": (
        "WITH m AS (DELETE FROM {s}.messages WHERE session_pk = ANY($1::bigint[])), "
        "st AS (DELETE FROM {s}.states WHERE session_pk = ANY($1::bigint[])), "
        "a AS (DELETE FROM {s}.activity WHERE session_pk = ANY($1::bigint[])) "
        "DELETE FROM {s}.sessions WHERE pk = ANY($1::bigint[])"
    ),
    "pop": (
        f"DELETE FROM {{s}}.messages WHERE session_pk = $1 AND seq = (SELECT max(seq) "
        f"FROM {{s}}.messages WHERE session_pk = $1) RETURNING {_MESSAGE}"
    ),
    "clear": "DELETE FROM {s}.messages WHERE session_pk = $1",
    # The tenant's totals (summed over shards), less the expired sessions purge has not
    # removed yet (a range of sessions_by_tenant_expiry); the recently updated from a range
    # of activity_by_updated. One statement, so every figure comes from one snapshot.
    "stats": (
        "WITH t AS MATERIALIZED (SELECT owner_key, status, sessions, messages, input_tokens, "
        "output_tokens, cost FROM {s}.totals WHERE tenant = $1 UNION ALL "
        "SELECT coalesce(owner, ''), status, -1, -message_count, -input_tokens, "
        "-output_tokens, -cost FROM {s}.sessions WHERE tenant = $1 AND expires_at <= $2), "
        "st AS (SELECT status, sum(sessions) AS n, sum(messages) AS m, sum(input_tokens) AS i, "
        "sum(output_tokens) AS o, sum(cost) AS c FROM t GROUP BY status), "
        # An owner none of whose sessions is live has no rank.
        "own AS MATERIALIZED (SELECT owner_key, sum(sessions) AS n, sum(cost) AS c FROM t "
        "GROUP BY owner_key HAVING sum(sessions) > 0), "
        "top_n AS (SELECT owner_key, n FROM own ORDER BY n DESC, owner_key LIMIT $4), "
        "top_c AS (SELECT owner_key, c FROM own ORDER BY c DESC, owner_key LIMIT $4) "
        "SELECT coalesce((SELECT sum(n) FROM st), 0)::bigint, "
        "coalesce((SELECT n FROM st WHERE status = 'active'), 0)::bigint, "
        "coalesce((SELECT n FROM st WHERE status = 'completed'), 0)::bigint, "
        "coalesce((SELECT n FROM st WHERE status = 'archived'), 0)::bigint, "
        # LIMIT 1: one lookup by pk per recent session, never a scan of sessions to join.
        "(SELECT count(*) FROM {s}.activity a CROSS JOIN LATERAL (SELECT 1 FROM {s}.sessions s "
        f"WHERE s.pk = a.session_pk AND {_LIVE.format(now='$2')} LIMIT 1) s "
        "WHERE a.tenant = $1 AND a.updated_at >= $3), "
        "coalesce((SELECT sum(m) FROM st), 0)::bigint, "
        "coalesce((SELECT sum(i) FROM st), 0)::bigint, "
        "coalesce((SELECT sum(o) FROM st), 0)::bigint, "
        "coalesce((SELECT sum(c) FROM st), 0)::float8, "
        "(SELECT array_agg(nullif(owner_key, '') ORDER BY n DESC, owner_key) FROM top_n), "
        "(SELECT array_agg(n::bigint ORDER BY n DESC, owner_key) FROM top_n), "
        "(SELECT array_agg(nullif(owner_key, '') ORDER BY c DESC, owner_key) FROM top_c), "
        "(SELECT array_agg(c::float8 ORDER BY c DESC, owner_key) FROM top_c)"
    ),
    "insert_folder": "INSERT INTO {s}.folders VALUES ($1, $2, $3, $4, $5)",
    "get_folder": f"{_FOLDER} WHERE f.tenant = $2 AND f.id = $3",
    "list_folders": f"{_FOLDER} WHERE f.tenant = $2 ORDER BY coalesce(f.owner, ''), f.name",
    # An owner is never '' (the store refuses it), so '' stands for "no owner" and the
    # folders_by_name index serves the filter.
    "list_owner_folders": (
        f"{_FOLDER} WHERE f.tenant = $2 AND coalesce(f.owner, '') = $3 "
        "ORDER BY coalesce(f.owner, ''), f.name"
    ),
    "rename_folder": (
        "WITH f AS (UPDATE {s}.folders SET name = $4 WHERE tenant = $2 AND id = $3 "
        "RETURNING tenant, id, owner, name, created_at) "
        "SELECT f.*, (SELECT count(*) FROM {s}.sessions s WHERE s.tenant = f.tenant "
        f"AND coalesce(s.folder, '') = f.id AND {_LIVE.format(now='$1')}) FROM f"
    ),
    "check_folder": (
        "SELECT 1 FROM {s}.folders WHERE tenant = $1 AND id = $2 "
        "AND owner IS NOT DISTINCT FROM $3 FOR KEY SHARE"
    ),
    "delete_folder": "DELETE FROM {s}.folders WHERE tenant = $1 AND id = $2 RETURNING owner",
    "lock_folder_sessions": (
        "SELECT pk, expires_at FROM {s}.sessions WHERE tenant = $1 AND coalesce(folder, '') = $2 "
        "FOR UPDATE"
    ),
    "move_folder_sessions": (
        "WITH u AS (UPDATE {s}.sessions SET folder = $3, version = version + 1, updated_at = $4 "
        "WHERE tenant = $1 AND coalesce(folder, '') = $2 RETURNING pk, expires_at), "
        "a AS (UPDATE {s}.activity a SET updated_at = $4 FROM u WHERE a.session_pk = u.pk) "
        "SELECT count(*) FROM u WHERE expires_at IS NULL OR expires_at > $4"
    ),
    # Transfer. Nothing here renews idle expiry: an export never changes its source.
    "list_tenants": (
        f"SELECT DISTINCT s.tenant FROM {{s}}.sessions s WHERE {_LIVE.format(now='$1')} "
        "UNION SELECT tenant FROM {s}.folders ORDER BY 1"
    ),
    # One statement, so the session, its state and its messages come from one snapshot; the
    # messages as one array per column, so the session's columns are sent once.
    "export": (
        f"SELECT {_RECORD.format(state='st.state', expires_at='s.expires_at')}, "
        "m.seqs, m.roles, m.contents, m.inputs, m.outputs, m.costs, m.metadatas, m.times "
        "FROM {s}.sessions s JOIN {s}.states st ON st.session_pk = s.pk "
        "CROSS JOIN LATERAL (SELECT array_agg(seq ORDER BY seq) AS seqs, "
        "array_agg(role ORDER BY seq) AS roles, array_agg(content ORDER BY seq) AS contents, "
        "array_agg(input_tokens ORDER BY seq) AS inputs, "
        "array_agg(output_tokens ORDER BY seq) AS outputs, "
        "array_agg(cost ORDER BY seq) AS costs, array_agg(metadata ORDER BY seq) AS metadatas, "
        "array_agg(created_at ORDER BY seq) AS times "
        f"FROM {{s}}.messages WHERE session_pk = s.pk) m WHERE {_ONE_LIVE}"
    ),
    # A session with its state and messages, as given; nothing if its folder is not its
    # owner's (share-locked, as insert does).
    "load": (
        "WITH s AS (INSERT INTO {s}.sessions (tenant, id, owner, folder, title, status, step, "
        "metadata, version, created_at, updated_at, expires_at, idle_ttl, deadline, "
        "message_count, last_seq, input_tokens, output_tokens, cost) "
        "SELECT $1, $2, $3, $4::text, $5, $6, $7::text, $8::jsonb, $9::bigint, $10::float8, "
        "$11::float8, $12::float8, $13::float8, $14::float8, $15::bigint, $16::bigint, "
        "$17::bigint, $18::bigint, $19::float8 "
        "WHERE $4::text IS NULL OR EXISTS (SELECT 1 FROM {s}.folders f WHERE f.tenant = $1 "
        "AND f.id = $4 AND f.owner IS NOT DISTINCT FROM $3 FOR KEY SHARE) RETURNING pk), "
        "a AS (INSERT INTO {s}.activity (session_pk, tenant, owner_key, id, updated_at) "
        "SELECT pk, $1::text, coalesce($3::text, ''), $2::text, $11::float8 FROM s), "
        "st AS (INSERT INTO {s}.states (session_pk, state) SELECT pk, $20::jsonb FROM s), "
        "m AS (INSERT INTO {s}.messages (session_pk, seq, role, content, input_tokens, "
        "output_tokens, cost, metadata, created_at) SELECT s.pk, d.* FROM s, "
        f"unnest($21::bigint[], {_MESSAGE_ARRAYS % (22, 23, 24, 25, 26, 27)}, $28::float8[]) "
        "AS d) SELECT pk FROM s"
    ),
    # Replace is a flag, so one prepared statement serves both: a kept folder is locked
    # but not written, and returns nothing.
    "load_folder": (
        "INSERT INTO {s}.folders VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, id) "
        "DO UPDATE SET owner = excluded.owner, name = excluded.name, "
        "created_at = excluded.created_at WHERE $6::boolean RETURNING 1"
    ),
    # The queue pattern: sessions another purger (or a writer) holds are skipped.
    "lock_expired": (
        "SELECT pk, tenant, id FROM {s}.sessions WHERE expires_at <= $1 LIMIT $2 "
        "FOR UPDATE SKIP LOCKED"
    ),
    # Guards change by compare-and-set: read, compute, then write only if the row still
    # holds what was read (two autocommit statements; a lost race reads again).
    "read_guard": "SELECT value, expires_at FROM {s}.guards WHERE tenant = $1 AND key = $2",
    "new_guard": (
        "INSERT INTO {s}.guards VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, key) DO NOTHING "
        "RETURNING 1"
    ),
    "swap_guard": (
        "UPDATE {s}.guards SET value = $3, expires_at = $4 "
        "WHERE tenant = $1 AND key = $2 AND value = $5 RETURNING 1"
    ),
    "drop_guard": (
        "DELETE FROM {s}.guards WHERE tenant = $1 AND key = $2 AND value = $3 RETURNING 1"
    ),
    "get_guard": (
        "SELECT value FROM {s}.guards WHERE tenant = $1 AND key = $2 "
        "AND (expires_at IS NULL OR expires_at > $3)"
    ),
    "list_guards": (
        "SELECT key, value, expires_at FROM {s}.guards WHERE tenant = $1 AND key >= $2 "
        "AND left(key, char_length($2)) = $2 AND (expires_at IS NULL OR expires_at > $3) "
        "ORDER BY key"
    ),
    "purge_guards": (
        "DELETE FROM {s}.guards WHERE ctid = ANY(ARRAY(SELECT ctid FROM {s}.guards "
        "WHERE expires_at <= $1 AND ($3::text IS NULL OR tenant = $3) LIMIT $2 "
        "FOR UPDATE SKIP LOCKED))"
    ),
    "lock_expired_of_tenant": (
        "SELECT pk, tenant, id FROM {s}.sessions WHERE expires_at <= $1 AND tenant = $3 "
        "LIMIT $2 FOR UPDATE SKIP LOCKED"
    ),
}


def stats_sql(schema: str) -> str:
    """The statement stats run ($1 tenant, $2 now, $3 since, $4 top); public so tests can
    check its plan."""
    return _STATEMENTS["stats"].replace("{s}", _quote(schema))


class _Taken(Exception):
    """A session with the id was created while a load was writing it: load again."""


def _quote(schema: str) -> str:
    return f'"{schema}"'


def _message_arrays(drafts: Sequence[MessageDraft | MessageRecord]) -> list[list[Any]]:
    return [
        [d.role for d in drafts],
        [d.content for d in drafts],
        [d.input_tokens for d in drafts],
        [d.output_tokens for d in drafts],
        [d.cost for d in drafts],
        [d.metadata for d in drafts],
    ]


def _insert_args(r: SessionRecord) -> tuple[Any, ...]:
    return (
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
        r.state,
    )


def _session(row: asyncpg.Record) -> tuple[int, SessionRecord]:
    """A ``(pk, record)`` from a row that starts with the pk."""
    return row[0], SessionRecord(*row[1:])


def _unstorable(state: str | None, metadata: str) -> InvalidInput:
    """The error for JSON that jsonb refuses: a string holding U+0000."""
    field = "state" if state is not None and "\\u0000" in state else "metadata"
    return InvalidInput(field, "PostgreSQL (jsonb) cannot store \\u0000 in a string")


async def _keep_session_state(conn: object) -> None:
    """The pool's reset hook: the engine never changes session state (no SET, LISTEN,
    cursors or session-level locks), so a released connection needs no reset query: one
    round trip less per call. asyncpg still rolls back a transaction left open."""


class _Acquire:
    """``async with``: a pooled connection within ``timeout``, released on leaving.

    While a connection is idle its holder is in the pool's queue, so acquiring takes one
    without waiting; the only wait left is a reconnect (of an expired or dropped
    connection), which the pool's connect timeout bounds. Only when every connection is
    busy does the wait for one need a timeout of its own, and ``asyncio.timeout`` is a
    timer where ``acquire(timeout=...)`` is a task (``asyncio.wait_for``), whose CPU cost
    was more than a tenth of an append's Python."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def __aenter__(self) -> Connection:
        if self._pool.get_idle_size():
            self._conn = await self._pool.acquire()
        else:
            async with asyncio.timeout(self._timeout):
                self._conn = await self._pool.acquire()
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pool.release(self._conn)


class _Job(Waiting):
    """A call of one session waiting for its batch."""

    __slots__ = ("now", "session_id", "tenant")

    def __init__(self, tenant: str, session_id: str, now: float) -> None:
        super().__init__()
        self.tenant = tenant
        self.session_id = session_id
        self.now = now

    @property
    def size(self) -> int:
        return 1


class _AppendJob(_Job):
    """An append: ``future`` gets the session's last_seq after it, or None if nothing was
    written (the session is absent or at another version)."""

    __slots__ = ("cost", "expected", "messages", "tokens_in", "tokens_out")

    def __init__(
        self,
        tenant: str,
        session_id: str,
        now: float,
        messages: list[MessageDraft],
        expected: int | None,
    ) -> None:
        super().__init__(tenant, session_id, now)
        self.messages = messages
        self.expected = expected
        self.tokens_in = self.tokens_out = 0
        self.cost = 0.0
        for draft in messages:
            self.tokens_in += draft.input_tokens
            self.tokens_out += draft.output_tokens
            self.cost += draft.cost

    @property
    def size(self) -> int:
        return len(self.messages)


class _ReadJob(_Job):
    """A read of messages: ``future`` gets ``(expires_at, idle_ttl, deadline, messages)``
    of the live session, or None if it is absent. ``after_seq`` None reads the newest."""

    __slots__ = ("after_seq", "limit")

    def __init__(
        self, tenant: str, session_id: str, now: float, limit: int, after_seq: int | None
    ) -> None:
        super().__init__(tenant, session_id, now)
        self.limit = limit
        self.after_seq = after_seq

    @property
    def size(self) -> int:
        return self.limit


def _rounds(jobs: list[J]) -> list[list[J]]:
    """The jobs in rounds that each hold at most one job per session, in arrival order: a
    session's second job in a batch waits for the round after its first."""
    rounds: list[list[J]] = []
    seen: dict[tuple[str, str], int] = {}
    for job in jobs:
        key = (job.tenant, job.session_id)
        i = seen.get(key, 0)
        seen[key] = i + 1
        if i == len(rounds):
            rounds.append([])
        rounds[i].append(job)
    return rounds


async def migrate(conn: Connection, schema: str, target: int = SCHEMA_VERSION) -> None:
    """Create ``schema`` if needed and bring it up to ``target`` in one transaction.

    An advisory lock keyed on the schema makes processes that open it at once take turns.
    A schema newer than this code knows raises BackendUnavailable. Tests pass an older
    ``target`` to build the schema of an earlier release.
    """
    s = _quote(schema)
    key = int.from_bytes(hashlib.blake2b(schema.encode(), digest_size=8).digest(), signed=True)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
        if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema) is None:
            await conn.execute(f"CREATE SCHEMA {s}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.schema_version "
            "(version integer PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {s}.schema_version")
        if current > SCHEMA_VERSION:
            raise BackendUnavailable(
                f"postgresql: schema {schema!r} is at version {current}, newer than this "
                f"sessionkeeper knows ({SCHEMA_VERSION}): upgrade sessionkeeper"
            )
        for version in range(current + 1, target + 1):
            for statement in MIGRATIONS[version]:
                await conn.execute(statement.format(s=s))
            await conn.execute(
                f"INSERT INTO {s}.schema_version VALUES ($1, extract(epoch FROM now()))", version
            )


def _where(
    tenant: str, query: SessionQuery, now: float, by_activity: bool = False
) -> tuple[str, list[Any]]:
    """The WHERE of a listing or count of ``sessions s``; ``by_activity``: of ``sessions s``
    joined to its ``activity a``, whose columns then serve the tenant, owner and updated_at
    (the same values, on the indexes that order by updated_at)."""
    params: list[Any] = [tenant, now]
    clauses = ["a.tenant = $1" if by_activity else "s.tenant = $1", _LIVE.format(now="$2")]
    updated = "a.updated_at" if by_activity else "s.updated_at"

    def add(template: str, value: Any) -> None:
        params.append(value)
        clauses.append(template.format(f"${len(params)}"))

    # As indexed: '' stands for none.
    if query.owner_set:
        owner = "a.owner_key" if by_activity else "coalesce(s.owner, '')"
        add(f"{owner} = {{}}", query.owner or "")
    if query.folder_set:
        add("coalesce(s.folder, '') = {}", query.folder or "")
    if query.status is not None:
        add("s.status = {}", query.status)
    for column, op, bound in (
        ("s.created_at", ">=", query.created_since),
        ("s.created_at", "<", query.created_before),
        (updated, ">=", query.updated_since),
        (updated, "<", query.updated_before),
    ):
        if bound is not None:
            add(f"{column} {op} {{}}", bound)
    if query.title_contains is not None:
        # rules.ascii_lower: fold A-Z only, as the other engines do (lower() may fold more).
        add(
            "strpos(translate(s.title, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', "
            "'abcdefghijklmnopqrstuvwxyz'), {}) > 0",
            query.title_contains,
        )
    return " AND ".join(clauses), params


def list_sql(schema: str, tenant: str, query: SessionQuery, now: float) -> tuple[str, list[Any]]:
    """The SELECT a listing runs (public so tests can check its query plan). A listing by
    updated_at walks an index of activity and joins each session by its primary key."""
    by_activity = query.order_by != "created_at"
    where, params = _where(tenant, query, now, by_activity)
    s = _quote(schema)
    if by_activity:
        key, id_, tables = (
            "a.updated_at",
            "a.id",
            f"{s}.activity a JOIN {s}.sessions s ON s.pk = a.session_pk",
        )
    else:
        key, id_, tables = "s.created_at", "s.id", f"{s}.sessions s"
    direction = "DESC" if query.descending else "ASC"
    if query.after_key is not None:
        n = len(params)
        where += f" AND ({key}, {id_}) {'<' if query.descending else '>'} (${n + 1}, ${n + 2})"
        params += [query.after_key, query.after_id]
    sql = (
        f"SELECT {_PLAIN_RECORD} FROM {tables} WHERE {where} "
        f"ORDER BY {key} {direction}, {id_} {direction} LIMIT ${len(params) + 1}"
    )
    return sql, [*params, query.limit]


def _parse_url(url: str) -> tuple[str, str, bool]:
    """``(dsn for asyncpg, schema, durable)`` from a store URL."""
    parts = urlsplit(url)
    schema, durable = DEFAULT_SCHEMA, False
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in seen:
            raise InvalidInput("url", f"the option {name!r} is given twice")
        seen.add(name)
        if name == "schema":
            if _SCHEMA_NAME.fullmatch(value) is None:
                raise InvalidInput(
                    "url",
                    "schema must be 1-63 letters, digits or _, not start with a digit or "
                    f"pg_, not {value!r}",
                )
            schema = value
        elif name == "durable":
            if value not in ("true", "false"):
                raise InvalidInput("url", f"durable must be true or false, not {value!r}")
            durable = value == "true"
        elif name in _DRIVER_OPTIONS:
            kept.append((name, value))
        else:
            raise InvalidInput(
                "url",
                f"unknown PostgreSQL URL option {name!r}; sessionkeeper takes schema "
                "and durable, and asyncpg's connection options (sslmode, ...)",
            )
    return parts._replace(query=urlencode(kept)).geturl(), schema, durable


class PostgresEngine(Engine):
    """Sessions in one PostgreSQL schema: safe for many processes and servers at once."""

    __slots__ = (
        "_after_reads",
        "_appends",
        "_dsn",
        "_durable",
        "_last_reads",
        "_pool",
        "_sql",
        "schema",
        "settings",
    )
    name = "postgresql"

    def __init__(self, url: str, settings: Settings) -> None:
        self._dsn, self.schema, self._durable = _parse_url(url)
        self.settings = settings
        s = _quote(self.schema)
        self._sql = {name: sql.replace("{s}", s) for name, sql in _STATEMENTS.items()}
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        # The hot calls, batched: concurrent appends and message reads share statements.
        limit = settings.pool_size
        self._appends = Turns[_AppendJob](self._run_appends, limit)
        self._last_reads = Turns[_ReadJob](self._run_reads, limit)
        self._after_reads = Turns[_ReadJob](self._run_reads, limit)

    # --- plumbing ----------------------------------------------------------------------

    async def _failed(self, exc: BaseException) -> BackendUnavailable:
        """The error to raise for a driver failure. One that may have broken a connection
        (a lost socket, a timeout, a terminated backend) expires every pooled connection,
        since a server restart or a network cut breaks them all: each is replaced by a
        fresh one when next acquired, so the next call does not meet another dead one."""
        if self._pool is not None and (
            not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, _CONNECTION_LOST)
        ):
            await self._pool.expire_connections()
        return self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.settings.server_timeout:g} s"
        else:
            reason = str(exc) or type(exc).__name__
        host = urlsplit(self._dsn).netloc.rpartition("@")[2]  # never the password
        return BackendUnavailable(f"postgresql at {host or 'the default host'}: {reason}")

    async def open(self) -> None:
        if self._pool is not None:
            return
        timeout = self.settings.server_timeout
        pool = asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self.settings.pool_size,
            timeout=timeout,
            command_timeout=timeout,
            reset=_keep_session_state,
            # A change holds its row lock across round trips; if this process freezes or
            # its network is cut mid-transaction, the server ends the transaction (and
            # frees the lock) after this, not whenever TCP notices, maybe hours later.
            server_settings={
                "idle_in_transaction_session_timeout": str(
                    round(_IDLE_IN_TRANSACTION * timeout * 1000)
                ),
                # Every statement here is a prepared one whose best plan does not depend
                # on its values (an index per query shape): plan it once, not per call,
                # which cost more than running it.
                "plan_cache_mode": "force_generic_plan",
                # Short statements only: compiling one (over 100 ms) never pays back.
                "jit": "off",
            },
        )
        try:
            await pool
            async with pool.acquire(timeout=timeout) as conn:
                await migrate(conn, self.schema)
                if self._durable:
                    await self._check_durability(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _DRIVER_ERRORS):
                raise self._unavailable(exc) from exc
            raise
        self._pool = pool
        self._opened()

    async def _check_durability(self, conn: Connection) -> None:
        """Warn when the server acknowledges commits it may still lose."""
        [(sync, fsync)] = await conn.fetch(
            "SELECT current_setting('synchronous_commit'), current_setting('fsync')"
        )
        if fsync == "off":
            log.warning(
                "postgresql: durable=true but fsync is off: an acknowledged write can be lost, "
                "and the database corrupted, if the server's machine crashes or loses power"
            )
        if sync == "off":
            log.warning(
                "postgresql: durable=true but synchronous_commit is off: an acknowledged write "
                "survives an app crash but the last ones (up to 3 x wal_writer_delay) are lost "
                "if the PostgreSQL server crashes or its machine loses power"
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._closed()
        if pool is None or self._forked:
            return
        try:
            await asyncio.wait_for(pool.close(), self.settings.server_timeout)
        except _DRIVER_ERRORS:  # the server is gone or slow: drop the sockets instead
            pool.terminate()

    def _usable_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._forked:
            raise BackendUnavailable(
                "this PostgreSQL store was opened before fork(); open a new one in the child"
            )
        if self._pool is None:
            raise BackendUnavailable("the PostgreSQL engine is closed")
        return self._pool

    def _acquire(self, pool: asyncpg.Pool[asyncpg.Record]) -> _Acquire:
        return _Acquire(pool, self.settings.server_timeout)

    async def _run(self, job: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``job`` on a pooled connection, outside any transaction."""
        pool = self._usable_pool()
        try:
            async with self._acquire(pool) as conn:
                return await job(conn)
        except _DRIVER_ERRORS as exc:
            raise await self._failed(exc) from exc

    async def _transact(self, job: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``job`` in one transaction. A deadlock that PostgreSQL broke by aborting
        this transaction (another one took the same rows' locks in the opposite order, as
        two folder deletions that reassign to each other's folder do) left nothing
        behind, so the job runs again."""
        pool = self._usable_pool()
        for attempt in range(_DEADLOCK_RETRIES + 1):
            try:
                async with (
                    self._acquire(pool) as conn,
                    conn.transaction(),
                ):
                    return await job(conn)
            except asyncpg.DeadlockDetectedError as exc:
                if attempt == _DEADLOCK_RETRIES:
                    raise self._unavailable(exc) from exc
            except _DRIVER_ERRORS as exc:
                raise await self._failed(exc) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """The rows of one statement: ``_run`` without a job to build, for the reads."""
        pool = self._usable_pool()
        try:
            async with self._acquire(pool) as conn:
                return await conn.fetch(sql, *args)
        except _DRIVER_ERRORS as exc:
            raise await self._failed(exc) from exc

    async def _lock(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        now: float,
        expected_version: int | None,
        with_state: bool = False,
    ) -> tuple[int, SessionRecord]:
        """Lock a live session's row for this transaction and check its version."""
        sql = self._sql["lock_with_state" if with_state else "lock"]
        row = await conn.fetchrow(sql, tenant, session_id, now)
        if row is None:
            raise NotFound(f"no session {session_id!r}")
        pk, record = _session(row)
        rules.check_version(record, expected_version)
        return pk, record

    async def _check_folder(
        self, conn: Connection, tenant: str, folder_id: str | None, owner: str | None
    ) -> None:
        """Raise NotFound unless the folder is one of ``owner``'s; share-lock it until the
        transaction ends so that it cannot be deleted under the session placed in it."""
        if folder_id is None:
            return
        if await conn.fetchval(self._sql["check_folder"], tenant, folder_id, owner) is None:
            raise NotFound(f"no folder {folder_id!r} of owner {owner!r}")

    async def _save(
        self,
        conn: Connection,
        pk: int,
        r: SessionRecord,
        state: str | None = None,
        messages: Sequence[MessageRecord] = (),
    ) -> None:
        """Write back a session that this transaction locked, and its new state and
        messages, in one statement."""
        args: list[Any] = [
            pk,
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
        ]
        name = "save"
        if state is not None:
            name += "_state"
            args.append(state)
        if messages:
            name += "_messages"
            args += [[m.seq for m in messages], *_message_arrays(messages)]
        try:
            await conn.execute(self._sql[name], *args)
        except asyncpg.UntranslatableCharacterError as exc:
            raise _unstorable(state, r.metadata) from exc

    # --- sessions ----------------------------------------------------------------------

    async def insert_session(self, record: SessionRecord, now: float) -> None:
        args = _insert_args(record)
        sql = self._sql["insert"]

        async def insert(conn: Connection) -> bool:
            """Insert the session; False if its folder is not a folder of its owner."""
            try:
                return await conn.fetchval(sql, *args) is not None
            except asyncpg.UntranslatableCharacterError as exc:
                raise _unstorable(record.state, record.metadata) from exc

        async def first_try(conn: Connection) -> bool | None:
            """As ``insert``, or None if the id is taken."""
            try:
                return await insert(conn)
            except asyncpg.UniqueViolationError:
                return None

        async def replace(conn: Connection) -> bool:
            """The id is taken: by a live session (AlreadyExists) or by an expired one,
            which goes with its messages."""
            row = await conn.fetchrow(self._sql["lock_id"], record.tenant, record.id)
            if row is not None:
                if not rules.is_expired(row[1], now):
                    raise AlreadyExists(f"session {record.id!r} already exists")
                await conn.execute(self._sql["drop"], [row[0]])
            try:
                return await insert(conn)
            except asyncpg.UniqueViolationError as exc:  # created meanwhile by another
                raise AlreadyExists(f"session {record.id!r} already exists") from exc

        inserted = await self._run(first_try)
        if inserted is None:
            inserted = await self._transact(replace)
        if not inserted:
            # The folder is not the owner's; but a live session with the id comes first.
            found = await self._fetch(self._sql["find"], record.tenant, record.id)
            if found and not rules.is_expired(found[0][2], now):
                raise AlreadyExists(f"session {record.id!r} already exists")
            raise NotFound(f"no folder {record.folder!r} of owner {record.owner!r}")

    async def _renew(
        self,
        tenant: str,
        session_id: str,
        now: float,
        expires_at: float | None,
        idle_ttl: float | None,
        deadline: float | None,
    ) -> tuple[bool, float | None]:
        """Renew the idle expiry of a session just read with these times, if that moves it:
        ``(still live, expires_at)``. The UPDATE recomputes the expiry from the row as it is
        by then, so it never undoes a later renewal by another process."""
        if rules.renewed_expiry(expires_at, idle_ttl, deadline, now) == expires_at:
            return True, expires_at
        rows = await self._fetch(self._sql["renew"], tenant, session_id, now)
        return (True, rows[0][0]) if rows else (False, None)

    async def get_session(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        rows = await self._fetch(self._sql["get"], tenant, session_id, now)
        if not rows:
            return None
        record = SessionRecord(*rows[0])
        live, record.expires_at = await self._renew(
            tenant, session_id, now, record.expires_at, record.idle_ttl, record.deadline
        )
        return record if live else None

    async def delete_session(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> None:
        async def job(conn: Connection) -> None:
            pk, _ = await self._lock(conn, tenant, session_id, now, expected_version)
            await conn.execute(self._sql["drop"], [pk])

        await self._transact(job)

    async def change_session(
        self, tenant: str, session_id: str, change: Change, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        with_state = change.want_state or change.has_state_patch

        async def job(conn: Connection) -> tuple[SessionRecord, list[MessageRecord]]:
            pk, current = await self._lock(conn, tenant, session_id, now, None, with_state)
            new, appended = rules.apply_change(current, change, now)
            # A folder stays valid while neither it nor the owner changes (folders never
            # change owner); checking it anyway would lock it after the session, the
            # opposite order to delete_folder's.
            if new.folder != current.folder or new.owner != current.owner:
                await self._check_folder(conn, tenant, new.folder, new.owner)
            state = new.state if new.state is not current.state else None
            await self._save(conn, pk, new, state, appended)
            return new, appended

        return await self._transact(job)

    # --- messages ----------------------------------------------------------------------

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageDraft],
        now: float,
        expected_version: int | None,
    ) -> list[MessageRecord]:
        self._usable_pool()
        job = _AppendJob(tenant, session_id, now, messages, expected_version)
        self._appends.add(job)
        last_seq: int | None = await job.future
        if last_seq is None:
            # Nothing was written: say why, on a statement of its own.
            last_seq = await self._run(functools.partial(self._append_alone, job))
        return rules.number_messages(session_id, last_seq - len(messages), messages, now)

    def _append_args(self, job: _AppendJob) -> tuple[str, list[Any]]:
        """The statement and arguments of one append on its own."""
        messages = job.messages
        args: list[Any] = [
            job.tenant,
            job.session_id,
            job.now,
            len(messages),
            job.tokens_in,
            job.tokens_out,
            job.cost,
            job.expected,
        ]
        if len(messages) == 1:
            one = messages[0]
            args += [one.role, one.content, job.tokens_in, job.tokens_out, job.cost, one.metadata]
            return self._sql["append_one"], args
        return self._sql["append"], args + _message_arrays(messages)

    async def _append_alone(self, job: _AppendJob, conn: Connection) -> int:
        """Append on its own; raise NotFound or VersionConflict if it cannot be written."""
        sql, args = self._append_args(job)
        while True:
            last_seq: int | None = await conn.fetchval(sql, *args)
            if last_seq is not None:
                return last_seq
            # A session that is live and at the expected version now was absent or
            # elsewhere a moment ago: try again.
            row = await conn.fetchrow(self._sql["find"], job.tenant, job.session_id)
            if row is None or rules.is_expired(row[2], job.now):
                raise NotFound(f"no session {job.session_id!r}")
            if job.expected is not None and row[1] != job.expected:
                raise VersionConflict(job.session_id, job.expected, row[1])

    async def _run_jobs(
        self, jobs: Sequence[_Job], run: Callable[[Connection], Awaitable[None]]
    ) -> None:
        """Run a batch's statements on one pooled connection; a failure fails every job
        not settled yet, each with an error of its own."""
        try:
            pool = self._usable_pool()
            async with self._acquire(pool) as conn:
                await run(conn)
        except _DRIVER_ERRORS as exc:
            failed = await self._failed(exc)
            for job in jobs:
                error = BackendUnavailable(str(failed))
                error.__cause__ = exc
                job.fail(error)
        except BaseException as exc:
            for job in jobs:
                job.fail(exc)
            if not isinstance(exc, Exception):
                raise

    async def _run_appends(self, jobs: list[_AppendJob]) -> None:
        async def run(conn: Connection) -> None:
            for batch in _rounds(jobs):
                if len(batch) == 1:
                    sql, args = self._append_args(batch[0])
                    batch[0].settle(await conn.fetchval(sql, *args))
                else:
                    await self._append_batch(conn, batch)

        await self._run_jobs(jobs, run)

    async def _append_batch(self, conn: Connection, jobs: list[_AppendJob]) -> None:
        """Several appends, to as many sessions, in one statement."""
        n = len(jobs)
        tenants: list[str] = [""] * n
        ids: list[str] = [""] * n
        nows: list[float] = [0.0] * n
        counts: list[int] = [0] * n
        tokens_in: list[int] = [0] * n
        tokens_out: list[int] = [0] * n
        costs: list[float] = [0.0] * n
        expected: list[int | None] = [None] * n
        owners: list[int] = []
        positions: list[int] = []
        messages: list[MessageDraft] = []
        for i, job in enumerate(jobs):
            tenants[i] = job.tenant
            ids[i] = job.session_id
            nows[i] = job.now
            counts[i] = len(job.messages)
            tokens_in[i] = job.tokens_in
            tokens_out[i] = job.tokens_out
            costs[i] = job.cost
            expected[i] = job.expected
            owners += [i + 1] * len(job.messages)
            positions += range(1, len(job.messages) + 1)
            messages += job.messages
        args = (
            tenants,
            ids,
            nows,
            counts,
            tokens_in,
            tokens_out,
            costs,
            expected,
            owners,
            positions,
            *_message_arrays(messages),
        )
        rows = await conn.fetch(self._sql["append_batch"], *args)
        written: dict[int, int] = {row[0]: row[1] for row in rows}  # job number -> last_seq
        for i, job in enumerate(jobs):
            job.settle(written.get(i + 1))

    async def _run_reads(self, jobs: list[_ReadJob]) -> None:
        async def run(conn: Connection) -> None:
            if len(jobs) == 1:
                await self._read_alone(conn, jobs[0])
            else:
                await self._read_batch(conn, jobs)

        await self._run_jobs(jobs, run)

    async def _read_alone(self, conn: Connection, job: _ReadJob) -> None:
        if job.after_seq is None:
            args: tuple[Any, ...] = (self._sql["read_last"], job.limit)
        else:
            args = (self._sql["read_after"], job.after_seq, job.limit)
        rows = await conn.fetch(args[0], job.tenant, job.session_id, job.now, *args[1:])
        if not rows:
            job.settle(None)
            return
        first = rows[0]
        sid = job.session_id
        found = [] if first[3] is None else [MessageRecord(sid, *row[3:]) for row in rows]
        job.settle((first[0], first[1], first[2], found))

    async def _read_batch(self, conn: Connection, jobs: list[_ReadJob]) -> None:
        tenants = [job.tenant for job in jobs]
        ids = [job.session_id for job in jobs]
        nows = [job.now for job in jobs]
        limits = [job.limit for job in jobs]
        if jobs[0].after_seq is None:
            rows = await conn.fetch(self._sql["read_last_batch"], tenants, ids, nows, limits)
        else:
            after = [job.after_seq for job in jobs]
            rows = await conn.fetch(
                self._sql["read_after_batch"], tenants, ids, nows, limits, after
            )
        found: dict[int, tuple[Any, Any, Any, list[MessageRecord]]] = {}
        for row in rows:  # by job, then seq
            n = row[0]
            entry = found.get(n)
            if entry is None:
                entry = found[n] = (row[1], row[2], row[3], [])
            if row[4] is not None:
                entry[3].append(MessageRecord(jobs[n - 1].session_id, *row[4:]))
        for i, job in enumerate(jobs):
            job.settle(found.get(i + 1))

    async def _messages(
        self, batches: Turns[_ReadJob], job: _ReadJob
    ) -> list[MessageRecord] | None:
        self._usable_pool()
        batches.add(job)
        found = await job.future
        if found is None:
            return None
        expires_at, idle_ttl, deadline, messages = found
        live, _ = await self._renew(
            job.tenant, job.session_id, job.now, expires_at, idle_ttl, deadline
        )
        return messages if live else None

    async def read_messages(
        self, tenant: str, session_id: str, now: float, after_seq: int, limit: int
    ) -> list[MessageRecord] | None:
        job = _ReadJob(tenant, session_id, now, limit, after_seq)
        return await self._messages(self._after_reads, job)

    async def last_messages(
        self, tenant: str, session_id: str, now: float, limit: int
    ) -> list[MessageRecord] | None:
        job = _ReadJob(tenant, session_id, now, limit, None)
        return await self._messages(self._last_reads, job)

    async def pop_message(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, MessageRecord | None]:
        async def job(conn: Connection) -> tuple[SessionRecord, MessageRecord | None]:
            pk, current = await self._lock(conn, tenant, session_id, now, expected_version)
            row = await conn.fetchrow(self._sql["pop"], pk)
            if row is None:
                return current, None
            popped = MessageRecord(session_id, *row)
            new = rules.remove_messages(
                current, 1, popped.input_tokens, popped.output_tokens, popped.cost, now
            )
            await self._save(conn, pk, new)
            return new, popped

        return await self._transact(job)

    async def clear_messages(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, int]:
        async def job(conn: Connection) -> tuple[SessionRecord, int]:
            pk, current = await self._lock(conn, tenant, session_id, now, expected_version)
            status = await conn.execute(self._sql["clear"], pk)
            removed = int(status.rpartition(" ")[2])
            new = rules.remove_messages(
                current, removed, current.input_tokens, current.output_tokens, current.cost, now
            )
            await self._save(conn, pk, new)
            return new, removed

        return await self._transact(job)

    # --- queries -----------------------------------------------------------------------

    async def list_sessions(
        self, tenant: str, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        sql, params = list_sql(self.schema, tenant, query, now)
        return [SessionRecord(*row) for row in await self._fetch(sql, *params)]

    async def count_sessions(self, tenant: str, query: SessionQuery, now: float) -> int:
        where, params = _where(tenant, query, now)
        sql = f"SELECT count(*) FROM {_quote(self.schema)}.sessions s WHERE {where}"
        rows = await self._fetch(sql, *params)
        count: int = rows[0][0]
        return count

    async def stats(self, tenant: str, now: float, since: float, top: int) -> Stats:
        # One statement, so every figure comes from one snapshot. Unlike the others, its
        # best plan depends on its values (how many sessions changed since `since`, how
        # many expired): a generic plan guesses a third of the table for each range, walks
        # every activity row and, costed that high, gets JIT-compiled on every call.
        async def job(conn: Connection) -> asyncpg.Record:
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            [found] = await conn.fetch(self._sql["stats"], tenant, now, since, top)
            return found

        row = await self._transact(job)
        total, active, completed, archived, recent, messages, tokens_in, tokens_out, cost = row[:9]
        owners, counts = row[9] or [], row[10] or []
        costly, costs = row[11] or [], row[12] or []
        return Stats(
            total=total,
            active=active,
            completed=completed,
            archived=archived,
            recently_active=recent,
            completion_rate=completed / total if total else 0.0,
            messages=messages,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost=cost,
            top_owners=[
                OwnerCount(owner=o, sessions=n) for o, n in zip(owners, counts, strict=True)
            ],
            top_owners_by_cost=[
                OwnerCost(owner=o, cost=c) for o, c in zip(costly, costs, strict=True)
            ],
        )

    # --- folders -----------------------------------------------------------------------

    async def insert_folder(self, record: FolderRecord) -> None:
        r = record

        async def job(conn: Connection) -> None:
            try:
                await conn.execute(
                    self._sql["insert_folder"], r.tenant, r.id, r.owner, r.name, r.created_at
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "folders_pkey":
                    raise AlreadyExists(f"folder {r.id!r} already exists") from exc
                raise AlreadyExists(f"owner {r.owner!r} already has a folder {r.name!r}") from exc

        await self._run(job)

    async def get_folder(self, tenant: str, folder_id: str, now: float) -> FolderRecord | None:
        rows = await self._fetch(self._sql["get_folder"], now, tenant, folder_id)
        return FolderRecord(*rows[0]) if rows else None

    async def rename_folder(
        self, tenant: str, folder_id: str, name: str, now: float
    ) -> FolderRecord:
        async def job(conn: Connection) -> asyncpg.Record | None:
            try:
                return await conn.fetchrow(self._sql["rename_folder"], now, tenant, folder_id, name)
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists(
                    f"the owner of folder {folder_id!r} already has a folder {name!r}"
                ) from exc

        row = await self._run(job)
        if row is None:
            raise NotFound(f"no folder {folder_id!r}")
        return FolderRecord(*row)

    async def list_folders(
        self, tenant: str, owner: str | None, owner_set: bool, now: float
    ) -> list[FolderRecord]:
        if owner_set:
            rows = await self._fetch(self._sql["list_owner_folders"], now, tenant, owner or "")
        else:
            rows = await self._fetch(self._sql["list_folders"], now, tenant)
        return [FolderRecord(*row) for row in rows]

    async def delete_folder(
        self,
        tenant: str,
        folder_id: str,
        now: float,
        reassign_to: str | None,
        cascade: bool,
    ) -> int:
        async def job(conn: Connection) -> int:
            # The folder's row lock comes first: a session being placed in it share-locks
            # it, so by the next statement every session in it is visible.
            deleted = await conn.fetchrow(self._sql["delete_folder"], tenant, folder_id)
            if deleted is None:
                raise NotFound(f"no folder {folder_id!r}")
            if reassign_to is not None:
                await self._check_folder(conn, tenant, reassign_to, deleted[0])
            if not cascade:
                moved: int = await conn.fetchval(
                    self._sql["move_folder_sessions"], tenant, folder_id, reassign_to, now
                )
                return moved
            rows = await conn.fetch(self._sql["lock_folder_sessions"], tenant, folder_id)
            await conn.execute(self._sql["drop"], [row[0] for row in rows])
            return sum(1 for row in rows if not rules.is_expired(row[1], now))

        return await self._transact(job)

    # --- expiry ------------------------------------------------------------------------

    async def purge_expired(
        self, tenant: str | None, now: float, limit: int
    ) -> list[tuple[str, str]]:
        async def job(conn: Connection) -> list[tuple[str, str]]:
            if tenant is None:
                rows = await conn.fetch(self._sql["lock_expired"], now, limit)
            else:
                rows = await conn.fetch(self._sql["lock_expired_of_tenant"], now, limit, tenant)
            if rows:
                await conn.execute(self._sql["drop"], [row[0] for row in rows])
            # Expired guards go too (they are absent already); only sessions are counted.
            await conn.execute(self._sql["purge_guards"], now, limit, tenant)
            return [(row[1], row[2]) for row in rows]

        return await self._transact(job)

    # --- transfer ----------------------------------------------------------------------

    async def list_tenants(self, now: float) -> list[str]:
        return [row[0] for row in await self._fetch(self._sql["list_tenants"], now)]

    async def export_session(
        self, tenant: str, session_id: str, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]] | None:
        rows = await self._fetch(self._sql["export"], tenant, session_id, now)
        if not rows:
            return None
        row = rows[0]
        record = SessionRecord(*row[:20])
        seqs = row[20]
        if seqs is None:  # no messages
            return record, []
        columns = zip(seqs, *row[21:], strict=True)
        return record, [MessageRecord(session_id, *values) for values in columns]

    async def load_session(
        self, record: SessionRecord, messages: list[MessageRecord], now: float, replace: bool
    ) -> bool:
        r = record
        args = (
            *_insert_args(r),
            [m.seq for m in messages],
            *_message_arrays(messages),
            [m.created_at for m in messages],
        )

        async def job(conn: Connection) -> bool:
            row = await conn.fetchrow(self._sql["lock_id"], r.tenant, r.id)
            if row is not None:
                if not replace and not rules.is_expired(row[1], now):
                    return False
                await conn.execute(self._sql["drop"], [row[0]])
            try:
                loaded = await conn.fetchval(self._sql["load"], *args)
            except asyncpg.UniqueViolationError as exc:  # created meanwhile: look again
                raise _Taken(f"session {r.id!r} kept being created while it was loaded") from exc
            except asyncpg.UntranslatableCharacterError as exc:
                raise _unstorable(r.state, r.metadata) from exc
            if loaded is None:  # rolls back the drop
                raise NotFound(f"no folder {r.folder!r} of owner {r.owner!r}")
            return True

        for attempt in range(_DEADLOCK_RETRIES + 1):
            try:
                return await self._transact(job)
            except _Taken as exc:
                if attempt == _DEADLOCK_RETRIES:
                    raise self._unavailable(exc) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def load_folder(self, record: FolderRecord, replace: bool) -> bool:
        r = record

        async def job(conn: Connection) -> bool:
            try:
                loaded = await conn.fetchval(
                    self._sql["load_folder"], r.tenant, r.id, r.owner, r.name, r.created_at, replace
                )
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists(f"owner {r.owner!r} already has a folder {r.name!r}") from exc
            return loaded is not None

        return await self._run(job)

    # --- analytics ---------------------------------------------------------------------

    async def add_daily(self, tenant: str, rows: list[DailyRecord], replace: bool = False) -> None:
        columns = [[getattr(r, name) for r in rows] for name in DAILY_COUNTERS]
        days = [r.day for r in rows]
        owners = [r.owner or "" for r in rows]

        async def job(conn: Connection) -> None:
            sql = self._sql["set_daily" if replace else "add_daily"]
            await conn.execute(sql, tenant, days, owners, *columns)

        await self._run(job)

    async def read_daily(
        self,
        tenant: str,
        first: int,
        last: int,
        owner: str | None,
        owner_set: bool,
        group_by: str = "day",
    ) -> list[DailyRecord]:
        key = (owner or "") if owner_set else None
        period = group_by if group_by in ("week", "month") else "day"
        rows = await self._fetch(self._sql["read_daily"], tenant, first, last, key, period)
        return [DailyRecord(day, who or None, *counters) for day, who, *counters in rows]

    async def session_owners(self, tenant: str, session_ids: list[str]) -> dict[str, str | None]:
        rows = await self._fetch(self._sql["session_owners"], tenant, session_ids)
        return {row[0]: row[1] for row in rows}

    # --- check and doctor --------------------------------------------------------------

    async def check(self, tenant: str | None, now: float, repair: bool) -> CheckReport:
        s = _quote(self.schema)
        where = "pk > $1" + ("" if tenant is None else " AND tenant = $3")
        batch_sql = (
            "SELECT s.pk, s.tenant, s.id, s.message_count, s.input_tokens, s.output_tokens, "
            "s.cost, s.last_seq, m.*, s.folder IS NOT NULL AND NOT EXISTS "
            f"(SELECT 1 FROM {s}.folders f WHERE f.tenant = s.tenant AND f.id = s.folder) "
            f"FROM (SELECT * FROM {s}.sessions WHERE {where} ORDER BY pk LIMIT $2) s "
            f"CROSS JOIN LATERAL (SELECT {_TALLY} FROM {s}.messages "
            "WHERE session_pk = s.pk) m ORDER BY s.pk"
        )
        report = CheckReport()
        after = 0
        while rows := await self._fetch(
            batch_sql, after, _CHECK_BATCH, *(() if tenant is None else (tenant,))
        ):
            after = rows[-1][0]
            for row in rows:
                subject = f"{row[1]}/{row[2]}"
                stored = (row[3], row[4], row[5], row[6], row[7])
                tally: Tally = (row[8], row[9], row[10], row[11], row[12], row[13])
                if has_gap(tally):
                    report.found("seq_gaps", subject)
                if tally_differs(stored, tally):
                    fixed = repair and await self._transact(
                        functools.partial(self._fix_aggregates, row[0])
                    )
                    report.found("aggregates", subject, fixed)
                if row[14]:
                    fixed = repair and await self._fix_folder(row[0])
                    report.found("missing_folder", subject, fixed)
        await self._check_activity(tenant, repair, report)
        await self._check_totals(tenant, repair, report)
        if tenant is None:  # messages of no session have no tenant either
            after = 0
            orphans_sql = (
                f"SELECT session_pk, count(*) FROM {s}.messages m WHERE session_pk > $1 "
                f"AND NOT EXISTS (SELECT 1 FROM {s}.sessions WHERE pk = m.session_pk) "
                "GROUP BY session_pk ORDER BY session_pk LIMIT $2"
            )
            while orphans := await self._fetch(orphans_sql, after, _CHECK_BATCH):
                after = orphans[-1][0]
                for session_pk, count in orphans:
                    if repair:
                        await self._drop_orphans(session_pk)
                    report.found("orphan_messages", f"session pk {session_pk}", repair, count)
        return report

    async def _check_activity(self, tenant: str | None, repair: bool, report: CheckReport) -> None:
        """Rows of the activity table (the listings by last activity) of no session."""
        s = _quote(self.schema)
        where = "" if tenant is None else " AND a.tenant = $3"
        sql = (
            f"SELECT a.session_pk, a.tenant, a.id FROM {s}.activity a WHERE a.session_pk > $1"
            f"{where} AND NOT EXISTS (SELECT 1 FROM {s}.sessions WHERE pk = a.session_pk) "
            "ORDER BY a.session_pk LIMIT $2"
        )
        drop = (
            f"DELETE FROM {s}.activity a WHERE session_pk = $1 "
            f"AND NOT EXISTS (SELECT 1 FROM {s}.sessions WHERE pk = a.session_pk)"
        )
        after = 0
        while rows := await self._fetch(
            sql, after, _CHECK_BATCH, *(() if tenant is None else (tenant,))
        ):
            after = rows[-1][0]
            for session_pk, name, session_id in rows:
                if repair:
                    await self._fetch(drop, session_pk)
                report.found("dangling_index", f"{name}/{session_id}", repair)

    async def _check_totals(self, tenant: str | None, repair: bool, report: CheckReport) -> None:
        """Totals (which stats read) that disagree with the sessions; repair rebuilds the
        totals of each tenant concerned."""
        s = _quote(self.schema)
        where, args = ("", ()) if tenant is None else (" WHERE tenant = $1", (tenant,))
        stored_sql = (
            "SELECT tenant, owner_key, status, sum(sessions)::bigint, sum(messages)::bigint, "
            "sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cost) "
            f"FROM {s}.totals{where} GROUP BY 1, 2, 3"
        )
        actual_sql = _TOTALS_OF_SESSIONS.replace("{s}", s).replace("{where}", where)

        async def read(conn: Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
            # One snapshot for both (the triggers keep them equal in every snapshot).
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await conn.fetch(stored_sql, *args), await conn.fetch(actual_sql, *args)

        stored, actual = await self._run(read)
        differing = totals_differing(
            {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6], r[7]) for r in stored},
            {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6], r[7]) for r in actual},
        )
        rebuilt: set[str] = set()
        for name, owner_key, status in differing:
            if repair and name not in rebuilt:
                rebuilt.add(name)
                await self._transact(functools.partial(self._rebuild_totals, name))
            report.found("totals", f"{name}/{owner_key or '(no owner)'}/{status}", repair)

    async def _rebuild_totals(self, tenant: str, conn: Connection) -> None:
        """Recompute a tenant's totals from its sessions. Writes to sessions wait meanwhile
        (their triggers would move the totals between the two statements)."""
        s = _quote(self.schema)
        await conn.execute(f"LOCK TABLE {s}.sessions IN SHARE MODE")
        await conn.execute(f"DELETE FROM {s}.totals WHERE tenant = $1", tenant)
        await conn.execute(f"INSERT INTO {s}.totals {_TOTALS_REBUILD.replace('{s}', s)}", tenant)

    async def _fix_aggregates(self, pk: int, conn: Connection) -> bool:
        """Recompute a session's aggregates from its messages, with its row locked (as
        appends lock it), if they still disagree."""
        s = _quote(self.schema)
        row = await conn.fetchrow(
            "SELECT message_count, input_tokens, output_tokens, cost, last_seq "
            f"FROM {s}.sessions WHERE pk = $1 FOR UPDATE",
            pk,
        )
        tally = await conn.fetchrow(f"SELECT {_TALLY} FROM {s}.messages WHERE session_pk = $1", pk)
        if row is None or tally is None or not tally_differs(tuple(row), tuple(tally)):
            return False
        await conn.execute(
            f"UPDATE {s}.sessions SET message_count = $2, input_tokens = $3, output_tokens = $4, "
            "cost = $5, last_seq = greatest(last_seq, $6), version = version + 1 WHERE pk = $1",
            pk,
            tally[0],
            tally[1],
            tally[2],
            tally[3],
            tally[5],
        )
        return True

    async def _fix_folder(self, pk: int) -> bool:
        s = _quote(self.schema)

        async def run(conn: Connection) -> bool:
            done = await conn.execute(
                f"UPDATE {s}.sessions SET folder = NULL, version = version + 1 WHERE pk = $1 "
                f"AND folder IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {s}.folders f "
                f"WHERE f.tenant = {s}.sessions.tenant AND f.id = {s}.sessions.folder)",
                pk,
            )
            return bool(done == "UPDATE 1")

        return await self._run(run)

    async def _drop_orphans(self, session_pk: int) -> None:
        s = _quote(self.schema)

        async def run(conn: Connection) -> None:
            for table in ("messages", "states"):
                await conn.execute(
                    f"DELETE FROM {s}.{table} WHERE session_pk = $1 "
                    f"AND NOT EXISTS (SELECT 1 FROM {s}.sessions WHERE pk = $1)",
                    session_pk,
                )

        await self._run(run)

    async def doctor(self, now: float) -> DoctorReport:
        s = _quote(self.schema)
        tables = ("sessions", "states", "messages", "folders", "activity", "guards")

        async def run(conn: Connection) -> tuple[DoctorReport, bool, set[str]]:
            has_totals = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{s}.totals")
            enabled = {
                row[0]
                for row in await conn.fetch(
                    "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass "
                    "AND NOT tgisinternal AND tgenabled <> 'D'",
                    f"{s}.sessions",
                )
            }
            version = await conn.fetchval("SHOW server_version")
            names = ("synchronous_commit", "fsync", "full_page_writes")
            settings = {name: str(await conn.fetchval(f"SHOW {name}")) for name in names}
            present = {
                row[0]
                for row in await conn.fetch(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = $1", self.schema
                )
            }
            report = DoctorReport(
                engine=self.name,
                server_version=f"PostgreSQL {version}",
                schema_version=await conn.fetchval(f"SELECT max(version) FROM {s}.schema_version"),
                settings=settings,
                sizes={
                    table: await conn.fetchval(
                        "SELECT pg_total_relation_size($1::regclass)", f"{s}.{table}"
                    )
                    for table in tables
                },
                counts={
                    table: await conn.fetchval(f"SELECT count(*) FROM {s}.{table}")
                    for table in tables
                },
                missing_indexes=[name for name in EXPECTED_INDEXES if name not in present],
            )
            return report, has_totals, enabled

        report, has_totals, enabled = await self._run(run)
        missing_triggers = [name for name in _TOTALS_TRIGGERS if name not in enabled]
        if report.settings["fsync"] == "off":
            report.warnings.append(
                "fsync is off: a crash of the server's machine can lose committed writes and "
                "corrupt the database; set fsync = on in postgresql.conf"
            )
        if report.settings["synchronous_commit"] == "off":
            report.warnings.append(
                "synchronous_commit is off: the last acknowledged writes are lost if the "
                "server crashes; set synchronous_commit = on (ALTER DATABASE ... SET)"
            )
        for name in report.missing_indexes:
            report.warnings.append(
                f"index {name} is missing: the queries it serves scan the table; recreate "
                "it (CREATE INDEX as in sessionkeeper's schema)"
            )
        if report.schema_version is not None and report.schema_version >= 5:
            if not has_totals:
                report.warnings.append(
                    "table totals is missing: stats fail; restore from a backup (the table "
                    "and its triggers come from schema version 5)"
                )
            elif missing_triggers:
                report.warnings.append(
                    f"trigger(s) {', '.join(missing_triggers)} on sessions are missing or "
                    "disabled: stats drift from the sessions with every write; recreate or "
                    "enable them (as in sessionkeeper's schema), then run check --repair to "
                    "rebuild the totals"
                )
        if report.schema_version != SCHEMA_VERSION:
            report.warnings.append(
                f"schema version {report.schema_version}, this sessionkeeper expects "
                f"{SCHEMA_VERSION}: open the store once with this version to upgrade it"
            )
        return report

    # --- guards ------------------------------------------------------------------------

    async def update_guard(self, tenant: str, key: str, update: GuardUpdate[T], now: float) -> T:
        sql = self._sql
        for _ in range(_GUARD_ATTEMPTS):
            rows = await self._fetch(sql["read_guard"], tenant, key)
            stored, expires = (rows[0][0], rows[0][1]) if rows else (None, None)
            live = stored is not None and not rules.is_expired(expires, now)
            value, expires_at, result = update(stored if live else None)
            if stored is None:
                if value is None or await self._fetch(
                    sql["new_guard"], tenant, key, value, expires_at
                ):
                    return result
            elif value is None:
                if await self._fetch(sql["drop_guard"], tenant, key, stored):
                    return result
            elif await self._fetch(sql["swap_guard"], tenant, key, value, expires_at, stored):
                return result
            await asyncio.sleep(0)  # another writer changed it first: read it again
        raise BackendUnavailable(
            f"postgresql: guard {key!r} kept changing under {_GUARD_ATTEMPTS} tries"
        )

    async def get_guard(self, tenant: str, key: str, now: float) -> str | None:
        rows = await self._fetch(self._sql["get_guard"], tenant, key, now)
        return str(rows[0][0]) if rows else None

    async def list_guards(self, tenant: str, prefix: str, now: float) -> list[GuardRecord]:
        rows = await self._fetch(self._sql["list_guards"], tenant, prefix, now)
        return [GuardRecord(*row) for row in rows]
