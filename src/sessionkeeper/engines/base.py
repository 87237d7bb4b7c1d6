"""The engine contract: the storage-only hooks every engine fills in.

The store validates input, computes policy (ids, expiry, limits) and converts records to
models; an engine only stores and fetches records, atomically. Every hook that touches a
session takes ``now`` (Unix seconds from the store's clock): a session whose
``expires_at <= now`` is absent to every hook but ``purge_expired``, and hooks that read or
write a live session renew its idle expiry with ``rules.renewed_expiry``.
"""

from __future__ import annotations

import os
import weakref
from abc import ABC, abstractmethod
from typing import TypeVar

import orjson

from .. import rules
from ..models import (
    Change,
    CheckReport,
    DailyRecord,
    DoctorReport,
    FolderRecord,
    GuardRecord,
    GuardUpdate,
    MessageDraft,
    MessageRecord,
    SessionQuery,
    SessionRecord,
    Stats,
)

__all__ = ["Engine", "Tally", "Totals", "TotalsKey", "has_gap", "tally_differs", "totals_differing"]

T = TypeVar("T")


# Engines open in this process, and those a forked child inherited: a child must neither
# use them nor close their connections (the parent's sockets and threads).
_OPEN: weakref.WeakSet[Engine] = weakref.WeakSet()
_INHERITED: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _INHERITED.update(_OPEN)
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# What a session's messages add up to: count, input and output tokens, cost, lowest and
# highest seq (0 and 0 without messages).
Tally = tuple[int, int, int, float, int, int]


def tally_differs(stored: tuple[int, int, int, float, int], tally: Tally) -> bool:
    """Whether a session's stored ``(message_count, input_tokens, output_tokens, cost,
    last_seq)`` disagree with its messages' ``tally``: a count or a sum that differs, or a
    ``last_seq`` below a stored seq (pop leaves it above, which is right)."""
    count, input_tokens, output_tokens, cost, _, high = tally
    return (
        stored[0] != count
        or stored[1] != input_tokens
        or stored[2] != output_tokens
        or abs(stored[3] - cost) > 1e-9 * max(1.0, abs(cost))
        or stored[4] < high
    )


# One key of the SQL engines' stats totals, (tenant, owner key, status), and what it holds:
# sessions, messages, input and output tokens, cost.
TotalsKey = tuple[str, str, str]
Totals = tuple[int, int, int, int, float]


def totals_differing(
    stored: dict[TotalsKey, Totals], actual: dict[TotalsKey, Totals]
) -> list[TotalsKey]:
    """The keys whose stored totals disagree with what the sessions add up to (a key
    missing on one side counts as all zeros). Costs may differ by rounding: a total moved
    by every append since its key's first session gathers one rounding error each, so a
    long-lived key's cost may drift from the sum of its sessions by far more than one
    sum's own error; the counts catch lost or doubled writes exactly."""
    zero: Totals = (0, 0, 0, 0, 0.0)
    differing = []
    for key in sorted(stored.keys() | actual.keys()):
        mine, real = stored.get(key, zero), actual.get(key, zero)
        if mine[:4] != real[:4] or abs(mine[4] - real[4]) > 1e-6 * max(1.0, abs(real[4])):
            differing.append(key)
    return differing


def has_gap(tally: Tally) -> bool:
    """Whether the seqs between the lowest and the highest miss some (legal after pop)."""
    count, _, _, _, low, high = tally
    return count > 0 and high - low + 1 != count


