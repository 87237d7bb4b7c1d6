"""SessionStore: the public async API, holding the rules over one storage engine.

The store validates every input (naming the field on failure), computes ids and expiry,
scopes every call to its tenant, and turns engine records into models. It never speaks
SQL or Redis: that is the engine's job.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import ValidationError

from . import guards, rules
from .analytics import GROUPINGS, Analytics, Grouping, Ledger, day_of, periods_of, summarize
from .clock import Clock, SystemClock
from .engines.base import Engine
from .engines.urls import engine_from_url
from .errors import (
    BackendUnavailable,
    InvalidInput,
    LockedOut,
    NotFound,
    RateLimited,
    VersionConflict,
)
from .models import (
    PERIODS,
    STATUSES,
    UNSET,
    BudgetUsage,
    Change,
    ChangeResult,
    Folder,
    FolderRecord,
    LoginStatus,
    Message,
    MessageDraft,
    MessageIn,
    MessageRecord,
    Page,
    RateLimitResult,
    Session,
    SessionQuery,
    SessionRecord,
    SessionSummary,
    Stats,
    Status,
    Unset,
)
from .settings import Settings

__all__ = [
    "HOOK_EVENTS",
    "Hook",
    "HookEvent",
    "LoadOutcome",
    "MessageLike",
    "OrderBy",
    "SessionEvent",
    "SessionStore",
    "open_store",
]

MessageLike = MessageIn | Mapping[str, Any]
OrderBy = Literal["created_at", "updated_at"]
#: What ``load_session`` did: wrote the copy, kept the live session with its id, or
#: wrote nothing because the copy has expired.
LoadOutcome = Literal["loaded", "kept", "expired"]

#: The events change hooks are called on.
HookEvent = Literal["created", "completed", "expired", "deleted"]
HOOK_EVENTS: tuple[HookEvent, ...] = ("created", "completed", "expired", "deleted")

_MESSAGE_FIELDS = frozenset(MessageIn.model_fields)
_MAX_NAME = 256
_MAX_ANALYTICS_DAYS = 3_660  # ten years of days in one read
_MAX_ACTIVE_HOURS = 24 * 366
_MAX_OWNER_ROWS = 10_000  # owners by cost in one analytics answer
_EPOCH = date(1970, 1, 1)
# The guard where creates of one owner reserve a place while max_sessions_per_owner is
# checked, and how long a reservation of a process that died on the way is honoured.
_OWNER_SLOTS = "slots:"
_SLOT_LEASE = 60.0

_log = logging.getLogger("sessionkeeper.hooks")


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What a change hook is called with, after the write it reports has landed.

    ``session`` is the session after the write for ``created`` and ``completed``, as it
    was last listed for ``expired``, and None for ``deleted``.
    """

    event: HookEvent
    tenant: str
    session_id: str
    at: datetime
    session: SessionSummary | None = None


#: A change hook: a function or a coroutine function of one SessionEvent.
Hook = Callable[[SessionEvent], Awaitable[None] | None]