class Engine(ABC):
    """Storage for sessions, messages and folders, scoped by tenant on every call.

    An engine that holds connections or threads calls ``_opened`` and ``_closed``, and
    checks ``_forked`` before using them.
    """

    __slots__ = ("__weakref__",)

    def _opened(self) -> None:
        _OPEN.add(self)

    def _closed(self) -> None:
        _OPEN.discard(self)

    @property
    def _forked(self) -> bool:
        """Whether this engine was opened by a parent process before fork()."""
        return self in _INHERITED

    #: Short name shown in errors and the CLI.
    name: str = "engine"

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if needed. Called once, before any other hook."""

    @abstractmethod
    async def close(self) -> None:
        """Release every connection and thread the engine opened. Safe to call twice."""

    # --- sessions ----------------------------------------------------------------------

    @abstractmethod
    async def insert_session(self, record: SessionRecord, now: float) -> None:
        """Store a new session (``record.state`` is set).

        An expired session with the same id is replaced along with its messages.
        Raises AlreadyExists if a live one has the id, NotFound if ``record.folder`` is
        not a folder of ``record.owner``.
        """

    @abstractmethod
    async def get_session(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        """The live session with its state, or None; renews idle expiry."""

    @abstractmethod
    async def delete_session(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> None:
        """Delete a live session and its messages. Raises NotFound or VersionConflict."""

    @abstractmethod
    async def change_session(
        self, tenant: str, session_id: str, change: Change, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        """Apply ``change`` with ``rules.apply_change``, all of it or none of it.

        Returns the session after the change (with state) and the appended messages with
        their seqs. Raises NotFound (the session, or a folder the change points at that is
        not the new owner's), VersionConflict, or InvalidInput from the merge.
        """

    # --- messages ----------------------------------------------------------------------

    @abstractmethod
    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageDraft],
        now: float,
        expected_version: int | None,
    ) -> list[MessageRecord]:
        """Append ``messages`` (at least one) after the session's ``last_seq``, with no gap,
        and move its aggregates, version, ``updated_at`` and idle expiry as
        ``rules.apply_append`` does, atomically. The hot path: no state is read or written.
        Raises NotFound or VersionConflict."""

    @abstractmethod
    async def read_messages(
        self, tenant: str, session_id: str, now: float, after_seq: int, limit: int
    ) -> list[MessageRecord] | None:
        """Up to ``limit`` messages with seq > ``after_seq``, oldest first; None if absent."""

    @abstractmethod
    async def last_messages(
        self, tenant: str, session_id: str, now: float, limit: int
    ) -> list[MessageRecord] | None:
        """The newest ``limit`` messages, oldest first; None if the session is absent."""

    @abstractmethod
    async def pop_message(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, MessageRecord | None]:
        """Remove the newest message and update aggregates with ``rules.remove_messages``.
        On an empty history nothing changes (not even idle expiry) and the message is None.
        Raises NotFound or VersionConflict."""

    @abstractmethod
    async def clear_messages(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, int]:
        """Remove every message; seqs are not reused. Raises NotFound or VersionConflict."""

    # --- queries -----------------------------------------------------------------------

    @abstractmethod
    async def list_sessions(
        self, tenant: str, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        """Up to ``query.limit`` live sessions matching ``query``, in its order, after its
        position. Records may leave ``state`` as None; messages are never loaded."""

    @abstractmethod
    async def count_sessions(self, tenant: str, query: SessionQuery, now: float) -> int:
        """How many live sessions match the filters of ``query`` (position ignored)."""

    @abstractmethod
    async def stats(self, tenant: str, now: float, since: float, top: int) -> Stats:
        """Figures over live sessions; ``recently_active`` counts those updated at or after
        ``since``; ``top_owners`` the ``top`` owners with most sessions and
        ``top_owners_by_cost`` those whose sessions cost most (ties: by owner, none first).
        Never by loading every session where storage can aggregate: the SQL engines keep
        per-owner totals, so stats cost O(owners + recently active + expired unpurged)."""

    # --- folders -----------------------------------------------------------------------

    @abstractmethod
    async def insert_folder(self, record: FolderRecord) -> None:
        """Store a new folder. Raises AlreadyExists if the owner has one of that name."""

    @abstractmethod
    async def get_folder(self, tenant: str, folder_id: str, now: float) -> FolderRecord | None:
        """The folder with its count of live sessions, or None."""

    @abstractmethod
    async def rename_folder(
        self, tenant: str, folder_id: str, name: str, now: float
    ) -> FolderRecord:
        """Rename a folder. Raises NotFound, or AlreadyExists if the name is taken."""

    @abstractmethod
    async def list_folders(
        self, tenant: str, owner: str | None, owner_set: bool, now: float
    ) -> list[FolderRecord]:
        """Folders (of ``owner`` if ``owner_set``) by name, with counts of live sessions."""

    @abstractmethod
    async def delete_folder(
        self,
        tenant: str,
        folder_id: str,
        now: float,
        reassign_to: str | None,
        cascade: bool,
    ) -> int:
        """Delete a folder. Its sessions move to ``reassign_to`` (a folder of the same
        owner, else NotFound), are deleted with their messages if ``cascade``, or else are
        left in no folder; each moved session gets a new version. Returns how many live
        sessions were moved or deleted. Raises NotFound if the folder does not exist."""

    # --- expiry ------------------------------------------------------------------------

    @abstractmethod
    async def purge_expired(
        self, tenant: str | None, now: float, limit: int
    ) -> list[tuple[str, str]]:
        """Delete up to ``limit`` expired sessions (of ``tenant``, or of every tenant if
        None) with their messages, in as few writes as the engine allows. Returns the
        ``(tenant, session id)`` of each session it deleted (the ``expired`` hooks' ids);
        a session that vanished before this call is not among them."""

    # --- transfer: export, import, migrate, backup ------------------------------------
    # These hooks serve copying a store whole. Reads here renew nothing: an export or a
    # migration never changes its source.

    @abstractmethod
    async def list_tenants(self, now: float) -> list[str]:
        """Every tenant that has a live session or a folder, sorted."""

    @abstractmethod
    async def export_session(
        self, tenant: str, session_id: str, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]] | None:
        """The live session with its state and every message, oldest first, read as one
        consistent snapshot; None if it is absent. Renews nothing."""

    @abstractmethod
    async def load_session(
        self, record: SessionRecord, messages: list[MessageRecord], now: float, replace: bool
    ) -> bool:
        """Write a session exactly as given (id, version, timestamps, expiry, aggregates,
        ``last_seq``, state) with exactly ``messages`` (seqs kept, gaps too), atomically.

        An expired session with the id is replaced. A live one is kept and False returned,
        unless ``replace``, when it and its messages are replaced. Returns True when the
        session was written. Raises NotFound if ``record.folder`` is not a folder of
        ``record.owner``.
        """

    @abstractmethod
    async def load_folder(self, record: FolderRecord, replace: bool) -> bool:
        """Store a folder with its own id and ``created_at``. One with the id is kept and
        False returned, unless ``replace``, when its owner and name are overwritten.
        Raises AlreadyExists if another folder of the owner has the name."""

    # --- check, repair and doctor -----------------------------------------------------

    @abstractmethod
    async def check(self, tenant: str | None, now: float, repair: bool) -> CheckReport:
        """Find (and with ``repair`` fix) damage in the storage of ``tenant``, or of every
        tenant if None, a batch of sessions at a time, never every message at once.

        ``aggregates``: a session whose counts, sums or ``last_seq`` disagree with its
        messages; repair recomputes them from the messages (``last_seq`` never goes down)
        and gives the session a new version. ``seq_gaps``: reported only. ``orphan_messages``
        (messages of no session): repair deletes them. ``missing_folder``: a session whose
        folder does not exist; repair clears its folder and keeps the session.
        ``dangling_index``: an index entry of no session; repair removes it. ``totals``:
        a row of the SQL engines' per-owner totals (which stats read) that disagrees with
        the sessions; repair recomputes the tenant's totals from its sessions.
        ``quarantined_file``: reported only. Each repair is atomic per session and
        re-checks the damage inside its write, so a concurrent write is never undone.
        Expired sessions are checked too: purge has not removed them yet."""

    @abstractmethod
    async def doctor(self, now: float) -> DoctorReport:
        """The engine's versions, durability settings, sizes, counts, missing indexes,
        schema version, and warnings that each say what to change. Changes nothing."""

    # --- guards: rate limits, failed logins, budgets ----------------------------------
    # A guard is a small JSON value under an opaque key of a tenant, with an expiry. Keys
    # are any printable text (``rate:``, ``login:`` or ``budget:`` and up to 300 more
    # characters): an engine that names files after them hashes them first.

    @abstractmethod
    async def update_guard(self, tenant: str, key: str, update: GuardUpdate[T], now: float) -> T:
        """Run ``update`` on the guard's value (None if absent or expired at ``now``) and
        store the value it returns (None deletes the guard) with the expiry it returns,
        atomically: concurrent updates of one key, from any process, never interleave.
        Returns what ``update`` returned. ``update`` is pure and may run more than once."""

    @abstractmethod
    async def get_guard(self, tenant: str, key: str, now: float) -> str | None:
        """The guard's value, or None if it is absent or expired."""

    @abstractmethod
    async def list_guards(self, tenant: str, prefix: str, now: float) -> list[GuardRecord]:
        """Every live guard of ``tenant`` whose key starts with ``prefix``, by key."""

    async def rate_hit(
        self, tenant: str, key: str, limit: int, window: float, cost: int, now: float
    ) -> tuple[bool, int, float, float]:
        """A hit of weight ``cost`` on the sliding-window log ``key`` (``rules.rate_hit``),
        atomically. Returns whether it was admitted, the hits now in the window, and the
        seconds until it would be admitted and until the window is empty. Engines with a
        faster atomic path than ``update_guard`` override it, keeping these semantics."""

        def update(
            value: str | None,
        ) -> tuple[str | None, float | None, tuple[bool, int, float, float]]:
            hits, allowed, retry_after = rules.rate_hit(value, limit, window, cost, now)
            if not hits:
                return None, None, (allowed, 0, retry_after, 0.0)
            ends = hits[-1] + window
            return orjson.dumps(hits).decode(), ends, (allowed, len(hits), retry_after, ends - now)

        return await self.update_guard(tenant, key, update, now)

    # --- analytics: daily counters -----------------------------------------------------

    @abstractmethod
    async def add_daily(self, tenant: str, rows: list[DailyRecord], replace: bool = False) -> None:
        """Add each row's counters to the stored counters of its (day, owner), creating
        them at zero first, atomically: concurrent adds, from any process, all count.
        ``rows`` come sorted by (day, owner), so writers take row locks in one order.
        ``replace``: set the counters to the rows' instead (a migration copying them)."""

    @abstractmethod
    async def read_daily(
        self,
        tenant: str,
        first: int,
        last: int,
        owner: str | None,
        owner_set: bool,
        group_by: str = "day",
    ) -> list[DailyRecord]:
        """The stored counters of days ``first`` to ``last`` (included), of ``owner``
        only if ``owner_set``, in any order. Costs the rows read, never the sessions.

        Rows are per day, or, where the engine sums in storage, per ``group_by`` period
        ("week": ISO weeks from Monday; "month") and owner, dated by the period's first
        day (``analytics.summarize`` takes both)."""

    @abstractmethod
    async def session_owners(self, tenant: str, session_ids: list[str]) -> dict[str, str | None]:
        """The owner of each of these sessions the engine holds (expired ones too), in as
        few reads as it can; absent sessions are left out. Renews nothing."""