def open_store(
    url: str | None = None,
    *,
    tenant: str | None = None,
    settings: Settings | None = None,
    clock: Clock | None = None,
) -> SessionStore:
    """A store for ``url`` (default: the ``SESSIONKEEPER_URL`` setting), not yet opened.

    Use it as ``async with open_store("sqlite:///sessions.db") as store: ...``.
    """
    if settings is None:
        try:
            settings = Settings()
        except ValidationError as exc:
            error = exc.errors()[0]
            name = f"SESSIONKEEPER_{'_'.join(str(p) for p in error['loc']).upper()}"
            raise InvalidInput(name, error["msg"]) from None
    engine = engine_from_url(url or settings.url, settings)
    return SessionStore(engine, tenant=tenant, settings=settings, clock=clock, owns_engine=True)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _seconds(value: object, field: str) -> float | None:
    """A duration given as seconds or a timedelta; must be positive."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, f"must be seconds or a timedelta, not {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise InvalidInput(field, "must be a positive, finite number of seconds")
    return float(value)


def _timestamp(value: object, field: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(field, f"must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None:
        raise InvalidInput(field, "must be timezone-aware (for example datetime.now(UTC))")
    return value.timestamp()


def _int(value: object, field: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"must be an integer, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"from {low} to {high}"
        raise InvalidInput(field, f"must be {bound}, not {value}")
    return value


def _text(value: object, field: str, max_length: int, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, not {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise InvalidInput(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidInput(field, f"is {len(value)} characters, over the limit of {max_length}")
    if not value.isprintable():
        raise InvalidInput(field, "must not contain control characters")
    return value


def _optional_text(value: object, field: str, max_length: int) -> str | None:
    return None if value is None else _text(value, field, max_length)


def _cost(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, f"must be a number, not {type(value).__name__}")
    if not 0 <= value < float("inf"):
        raise InvalidInput(field, "must be a finite number, 0 or more")
    return float(value)


def _instant(value: object, field: str) -> float:
    """A point in time as Unix seconds (records carry floats, files may carry integers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, f"must be Unix seconds, a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidInput(field, "must be a finite number of Unix seconds")
    return float(value)


def _parsed(text: object, field: str) -> Any:
    """The value of stored JSON text; InvalidInput if it is not JSON text."""
    if not isinstance(text, str):
        raise InvalidInput(field, f"must be JSON text, not {type(text).__name__}")
    try:
        return rules.decode_json(text)
    except ValueError:
        raise InvalidInput(field, "is not valid JSON text") from None


def _backup_problem(target: Path, database: Path) -> str | None:
    """What is wrong with ``target`` as the file a backup of ``database`` goes to."""
    if not target.parent.is_dir():
        return f"the folder {str(target.parent)!r} does not exist"
    if target.is_dir():
        return f"{str(target)!r} is a folder: name a file"
    if target.resolve() == database.resolve():
        return "is the database itself: name another file"
    return None


def _live_slots(value: str | None, now: float) -> dict[str, float]:
    """The reservations of an owner's slot guard that are still within their lease."""
    slots: dict[str, float] = {} if value is None else rules.decode_json(value)
    return {token: at for token, at in slots.items() if at > now - _SLOT_LEASE}


def _slot_value(slots: dict[str, float], now: float) -> tuple[str | None, float | None]:
    if not slots:
        return None, None
    return rules.encode_json(slots, "slots", 1 << 30, 2), now + _SLOT_LEASE


def _reserve_slot(
    token: str, now: float
) -> Callable[[str | None], tuple[str | None, float | None, int]]:
    """A guard update that adds the reservation ``token`` and returns how many other
    creates of the owner hold one."""

    def update(value: str | None) -> tuple[str | None, float | None, int]:
        slots = _live_slots(value, now)
        others = len(slots)
        slots[token] = now
        return *_slot_value(slots, now), others

    return update


def _release_slot(
    token: str, now: float
) -> Callable[[str | None], tuple[str | None, float | None, None]]:
    def update(value: str | None) -> tuple[str | None, float | None, None]:
        slots = _live_slots(value, now)
        slots.pop(token, None)
        return *_slot_value(slots, now), None

    return update


def _folder_id(record: FolderRecord) -> str:
    return record.id


def _version(value: object) -> int | None:
    return None if value is None else _int(value, "expected_version", 1)


def _status(value: object) -> str:
    if value not in STATUSES:
        raise InvalidInput("status", f"must be one of {', '.join(STATUSES)}, not {value!r}")
    return str(value)


# --- records to models ------------------------------------------------------------------
# Records come from our own engines, so the models' validators only copy them: the
# pydantic-core validator is the fastest documented way to build a model from a dict.

_validate_session = Session.__pydantic_validator__.validate_python
_validate_summary = SessionSummary.__pydantic_validator__.validate_python
_validate_message = Message.__pydantic_validator__.validate_python
_SCALARS = (str, int, float, bool, type(None))


def _load_object(text: str) -> dict[str, Any]:
    loaded: dict[str, Any] = {} if text == "{}" else rules.decode_json(text)
    return loaded


def _summary_fields(r: SessionRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "tenant": r.tenant,
        "owner": r.owner,
        "folder": r.folder,
        "title": r.title,
        "status": r.status,
        "step": r.step,
        "metadata": _load_object(r.metadata),
        "version": r.version,
        "created_at": _utc(r.created_at),
        "updated_at": _utc(r.updated_at),
        "expires_at": None if r.expires_at is None else _utc(r.expires_at),
        "idle_ttl": r.idle_ttl,
        "message_count": r.message_count,
        "last_seq": r.last_seq,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cost": r.cost,
    }


def _session(record: SessionRecord) -> Session:
    fields = _summary_fields(record)
    fields["state"] = _load_object(record.state) if record.state is not None else {}
    session: Session = _validate_session(fields)
    return session


def _summary(record: SessionRecord) -> SessionSummary:
    summary: SessionSummary = _validate_summary(_summary_fields(record))
    return summary


def _message(r: MessageRecord, content: Any = None, has_content: bool = False) -> Message:
    """A Message from a record; ``content`` may be passed when the caller still holds it."""
    message: Message = _validate_message(
        {
            "session_id": r.session_id,
            "seq": r.seq,
            "role": r.role,
            "content": content if has_content else rules.decode_json(r.content),
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "cost": r.cost,
            "metadata": _load_object(r.metadata),
            "created_at": _utc(r.created_at),
        }
    )
    return message


def _folder(r: FolderRecord) -> Folder:
    return Folder(
        id=r.id,
        tenant=r.tenant,
        owner=r.owner,
        name=r.name,
        created_at=_utc(r.created_at),
        session_count=r.session_count,
    )


class SessionStore:
    """Sessions, messages and folders of one tenant, over one engine.

    ``for_tenant`` gives a view of another tenant over the same engine. A store made by
    ``open_store`` owns its engine and closes it; one made around an injected engine
    leaves it open.
    """

    __slots__ = (
        "_clock",
        "_engine",
        "_guarded",
        "_hooks",
        "_ledger",
        "_open",
        "_owns_engine",
        "settings",
        "tenant",
    )

    def __init__(
        self,
        engine: Engine,
        *,
        tenant: str | None = None,
        settings: Settings | None = None,
        clock: Clock | None = None,
        owns_engine: bool = False,
    ) -> None:
        self.settings = settings or Settings()
        self.tenant = rules.check_id(tenant or self.settings.tenant, "tenant")
        self._engine = engine
        self._clock = clock or SystemClock()
        self._owns_engine = owns_engine
        # whether appends pass guards (a message rate or budgets) before they write
        self._guarded = (
            self.settings.session_message_limit is not None or self.settings.budgets_enforced
        )
        self._open = [False]  # shared with tenant views, so closing one closes them all
        # change hooks by event, shared with tenant views too
        self._hooks: dict[str, list[Hook]] = {event: [] for event in HOOK_EVENTS}
        # figures counted and not yet written (analytics.py), shared with tenant views too
        self._ledger = (
            Ledger(engine, self._clock, self.settings.analytics_flush_interval)
            if self.settings.analytics
            else None
        )

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if not self._open[0]:
            raise BackendUnavailable("the store is not open: use `async with open_store(...)`")
        return self._engine

    async def open(self) -> Self:
        if not self._open[0]:
            if self._owns_engine:
                await self._engine.open()
            self._open[0] = True
        return self

    async def close(self) -> None:
        if self._open[0]:
            if self._ledger is not None:
                try:
                    await self._ledger.close()
                except Exception:  # the engine is down: close anyway
                    _log.warning("analytics figures not written at close", exc_info=True)
            self._open[0] = False
            if self._owns_engine:
                await self._engine.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def for_tenant(self, tenant: str) -> SessionStore:
        """A view of ``tenant`` over the same engine; it sees nothing of other tenants."""
        view = SessionStore(self._engine, tenant=tenant, settings=self.settings, clock=self._clock)
        view._open = self._open
        view._hooks = self._hooks
        view._ledger = self._ledger
        return view

    @property
    def clock(self) -> Clock:
        """Where the store's time comes from (maintenance computes its cutoffs with it)."""
        return self._clock

    def _now(self) -> float:
        return self._clock.now()

    # --- change hooks ------------------------------------------------------------------

    def on(self, event: HookEvent, callback: Hook) -> Callable[[], None]:
        """Call ``callback(SessionEvent)`` after every ``event`` of this store and its
        tenant views: ``created``, ``completed`` (the status became completed),
        ``expired`` (its time to live ran out and ``purge_expired`` or the sweeper
        removed it, or the sweeper's ``max_session_age`` ended it) or ``deleted``.

        Hooks run after the write landed, in the order they were added, before the call
        that wrote returns; a coroutine function is awaited. An exception in a hook is
        logged (``sessionkeeper.hooks``) and never undoes or fails the write. Returns a
        function that removes the hook.
        """
        if event not in HOOK_EVENTS:
            raise InvalidInput("event", f"must be one of {', '.join(HOOK_EVENTS)}, not {event!r}")
        if not callable(callback):
            raise InvalidInput("callback", "must be a function or a coroutine function")
        hooks = self._hooks[event]
        hooks.append(callback)

        def remove() -> None:
            if callback in hooks:
                hooks.remove(callback)

        return remove

    async def _fire(
        self, event: HookEvent, session_id: str, session: SessionSummary | None = None
    ) -> None:
        payload = SessionEvent(event, self.tenant, session_id, _utc(self._now()), session)
        for callback in tuple(self._hooks[event]):
            try:
                result = callback(payload)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                _log.exception(
                    "a %r hook failed for session %r of tenant %r",
                    event,
                    session_id,
                    self.tenant,
                )

    # --- validation --------------------------------------------------------------------

    def _json_object(self, value: object, field: str, max_bytes: int) -> str:
        if not isinstance(value, dict):
            raise InvalidInput(field, f"must be a JSON object, not {type(value).__name__}")
        return rules.encode_json(value, field, max_bytes, self.settings.max_depth)

    def _drafts(self, messages: Sequence[MessageLike], field: str) -> list[MessageDraft]:
        if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
            raise InvalidInput(field, "must be a list of messages")
        limit = self.settings.max_messages_per_append
        if len(messages) > limit:
            raise InvalidInput(field, f"has {len(messages)} messages, over the limit of {limit}")
        return [self._draft_of(m, f"{field}[{i}]") for i, m in enumerate(messages)]

    def _draft_of(self, message: MessageLike, field: str) -> MessageDraft:
        if isinstance(message, MessageIn):
            fields = message.model_dump()
        elif isinstance(message, Mapping):
            fields = dict(message)
            unknown = sorted(set(fields) - _MESSAGE_FIELDS, key=str)
            if unknown:
                raise InvalidInput(f"{field}.{unknown[0]}", "is not a message field")
            if "role" not in fields:
                raise InvalidInput(f"{field}.role", "is required")
        else:
            raise InvalidInput(field, f"must be a message, not {type(message).__name__}")
        return self._draft(
            fields["role"],
            fields.get("content"),
            fields.get("input_tokens", 0),
            fields.get("output_tokens", 0),
            fields.get("cost", 0.0),
            fields.get("metadata"),
            field,
        )

    def _draft(
        self,
        role: object,
        content: object,
        input_tokens: object,
        output_tokens: object,
        cost: object,
        metadata: object,
        field: str,
    ) -> MessageDraft:
        """Validate one message; ``field`` prefixes the names in errors ("" for none)."""
        prefix = f"{field}." if field else ""
        max_bytes = self.settings.max_message_bytes
        content_json = rules.encode_json(
            content, f"{prefix}content", max_bytes, self.settings.max_depth
        )
        return MessageDraft(
            role=_text(role, f"{prefix}role", 64),
            content=content_json,
            input_tokens=_int(input_tokens, f"{prefix}input_tokens", 0),
            output_tokens=_int(output_tokens, f"{prefix}output_tokens", 0),
            cost=_cost(cost, f"{prefix}cost"),
            metadata="{}"
            if metadata is None
            else self._json_object(metadata, f"{prefix}metadata", max_bytes - len(content_json)),
        )

    def _session_id(self, session_id: object) -> str:
        return rules.check_id(session_id, "session_id")

    def _query(
        self,
        owner: str | Unset | None,
        folder: str | Unset | None,
        status: Status | None,
        created_since: datetime | None,
        created_before: datetime | None,
        updated_since: datetime | None,
        updated_before: datetime | None,
        title_contains: str | None,
        order_by: OrderBy = "created_at",
        descending: bool = True,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionQuery:
        if order_by not in ("created_at", "updated_at"):
            raise InvalidInput("order_by", f"must be created_at or updated_at, not {order_by!r}")
        if not isinstance(descending, bool):
            raise InvalidInput("descending", "must be true or false")
        after_key = after_id = None
        if cursor is not None:
            if not isinstance(cursor, str):
                raise InvalidInput("cursor", "must be a string")
            after_key, after_id = rules.decode_cursor(cursor, order_by, descending)
        return SessionQuery(
            owner=None if owner is UNSET else _optional_text(owner, "owner", _MAX_NAME),
            owner_set=owner is not UNSET,
            folder=None if folder is UNSET else self._optional_id(folder, "folder"),
            folder_set=folder is not UNSET,
            status=None if status is None else _status(status),
            created_since=_timestamp(created_since, "created_since"),
            created_before=_timestamp(created_before, "created_before"),
            updated_since=_timestamp(updated_since, "updated_since"),
            updated_before=_timestamp(updated_before, "updated_before"),
            title_contains=None
            if title_contains is None
            else rules.ascii_lower(_text(title_contains, "title_contains", _MAX_NAME)),
            order_by=order_by,
            descending=descending,
            limit=_int(limit, "limit", 1, self.settings.max_page_size),
            after_key=after_key,
            after_id=after_id,
        )

    def _optional_id(self, value: object, field: str) -> str | None:
        return None if value is None else rules.check_id(value, field)

    # --- sessions ----------------------------------------------------------------------

    async def create_session(
        self,
        *,
        session_id: str | None = None,
        owner: str | None = None,
        folder: str | None = None,
        title: str = "",
        status: Status = "active",
        step: str | None = None,
        state: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        ttl: float | timedelta | None = None,
        idle_ttl: float | timedelta | None = None,
    ) -> Session:
        """Create a session; its id is generated unless given. Raises AlreadyExists."""
        settings = self.settings
        now = self._now()
        ttl_seconds = _seconds(ttl, "ttl")
        idle_seconds = _seconds(idle_ttl, "idle_ttl")
        if ttl is None:
            ttl_seconds = settings.default_ttl
        if idle_ttl is None:
            idle_seconds = settings.default_idle_ttl
        expires_at, deadline = rules.initial_expiry(
            now, ttl_seconds, idle_seconds, settings.max_ttl
        )
        record = SessionRecord(
            tenant=self.tenant,
            id=rules.new_id() if session_id is None else self._session_id(session_id),
            owner=_optional_text(owner, "owner", _MAX_NAME),
            folder=self._optional_id(folder, "folder"),
            title=_text(title, "title", settings.max_title_length, empty_ok=True),
            status=_status(status),
            step=_optional_text(step, "step", _MAX_NAME),
            metadata=self._json_object(
                {} if metadata is None else metadata, "metadata", settings.max_metadata_bytes
            ),
            state=self._json_object(
                {} if state is None else state, "state", settings.max_state_bytes
            ),
            version=1,
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            idle_ttl=idle_seconds,
            deadline=deadline,
        )
        limit = settings.max_sessions_per_owner
        if limit is not None and record.owner is not None:
            await self._insert_within_limit(record, limit, now)
        else:
            await self.engine.insert_session(record, now)
        if self._ledger is not None:
            self._ledger.created(self.tenant, record.owner)
        session = _session(record)
        if self._hooks["created"]:
            await self._fire("created", record.id, session)
        return session

    async def _insert_within_limit(self, record: SessionRecord, limit: int, now: float) -> None:
        """Insert a session of an owner unless it has ``limit`` live sessions already.

        Counting and inserting are two steps, so each create first reserves a place in a
        guard of the owner (atomic on every engine) and counts the creates of other
        processes that hold one as sessions: concurrent creates can never pass the limit,
        though near it one may be refused that would have fit.
        """
        owner = record.owner
        key = f"{_OWNER_SLOTS}{owner}"
        token = rules.new_id()
        engine = self.engine
        others = await engine.update_guard(self.tenant, key, _reserve_slot(token, now), now)
        try:
            query = SessionQuery(owner=owner, owner_set=True)
            count = await engine.count_sessions(self.tenant, query, now)
            if count + others >= limit:
                pending = f" and {others} more being created" if others else ""
                raise InvalidInput(
                    "owner",
                    f"{owner!r} has {count} sessions{pending}; max_sessions_per_owner allows "
                    f"{limit}: delete or archive some of them first",
                )
            await engine.insert_session(record, now)
        finally:
            await engine.update_guard(self.tenant, key, _release_slot(token, now), now)

    async def get_session(self, session_id: str) -> Session:
        """The session with its state. Raises NotFound if absent or expired."""
        record = await self.engine.get_session(
            self.tenant, self._session_id(session_id), self._now()
        )
        if record is None:
            raise NotFound(f"no session {session_id!r}")
        return _session(record)

    async def delete_session(self, session_id: str, *, expected_version: int | None = None) -> None:
        """Delete a session and its messages. Raises NotFound or VersionConflict."""
        sid = self._session_id(session_id)
        await self.engine.delete_session(self.tenant, sid, self._now(), _version(expected_version))
        if self._hooks["deleted"]:
            await self._fire("deleted", sid)

    async def expire_session(
        self,
        session_id: str,
        *,
        expected_version: int | None = None,
        last_seen: SessionSummary | None = None,
    ) -> None:
        """Delete a session that a lifetime policy ended (the sweeper's
        ``max_session_age``): as ``delete_session``, but the ``expired`` hooks fire, with
        ``last_seen`` (the session as the caller last read it) as their session."""
        sid = self._session_id(session_id)
        await self.engine.delete_session(self.tenant, sid, self._now(), _version(expected_version))
        if self._hooks["expired"]:
            await self._fire("expired", sid, last_seen)

    async def change_session(
        self,
        session_id: str,
        *,
        state_patch: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        title: str | Unset = UNSET,
        owner: str | Unset | None = UNSET,
        folder: str | Unset | None = UNSET,
        status: Status | Unset = UNSET,
        step: str | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        messages: Sequence[MessageLike] = (),
        expected_version: int | None = None,
    ) -> ChangeResult:
        """One atomic change: patch or replace state, set fields, append messages.

        All of it lands, under one new version, or none of it does. ``state_patch`` is an
        RFC 7396 JSON Merge Patch; ``state`` replaces the state whole.
        """
        settings = self.settings
        sid = self._session_id(session_id)
        change = Change(
            expected_version=_version(expected_version),
            max_state_bytes=settings.max_state_bytes,
            max_depth=settings.max_depth,
        )
        if state is not None and state_patch is not None:
            raise InvalidInput("state", "give either state or state_patch, not both")
        if state is not None:
            change.state = self._json_object(state, "state", settings.max_state_bytes)
        if state_patch is not None:
            self._json_object(state_patch, "state_patch", settings.max_state_bytes)
            change.state_patch = state_patch
            change.has_state_patch = True
        fields = change.fields
        if title is not UNSET:
            fields["title"] = _text(title, "title", settings.max_title_length, empty_ok=True)
        if owner is not UNSET:
            fields["owner"] = _optional_text(owner, "owner", _MAX_NAME)
        if folder is not UNSET:
            fields["folder"] = self._optional_id(folder, "folder")
        if status is not UNSET:
            fields["status"] = _status(status)
        if step is not UNSET:
            fields["step"] = _optional_text(step, "step", _MAX_NAME)
        if metadata is not UNSET:
            fields["metadata"] = self._json_object(
                metadata, "metadata", settings.max_metadata_bytes
            )
        change.messages = self._drafts(messages, "messages") if messages else []
        # who completes a session is known only from the version the change was made at
        ledger = self._ledger
        completing = fields.get("status") == "completed" and (
            bool(self._hooks["completed"]) or ledger is not None
        )
        now = self._now()
        completed = False
        if self._guarded and change.messages:
            taken = await self._pass_guards(sid, change.messages, now)
            try:
                if completing:
                    record, appended, completed = await self._complete(sid, change)
                else:
                    record, appended = await self.engine.change_session(
                        self.tenant, sid, change, now
                    )
            except BaseException:
                await guards.refund(self.engine, self.tenant, self.settings, taken, now)
                raise
        elif completing:
            record, appended, completed = await self._complete(sid, change)
        else:
            record, appended = await self.engine.change_session(self.tenant, sid, change, now)
        result = ChangeResult.model_construct(
            session=_session(record), messages=[_message(m) for m in appended]
        )
        if ledger is not None:
            if change.messages:
                ledger.appended(self.tenant, sid, change.messages)
            if completed:
                ledger.completed(self.tenant, record.owner, record.message_count)
        if completed:
            await self._fire("completed", sid, result.session)
        return result

    async def _complete(
        self, sid: str, change: Change
    ) -> tuple[SessionRecord, list[MessageRecord], bool]:
        """Apply a change that sets status completed, and say whether it is the one that
        completed the session: the change is pinned to the version read just before it,
        so of concurrent completions (from any process) exactly one saw another status.
        Without an ``expected_version`` of the caller's, a pin that went stale is read
        again and the change retried, as the unpinned change would have landed."""
        given = change.expected_version
        while True:
            now = self._now()
            before = await self.engine.get_session(self.tenant, sid, now)
            if before is None:
                raise NotFound(f"no session {sid!r}")
            if given is not None and before.version != given:
                raise VersionConflict(sid, given, before.version)
            change.expected_version = before.version
            try:
                record, appended = await self.engine.change_session(self.tenant, sid, change, now)
            except VersionConflict:
                if given is not None:
                    raise
                continue
            return record, appended, before.status != "completed"

    async def update_session(
        self,
        session_id: str,
        *,
        title: str | Unset = UNSET,
        owner: str | Unset | None = UNSET,
        folder: str | Unset | None = UNSET,
        status: Status | Unset = UNSET,
        step: str | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        expected_version: int | None = None,
    ) -> Session:
        """Set title, owner, folder, status, step or metadata; fields left UNSET stay."""
        result = await self.change_session(
            session_id,
            title=title,
            owner=owner,
            folder=folder,
            status=status,
            step=step,
            metadata=metadata,
            expected_version=expected_version,
        )
        return result.session

    async def update_state(
        self,
        session_id: str,
        patch: dict[str, Any],
        *,
        replace: bool = False,
        expected_version: int | None = None,
    ) -> Session:
        """Apply a JSON Merge Patch to the state, or replace it whole if ``replace``."""
        if not isinstance(patch, dict):
            raise InvalidInput("patch", f"must be a JSON object, not {type(patch).__name__}")
        if replace:
            result = await self.change_session(
                session_id, state=patch, expected_version=expected_version
            )
        else:
            result = await self.change_session(
                session_id, state_patch=patch, expected_version=expected_version
            )
        return result.session

    # --- messages ----------------------------------------------------------------------

    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[MessageLike],
        *,
        expected_version: int | None = None,
    ) -> list[Message]:
        """Append messages in order; the engine gives them the next seqs, with no gap."""
        sid = self._session_id(session_id)
        drafts = self._drafts(messages, "messages")
        if not drafts:
            raise InvalidInput("messages", "must hold at least one message")
        appended = await self._append(sid, drafts, _version(expected_version))
        return [_message(m) for m in appended]

    async def append_message(
        self,
        session_id: str,
        role: str,
        content: Any,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost: float = 0.0,
        metadata: dict[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> Message:
        """Append one message and return it with its seq."""
        sid = self._session_id(session_id)
        draft = self._draft(role, content, input_tokens, output_tokens, cost, metadata, "")
        (appended,) = await self._append(sid, [draft], _version(expected_version))
        return _message(appended, content, isinstance(content, _SCALARS))

    async def _append(
        self, sid: str, drafts: list[MessageDraft], expected_version: int | None
    ) -> list[MessageRecord]:
        now = self._now()
        if not self._guarded:
            appended = await self.engine.append_messages(
                self.tenant, sid, drafts, now, expected_version
            )
        else:
            taken = await self._pass_guards(sid, drafts, now)
            try:
                appended = await self.engine.append_messages(
                    self.tenant, sid, drafts, now, expected_version
                )
            except BaseException:
                await guards.refund(self.engine, self.tenant, self.settings, taken, now)
                raise
        if self._ledger is not None:
            self._ledger.appended(self.tenant, sid, drafts)
        return appended

    async def _pass_guards(
        self, sid: str, drafts: list[MessageDraft], now: float
    ) -> list[guards.Reservation]:
        """Check the session's message rate, then reserve the drafts' tokens and cost in
        the budgets. Raises RateLimited, BudgetExceeded or NotFound having written nothing
        but the rate limit's count of the attempt."""
        settings = self.settings
        limit = settings.session_message_limit
        if limit is not None:
            if len(drafts) > limit:
                raise InvalidInput(
                    "messages", f"more than the {limit} messages a session may get per window"
                )
            window = settings.session_message_window
            key = f"{guards.RATE}messages:{sid}"
            allowed, _, retry_after, _ = await self.engine.rate_hit(
                self.tenant, key, limit, window, len(drafts), now
            )
            if not allowed:
                raise RateLimited(f"messages:{sid}", limit, window, retry_after)
        if not settings.budgets_enforced:
            return []
        record = await self.engine.get_session(self.tenant, sid, now)
        if record is None:
            raise NotFound(f"no session {sid!r}")
        return await guards.reserve(
            self.engine, self.tenant, settings, record.owner, sid, drafts, now
        )

    async def read_messages(
        self, session_id: str, *, after_seq: int = 0, limit: int = 100
    ) -> list[Message]:
        """Up to ``limit`` messages with seq above ``after_seq``, oldest first.

        Page through a history by passing the last seq you got as ``after_seq``.
        """
        records = await self.engine.read_messages(
            self.tenant,
            self._session_id(session_id),
            self._now(),
            _int(after_seq, "after_seq", 0),
            _int(limit, "limit", 1, self.settings.max_page_size),
        )
        if records is None:
            raise NotFound(f"no session {session_id!r}")
        return [_message(m) for m in records]

    async def last_messages(self, session_id: str, n: int = 10) -> list[Message]:
        """The newest ``n`` messages, oldest first."""
        records = await self.engine.last_messages(
            self.tenant,
            self._session_id(session_id),
            self._now(),
            _int(n, "n", 1, self.settings.max_page_size),
        )
        if records is None:
            raise NotFound(f"no session {session_id!r}")
        return [_message(m) for m in records]

    async def pop_message(
        self, session_id: str, *, expected_version: int | None = None
    ) -> Message | None:
        """Remove and return the newest message, or None if there is none."""
        _, popped = await self.engine.pop_message(
            self.tenant, self._session_id(session_id), self._now(), _version(expected_version)
        )
        return None if popped is None else _message(popped)

    async def clear_messages(self, session_id: str, *, expected_version: int | None = None) -> int:
        """Remove every message and zero the aggregates; seqs are not reused. Returns how
        many were removed."""
        _, removed = await self.engine.clear_messages(
            self.tenant, self._session_id(session_id), self._now(), _version(expected_version)
        )
        return removed

    # --- queries -----------------------------------------------------------------------

    async def list_sessions(
        self,
        *,
        owner: str | Unset | None = UNSET,
        folder: str | Unset | None = UNSET,
        status: Status | None = None,
        created_since: datetime | None = None,
        created_before: datetime | None = None,
        updated_since: datetime | None = None,
        updated_before: datetime | None = None,
        title_contains: str | None = None,
        order_by: OrderBy = "created_at",
        descending: bool = True,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[SessionSummary]:
        """A page of live sessions (without state), newest first unless ``descending`` is
        False. Ranges include ``*_since`` and exclude ``*_before``; ``title_contains``
        ignores ASCII case; pass ``next_cursor`` back as ``cursor`` for the next page."""
        query = self._query(
            owner,
            folder,
            status,
            created_since,
            created_before,
            updated_since,
            updated_before,
            title_contains,
            order_by,
            descending,
            limit,
            cursor,
        )
        wanted = query.limit
        probe = dataclasses.replace(query, limit=wanted + 1)
        records = await self.engine.list_sessions(self.tenant, probe, self._now())
        page = records[:wanted]
        next_cursor = rules.encode_cursor(query, page[-1]) if len(records) > wanted else None
        items = [_summary(r) for r in page]
        return Page[SessionSummary].model_construct(items=items, next_cursor=next_cursor)

    async def count_sessions(
        self,
        *,
        owner: str | Unset | None = UNSET,
        folder: str | Unset | None = UNSET,
        status: Status | None = None,
        created_since: datetime | None = None,
        created_before: datetime | None = None,
        updated_since: datetime | None = None,
        updated_before: datetime | None = None,
        title_contains: str | None = None,
    ) -> int:
        """How many live sessions match the same filters as ``list_sessions``."""
        query = self._query(
            owner,
            folder,
            status,
            created_since,
            created_before,
            updated_since,
            updated_before,
            title_contains,
        )
        return await self.engine.count_sessions(self.tenant, query, self._now())

    async def stats(self, *, top: int = 5, active_hours: float = 24.0) -> Stats:
        """Totals, status counts, sessions updated in the last ``active_hours`` hours,
        completion rate, message, token and cost sums, and the ``top`` owners by session
        count and by cost."""
        hours = active_hours
        if isinstance(hours, bool) or not isinstance(hours, int | float):
            raise InvalidInput("active_hours", f"must be a number, not {type(hours).__name__}")
        if not 0 < hours <= _MAX_ACTIVE_HOURS:
            raise InvalidInput("active_hours", f"must be above 0 and at most {_MAX_ACTIVE_HOURS}")
        now = self._now()
        found = await self.engine.stats(
            self.tenant, now, now - hours * 3_600, _int(top, "top", 0, 100)
        )
        return found.model_copy(update={"active_hours": float(hours)})

    async def flush_analytics(self) -> None:
        """Write the figures this store (and its tenant views) counted and has not written
        yet; ``analytics`` and ``close`` do it too. Raises BackendUnavailable if the
        engine is down, keeping them for the next try."""
        if self._ledger is not None:
            await self._ledger.flush()

    async def analytics(
        self,
        *,
        days: int = 30,
        until: date | None = None,
        group_by: Grouping = "day",
        owner: str | Unset | None = UNSET,
        top: int = 10,
    ) -> Analytics:
        """Sessions created and completed, messages, tokens and cost per day, ISO week or
        month (``group_by``) over the ``days`` UTC days that end with ``until`` (a date, or
        an aware datetime; today by default), of one ``owner`` if given (None: sessions
        without one); with each period's ``top`` owners by cost. Figures are history: a
        session deleted since still counts where it was counted. Reads one counter row per
        day and owner, never a session. This store's figures not yet written are written
        first; other processes' within ``analytics_flush_interval``."""
        if self._ledger is None:
            raise InvalidInput("analytics", "is off in the settings, so nothing was counted")
        span = _int(days, "days", 1, _MAX_ANALYTICS_DAYS)
        if group_by not in GROUPINGS:
            raise InvalidInput(
                "group_by", f"must be one of {', '.join(GROUPINGS)}, not {group_by!r}"
            )
        ranked = _int(top, "top", 0, 1_000)
        if until is None:
            last = day_of(self._now())
        elif isinstance(until, datetime):
            last = day_of(_timestamp(until, "until") or 0.0)
        elif isinstance(until, date):
            last = (until - _EPOCH).days
        else:
            raise InvalidInput("until", f"must be a date or a datetime, not {type(until).__name__}")
        who = None if isinstance(owner, Unset) else _optional_text(owner, "owner", _MAX_NAME)
        first = last - span + 1
        rows_asked = len(periods_of(first, last, group_by)) * ranked
        if rows_asked > _MAX_OWNER_ROWS:
            raise InvalidInput(
                "top",
                f"asks for up to {rows_asked} owner rows ({ranked} a period); at most "
                f"{_MAX_OWNER_ROWS}: ask for fewer days, longer periods or a smaller top",
            )
        await self._ledger.flush()
        rows = await self.engine.read_daily(
            self.tenant, first, last, who, not isinstance(owner, Unset), group_by
        )
        return summarize(rows, first, last, group_by, ranked, who)

    # --- folders -----------------------------------------------------------------------

    async def create_folder(self, name: str, *, owner: str | None = None) -> Folder:
        """Create a folder; names are unique per owner. Raises AlreadyExists."""
        record = FolderRecord(
            tenant=self.tenant,
            id=rules.new_id(),
            owner=_optional_text(owner, "owner", _MAX_NAME),
            name=_text(name, "name", _MAX_NAME),
            created_at=self._now(),
        )
        await self.engine.insert_folder(record)
        return _folder(record)

    async def get_folder(self, folder_id: str) -> Folder:
        """The folder with its count of live sessions. Raises NotFound."""
        record = await self.engine.get_folder(
            self.tenant, rules.check_id(folder_id, "folder_id"), self._now()
        )
        if record is None:
            raise NotFound(f"no folder {folder_id!r}")
        return _folder(record)

    async def rename_folder(self, folder_id: str, name: str) -> Folder:
        """Rename a folder. Raises NotFound, or AlreadyExists if the owner has that name."""
        record = await self.engine.rename_folder(
            self.tenant,
            rules.check_id(folder_id, "folder_id"),
            _text(name, "name", _MAX_NAME),
            self._now(),
        )
        return _folder(record)

    async def list_folders(self, *, owner: str | Unset | None = UNSET) -> list[Folder]:
        """Folders (of ``owner``, if given) by name, each with its count of live sessions."""
        checked = None if owner is UNSET else _optional_text(owner, "owner", _MAX_NAME)
        records = await self.engine.list_folders(
            self.tenant, checked, owner is not UNSET, self._now()
        )
        return [_folder(r) for r in records]

    async def delete_folder(
        self, folder_id: str, *, reassign_to: str | None = None, cascade: bool = False
    ) -> int:
        """Delete a folder. Its sessions move to ``reassign_to``, are deleted if
        ``cascade``, or else are left in no folder. Returns how many sessions it had."""
        if reassign_to is not None and cascade:
            raise InvalidInput("cascade", "give either reassign_to or cascade, not both")
        if not isinstance(cascade, bool):
            raise InvalidInput("cascade", "must be true or false")
        fid = rules.check_id(folder_id, "folder_id")
        target = self._optional_id(reassign_to, "reassign_to")
        if target == fid:
            raise InvalidInput("reassign_to", "must be another folder than the one deleted")
        deleted = 0
        if cascade and self._hooks["deleted"]:
            # the engine deletes a folder's sessions without naming them: delete them one
            # by one first, so that each fires its hook
            deleted = await self._delete_folder_sessions(fid)
        return deleted + await self.engine.delete_folder(
            self.tenant, fid, self._now(), target, cascade
        )

    async def _delete_folder_sessions(self, folder_id: str) -> int:
        deleted = 0
        limit = min(500, self.settings.max_page_size)
        while True:
            page = await self.list_sessions(folder=folder_id, limit=limit)
            if not page.items:
                return deleted
            for session in page.items:
                try:
                    await self.delete_session(session.id)
                except NotFound:  # expired or deleted meanwhile
                    continue
                deleted += 1

    # --- expiry ------------------------------------------------------------------------

    async def purge_expired(
        self, *, batch_size: int | None = None, all_tenants: bool = False
    ) -> int:
        """Delete expired sessions and their messages, batch by batch; returns how many.

        Only this tenant's, unless ``all_tenants`` (for maintenance jobs). The ``expired``
        hooks fire for each session this call deleted, with the session's own tenant.
        """
        size = _int(batch_size or self.settings.purge_batch_size, "batch_size", 1)
        tenant = None if all_tenants else self.tenant
        now = self._now()
        total = 0
        while True:
            purged = await self.engine.purge_expired(tenant, now, size)
            total += len(purged)
            if self._hooks["expired"]:
                for name, sid in purged:
                    view = self if name == self.tenant else self.for_tenant(name)
                    await view._fire("expired", sid)
            if len(purged) < size:
                return total

    # --- guards: rate limits, failed logins, budgets ----------------------------------

    async def hit(self, key: str, limit: int, window: float, *, cost: int = 1) -> RateLimitResult:
        """Count a hit on the rate limit ``key``: at most ``limit`` hits (of weight
        ``cost``) per sliding ``window`` of seconds, exactly. A refused hit counts nothing;
        its result says how long to wait."""
        return await guards.hit(
            self.engine, self.tenant, self.settings, key, limit, window, cost, self._now()
        )

    async def login_failed(
        self, *, ip: str | None = None, account: str | None = None
    ) -> LoginStatus:
        """Record a failed login from the client ``ip`` for ``account`` (either or both);
        returns the worse status of the two, locked when this failure locked it."""
        return await guards.login_failed(
            self.engine, self.tenant, self.settings, ip, account, self._now()
        )

    async def login_succeeded(self, *, ip: str | None = None, account: str | None = None) -> None:
        """A successful login: forget the failures of the client ``ip`` and ``account``."""
        await guards.login_succeeded(self.engine, self.tenant, ip, account, self._now())

    async def login_status(
        self, *, ip: str | None = None, account: str | None = None
    ) -> LoginStatus:
        """The worse login status of the client ``ip`` and ``account``."""
        return await guards.login_status(
            self.engine, self.tenant, self.settings, ip, account, self._now()
        )

    async def check_login(self, *, ip: str | None = None, account: str | None = None) -> None:
        """Raise LockedOut if the client ``ip`` or ``account`` is locked out; call it
        before checking a password."""
        status = await self.login_status(ip=ip, account=account)
        if status.locked:
            raise LockedOut(status.who, status.retry_after)

    async def unlock_login(self, *, ip: str | None = None, account: str | None = None) -> int:
        """Lift the lockout and forget the failures of ``ip`` and ``account``; returns how
        many of them had any on record."""
        return await guards.unlock(self.engine, self.tenant, ip, account, self._now())

    async def list_logins(self, *, locked_only: bool = False) -> list[LoginStatus]:
        """Every client and account with failed logins on record, latest failure first."""
        return await guards.list_logins(
            self.engine, self.tenant, self.settings, locked_only, self._now()
        )

    def _budget_scope(
        self, owner: str | None, session_id: str | None
    ) -> tuple[str | None, str | None]:
        if (owner is None) == (session_id is None):
            raise InvalidInput("owner", "give either an owner or a session_id")
        if session_id is not None:
            return None, self._session_id(session_id)
        return _text(owner, "owner", _MAX_NAME), None

    async def set_budget(
        self,
        *,
        owner: str | None = None,
        session_id: str | None = None,
        tokens: int | None = None,
        cost: float | None = None,
        period: str | None = None,
    ) -> BudgetUsage:
        """Give one owner or one session budgets of its own: ``tokens`` (input plus output)
        and ``cost`` per ``period``; what is not given follows the settings. Usage counted
        so far in the period is kept. Appends check budgets when the ``budgets`` setting
        is on or a budget setting is set."""
        owner, sid = self._budget_scope(owner, session_id)
        limits: dict[str, Any] = {}
        if tokens is not None:
            limits["tokens"] = _int(tokens, "tokens", 0)
        if cost is not None:
            limits["cost"] = _cost(cost, "cost")
        if period is not None:
            if period not in PERIODS:
                raise InvalidInput("period", f"must be one of {', '.join(PERIODS)}")
            limits["period"] = period
        return await guards.set_budget(
            self.engine, self.tenant, self.settings, owner, sid, limits, self._now()
        )

    async def budget_usage(
        self, *, owner: str | None = None, session_id: str | None = None
    ) -> BudgetUsage:
        """Tokens and cost used by an owner or a session in the current period, and its
        limits."""
        owner, sid = self._budget_scope(owner, session_id)
        return await guards.budget_usage(
            self.engine, self.tenant, self.settings, owner, sid, self._now()
        )

    # --- transfer: export, import, migrate, backup ------------------------------------
    # These speak records, the exact stored form (Unix-second floats, JSON text, the
    # idle-expiry deadline), so a copy keeps every field. Nothing here renews a session.

    async def list_tenants(self) -> list[str]:
        """Every tenant of the engine that has a live session or a folder, sorted."""
        return await self.engine.list_tenants(self._now())

    async def export_session(self, session_id: str) -> tuple[SessionRecord, list[MessageRecord]]:
        """The session as stored, with its state and every message (oldest first), read
        as one snapshot. Renews nothing. Raises NotFound if absent or expired."""
        found = await self.engine.export_session(
            self.tenant, self._session_id(session_id), self._now()
        )
        if found is None:
            raise NotFound(f"no session {session_id!r}")
        return found

    async def export_folders(self) -> list[FolderRecord]:
        """Every folder of this tenant as stored, by id."""
        records = await self.engine.list_folders(self.tenant, None, False, self._now())
        return sorted(records, key=_folder_id)

    async def load_session(
        self,
        record: SessionRecord,
        messages: Sequence[MessageRecord],
        *,
        replace: bool = False,
        dry_run: bool = False,
    ) -> LoadOutcome:
        """Write a session exactly as given (id, version, timestamps, expiry, aggregates,
        seqs), with its messages, atomically: all of it lands or none of it does.

        Everything is checked first, as for any write: ids, text, JSON limits, seqs
        strictly ascending and at most ``last_seq``, and aggregates that match the
        messages (``message_count`` and tokens exactly, ``cost`` to rounding). JSON text
        is re-encoded compactly. Expiry is kept as given (``max_ttl`` applies to sessions
        this store creates, not to copies). Returns "loaded"; "kept" when a live session
        has the id and ``replace`` is False (nothing written); "expired" when the copy's
        ``expires_at`` has passed (nothing written). ``dry_run`` checks and says what
        would happen without writing. Raises InvalidInput, or NotFound if ``folder`` is
        not a folder of ``owner``.
        """
        if not isinstance(replace, bool):
            raise InvalidInput("replace", "must be true or false")
        checked, checked_messages = self.check_loadable(record, messages)
        now = self._now()
        if rules.is_expired(checked.expires_at, now):
            return "expired"
        if dry_run:
            if replace:
                return "loaded"
            found = await self.engine.export_session(self.tenant, checked.id, now)
            return "loaded" if found is None else "kept"
        written = await self.engine.load_session(checked, checked_messages, now, replace)
        return "loaded" if written else "kept"

    async def load_folder(
        self, record: FolderRecord, *, replace: bool = False, dry_run: bool = False
    ) -> bool:
        """Write a folder with its own id and ``created_at``. Returns False when one with
        the id exists and ``replace`` is False (nothing written). Raises InvalidInput, or
        AlreadyExists if another folder of the owner has the name."""
        if not isinstance(record, FolderRecord):
            raise InvalidInput("record", f"must be a FolderRecord, not {type(record).__name__}")
        if not isinstance(replace, bool):
            raise InvalidInput("replace", "must be true or false")
        self._check_tenant(record.tenant)
        checked = FolderRecord(
            tenant=self.tenant,
            id=rules.check_id(record.id, "id"),
            owner=_optional_text(record.owner, "owner", _MAX_NAME),
            name=_text(record.name, "name", _MAX_NAME),
            created_at=_instant(record.created_at, "created_at"),
        )
        if dry_run:
            found = await self.engine.get_folder(self.tenant, checked.id, self._now())
            return replace or found is None
        return await self.engine.load_folder(checked, replace)

    def _check_tenant(self, tenant: object) -> None:
        if tenant != self.tenant:
            raise InvalidInput(
                "tenant",
                f"is {tenant!r}, but this store is for tenant {self.tenant!r}: "
                f"load it through store.for_tenant({tenant!r})",
            )

    def check_loadable(
        self, record: SessionRecord, messages: Sequence[MessageRecord]
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        """The checks of ``load_session``, without writing: the session and its messages
        as they would be written (JSON re-encoded). Raises InvalidInput."""
        if not isinstance(record, SessionRecord):
            raise InvalidInput("record", f"must be a SessionRecord, not {type(record).__name__}")
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise InvalidInput("messages", "must be a list of MessageRecord")
        settings = self.settings
        self._check_tenant(record.tenant)
        r = record
        sid = rules.check_id(r.id, "id")
        created_at = _instant(r.created_at, "created_at")
        updated_at = _instant(r.updated_at, "updated_at")
        if updated_at < created_at:
            raise InvalidInput("updated_at", "must not be before created_at")
        expires_at = None if r.expires_at is None else _instant(r.expires_at, "expires_at")
        deadline = None if r.deadline is None else _instant(r.deadline, "deadline")
        idle_ttl = None if r.idle_ttl is None else _seconds(r.idle_ttl, "idle_ttl")
        if idle_ttl is None and deadline != expires_at:
            raise InvalidInput("deadline", "must equal expires_at when idle_ttl is null")
        if idle_ttl is not None and expires_at is None:
            raise InvalidInput("expires_at", "must be set when idle_ttl is")
        if deadline is not None and expires_at is not None and expires_at > deadline:
            raise InvalidInput("expires_at", "must not be after deadline")
        checked = SessionRecord(
            tenant=self.tenant,
            id=sid,
            owner=_optional_text(r.owner, "owner", _MAX_NAME),
            folder=self._optional_id(r.folder, "folder"),
            title=_text(r.title, "title", settings.max_title_length, empty_ok=True),
            status=_status(r.status),
            step=_optional_text(r.step, "step", _MAX_NAME),
            metadata=self._json_object_text(r.metadata, "metadata", settings.max_metadata_bytes),
            state=self._json_object_text(r.state, "state", settings.max_state_bytes),
            version=_int(r.version, "version", 1),
            created_at=created_at,
            updated_at=updated_at,
            expires_at=expires_at,
            idle_ttl=idle_ttl,
            deadline=deadline,
            message_count=_int(r.message_count, "message_count", 0),
            last_seq=_int(r.last_seq, "last_seq", 0),
            input_tokens=_int(r.input_tokens, "input_tokens", 0),
            output_tokens=_int(r.output_tokens, "output_tokens", 0),
            cost=_cost(r.cost, "cost"),
        )
        checked_messages = [self._loadable_message(sid, m, i) for i, m in enumerate(messages)]
        self._check_aggregates(checked, checked_messages)
        return checked, checked_messages

    def _loadable_message(self, session_id: str, m: MessageRecord, index: int) -> MessageRecord:
        field = f"messages[{index}]"
        if not isinstance(m, MessageRecord):
            raise InvalidInput(field, f"must be a MessageRecord, not {type(m).__name__}")
        if m.session_id != session_id:
            raise InvalidInput(f"{field}.session_id", f"must be the session's id {session_id!r}")
        max_bytes = self.settings.max_message_bytes
        content = rules.encode_json(
            _parsed(m.content, f"{field}.content"),
            f"{field}.content",
            max_bytes,
            self.settings.max_depth,
        )
        return MessageRecord(
            session_id=session_id,
            seq=_int(m.seq, f"{field}.seq", 1),
            role=_text(m.role, f"{field}.role", 64),
            content=content,
            input_tokens=_int(m.input_tokens, f"{field}.input_tokens", 0),
            output_tokens=_int(m.output_tokens, f"{field}.output_tokens", 0),
            cost=_cost(m.cost, f"{field}.cost"),
            metadata=self._json_object_text(
                m.metadata, f"{field}.metadata", max_bytes - len(content)
            ),
            created_at=_instant(m.created_at, f"{field}.created_at"),
        )

    @staticmethod
    def _check_aggregates(record: SessionRecord, messages: list[MessageRecord]) -> None:
        previous = 0
        for index, m in enumerate(messages):
            if m.seq <= previous:
                raise InvalidInput(
                    f"messages[{index}].seq",
                    f"is {m.seq}, not above the seq before it ({previous}): seqs must ascend",
                )
            previous = m.seq
        if previous > record.last_seq:
            raise InvalidInput(
                "last_seq", f"is {record.last_seq}, below the highest message seq {previous}"
            )
        sums = (
            ("message_count", record.message_count, len(messages)),
            ("input_tokens", record.input_tokens, sum(m.input_tokens for m in messages)),
            ("output_tokens", record.output_tokens, sum(m.output_tokens for m in messages)),
        )
        for name, stated, actual in sums:
            if stated != actual:
                raise InvalidInput(name, f"is {stated}, but the messages add up to {actual}")
        total = math.fsum(m.cost for m in messages)
        if not math.isclose(record.cost, total, rel_tol=1e-6, abs_tol=1e-9):
            raise InvalidInput("cost", f"is {record.cost!r}, but the messages add up to {total!r}")

    def _json_object_text(self, text: object, field: str, max_bytes: int) -> str:
        return self._json_object(_parsed(text, field), field, max_bytes)

    # --- file backup -------------------------------------------------------------------

    @property
    def can_backup_file(self) -> bool:
        """Whether ``backup_file`` works on this engine (SQLite); others back up by export."""
        from .engines.sqlite import SQLiteEngine

        return isinstance(self._engine, SQLiteEngine)

    async def backup_file(self, dest: str | Path) -> None:
        """Copy the whole database (every tenant) to the file ``dest`` while writers go on,
        with SQLite's online backup API; ``dest`` is replaced if it exists and appears only
        when whole. Open the copy as ``sqlite:///dest`` to restore. Raises InvalidInput on
        other engines (use ``transfer.export_store``) or a bad ``dest``."""
        from .engines.sqlite import SQLiteEngine

        engine = self.engine
        if not isinstance(engine, SQLiteEngine):
            raise InvalidInput(
                "dest", f"the {engine.name} engine has no file backup: export the store instead"
            )
        if not isinstance(dest, str | Path) or not str(dest):
            raise InvalidInput("dest", "must be a file path")
        target = Path(dest)
        problem = _backup_problem(target, engine.path)
        if problem:
            raise InvalidInput("dest", problem)
        await engine.backup(target)
