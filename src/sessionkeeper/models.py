"""The shapes of sessionkeeper: public models for callers, plain records for engines.

Public models (``Session``, ``Message``, ``Folder`` ...) are frozen pydantic models with
aware UTC datetimes and parsed JSON. Records (``SessionRecord`` ...) are what engines store
and return: Unix-second floats and JSON text, so an engine never parses or validates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Final, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DAILY_COUNTERS",
    "PERIODS",
    "STATUSES",
    "UNSET",
    "BudgetUsage",
    "Change",
    "ChangeResult",
    "DailyRecord",
    "Folder",
    "FolderRecord",
    "GuardRecord",
    "GuardUpdate",
    "LoginStatus",
    "Message",
    "MessageDraft",
    "MessageIn",
    "MessageRecord",
    "OwnerCost",
    "OwnerCount",
    "Page",
    "RateLimitResult",
    "Session",
    "SessionQuery",
    "SessionRecord",
    "SessionSummary",
    "Stats",
    "Status",
    "Unset",
]

Status = Literal["active", "completed", "archived"]
STATUSES: tuple[str, ...] = ("active", "completed", "archived")
Period = Literal["none", "daily", "weekly", "monthly"]
PERIODS: tuple[str, ...] = ("none", "daily", "weekly", "monthly")

T = TypeVar("T")


class Unset(Enum):
    """The type of UNSET: "leave this field as it is", where None would mean "clear it"."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


# --- public models ---------------------------------------------------------------------


class SessionSummary(BaseModel):
    """A session without its state: what listings return."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    owner: str | None
    folder: str | None
    title: str
    status: Status
    step: str | None
    metadata: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    idle_ttl: float | None
    message_count: int
    last_seq: int
    input_tokens: int
    output_tokens: int
    cost: float


class Session(SessionSummary):
    """A session with its working state."""

    state: dict[str, Any]


class Message(BaseModel):
    """One stored message; ``seq`` is 1, 2, 3 ... per session, assigned by the engine."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    seq: int
    role: str
    content: Any
    input_tokens: int
    output_tokens: int
    cost: float
    metadata: dict[str, Any]
    created_at: datetime


class MessageIn(BaseModel):
    """A message to append. ``content`` is any JSON value: text, or a framework's item."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: str = Field(min_length=1, max_length=64)
    content: Any = None
    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cost: float = Field(0.0, ge=0, allow_inf_nan=False)
    metadata: dict[str, Any] = Field(default_factory=dict)


class Folder(BaseModel):
    """A named group of one owner's sessions."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    owner: str | None
    name: str
    created_at: datetime
    session_count: int


class Page(BaseModel, Generic[T]):
    """One page of a listing; pass ``next_cursor`` back to get the next one."""

    model_config = ConfigDict(frozen=True)

    items: list[T]
    next_cursor: str | None


class ChangeResult(BaseModel):
    """What one atomic change left: the session after it and the messages it appended."""

    model_config = ConfigDict(frozen=True)

    session: Session
    messages: list[Message]


class OwnerCount(BaseModel):
    model_config = ConfigDict(frozen=True)

    owner: str | None
    sessions: int


class OwnerCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    owner: str | None
    cost: float


class Stats(BaseModel):
    """Figures over one tenant's live sessions."""

    model_config = ConfigDict(frozen=True)

    total: int
    active: int
    completed: int
    archived: int
    recently_active: int = Field(
        description="Live sessions updated within the last active_hours hours"
    )
    active_hours: float = Field(24.0, description="The window of recently_active, in hours")
    completion_rate: float
    messages: int
    input_tokens: int
    output_tokens: int
    cost: float
    top_owners: list[OwnerCount]
    top_owners_by_cost: list[OwnerCost] = Field(
        default_factory=list, description="Owners by the cost of their live sessions"
    )


class RateLimitResult(BaseModel):
    """What one hit on a rate limit got: allowed or not, and how long until it would be."""

    model_config = ConfigDict(frozen=True)

    key: str
    allowed: bool
    limit: int
    remaining: int = Field(description="Hits still allowed in the current window")
    retry_after: float = Field(description="Seconds until this hit would be allowed (0 if it was)")
    reset_after: float = Field(description="Seconds until the window holds no hit at all")


class LoginStatus(BaseModel):
    """Failed logins of one client IP or one account, and whether it is locked out."""

    model_config = ConfigDict(frozen=True)

    who: str = Field(description="``ip:<address>`` or ``account:<name>``")
    failures: int = Field(description="Failures recorded since the last success or unlock")
    recent_failures: int = Field(description="Failures within the current window")
    locked: bool
    retry_after: float = Field(description="Seconds until the lockout ends (0 if not locked)")
    lockouts: int = Field(description="Lockouts so far; each lasts longer when progressive")
    last_failure: datetime | None


class BudgetUsage(BaseModel):
    """Tokens and cost an owner or a session used in the current budget period."""

    model_config = ConfigDict(frozen=True)

    scope: str = Field(description="``owner:<owner>`` or ``session:<id>``")
    period: Period
    period_start: datetime | None
    resets_at: datetime | None
    input_tokens: int
    output_tokens: int
    cost: float
    token_limit: int | None = Field(description="Input plus output tokens allowed per period")
    cost_limit: float | None


# --- records: what engines store -------------------------------------------------------


@dataclass(slots=True)
class SessionRecord:
    """A session as stored. Times are Unix seconds; ``state`` and ``metadata`` are JSON text.

    ``state`` is None when the engine was asked not to load it (listings).
    ``deadline`` is the absolute expiry that idle renewal never passes.
    """

    tenant: str
    id: str
    owner: str | None
    folder: str | None
    title: str
    status: str
    step: str | None
    metadata: str
    state: str | None
    version: int
    created_at: float
    updated_at: float
    expires_at: float | None
    idle_ttl: float | None
    deadline: float | None
    message_count: int = 0
    last_seq: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0

    def copy(self) -> SessionRecord:
        """A shallow copy (faster than ``dataclasses.replace`` on the hot path)."""
        return SessionRecord(
            self.tenant,
            self.id,
            self.owner,
            self.folder,
            self.title,
            self.status,
            self.step,
            self.metadata,
            self.state,
            self.version,
            self.created_at,
            self.updated_at,
            self.expires_at,
            self.idle_ttl,
            self.deadline,
            self.message_count,
            self.last_seq,
            self.input_tokens,
            self.output_tokens,
            self.cost,
        )


@dataclass(slots=True)
class MessageDraft:
    """A validated message waiting for its seq; ``content`` and ``metadata`` are JSON text."""

    role: str
    content: str
    input_tokens: int
    output_tokens: int
    cost: float
    metadata: str


@dataclass(slots=True)
class MessageRecord:
    session_id: str
    seq: int
    role: str
    content: str
    input_tokens: int
    output_tokens: int
    cost: float
    metadata: str
    created_at: float


@dataclass(slots=True)
class FolderRecord:
    tenant: str
    id: str
    owner: str | None
    name: str
    created_at: float
    session_count: int = 0


@dataclass(slots=True)
class Change:
    """One atomic change to one session, already validated by the store.

    ``fields`` maps column names (title, owner, folder, status, step, metadata) to new
    values. ``state`` replaces the state; ``state_patch`` is a parsed JSON Merge Patch that
    the engine applies with ``rules.apply_change`` inside its write. When ``want_state``
    is False the engine may return the record without its state.
    """

    expected_version: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    state_patch: Any = None
    has_state_patch: bool = False
    messages: list[MessageDraft] = field(default_factory=list)
    want_state: bool = True
    max_state_bytes: int = 1_048_576
    max_depth: int = 32


@dataclass(slots=True, frozen=True)
class SessionQuery:
    """Filters, order and position of a listing, already validated by the store.

    ``owner_set``/``folder_set`` tell "filter on None" from "no filter"; ``title_contains``
    is already lower-cased with ``rules.ascii_lower``; ranges include ``*_since`` and
    exclude ``*_before``; ``after_key``/``after_id`` are the position a cursor resumes at.
    """

    owner: str | None = None
    owner_set: bool = False
    folder: str | None = None
    folder_set: bool = False
    status: str | None = None
    created_since: float | None = None
    created_before: float | None = None
    updated_since: float | None = None
    updated_before: float | None = None
    title_contains: str | None = None
    order_by: Literal["created_at", "updated_at"] = "created_at"
    descending: bool = True
    limit: int = 50
    after_key: float | None = None
    after_id: str | None = None


@dataclass(slots=True)
class GuardRecord:
    """A guard's counter as stored: an opaque key, its JSON text and its expiry."""

    key: str
    value: str
    expires_at: float | None


@dataclass(slots=True)
class DailyRecord:
    """A tenant's activity counters of one UTC day (days since 1970-01-01) and one owner
    (None: sessions without one), as ``analytics`` keeps them."""

    day: int
    owner: str | None
    created: int = 0
    completed: int = 0
    completed_messages: int = 0  # messages the sessions completed that day held then
    messages: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0


#: The counters of a DailyRecord, in the order engines store them.
DAILY_COUNTERS = (
    "created",
    "completed",
    "completed_messages",
    "messages",
    "input_tokens",
    "output_tokens",
    "cost",
)


#: The pure function an engine runs atomically on a guard: it gets the stored value (None
#: if absent or expired) and returns the value to store (None deletes it), its expiry and
#: a result for the caller. Engines that retry on conflict may call it more than once.
GuardUpdate = Callable[[str | None], tuple[str | None, float | None, T]]


#: The kinds of damage ``Engine.check`` looks for, in report order. ``seq_gaps`` and
#: ``quarantined_file`` are reported, never repaired: pop leaves gaps by design, and a
#: quarantined file is evidence for a person to read.
CHECK_KINDS = (
    "aggregates",
    "seq_gaps",
    "orphan_messages",
    "missing_folder",
    "dangling_index",
    "totals",
    "quarantined_file",
)
REPORT_ONLY_KINDS = frozenset({"seq_gaps", "quarantined_file"})
_CHECK_SAMPLES = 20  # subjects kept per kind; the counts count them all


@dataclass(slots=True)
class CheckCount:
    """One kind of damage: how many found and repaired, and the first few subjects
    (``tenant/session``, ``tenant/session#seq``, a key or a path)."""

    kind: str
    found: int = 0
    repaired: int = 0
    samples: list[str] = field(default_factory=list)


def _check_counts() -> dict[str, CheckCount]:
    return {kind: CheckCount(kind) for kind in CHECK_KINDS}


@dataclass(slots=True)
class CheckReport:
    """What ``Engine.check`` found and, with ``repair``, fixed, counted by kind."""

    counts: dict[str, CheckCount] = field(default_factory=_check_counts)

    def found(self, kind: str, subject: str, repaired: bool = False, times: int = 1) -> None:
        count = self.counts[kind]
        count.found += times
        count.repaired += times if repaired else 0
        if len(count.samples) < _CHECK_SAMPLES:
            count.samples.append(subject)

    def merge(self, other: CheckReport) -> None:
        for kind, theirs in other.counts.items():
            ours = self.counts[kind]
            ours.found += theirs.found
            ours.repaired += theirs.repaired
            ours.samples.extend(theirs.samples[: _CHECK_SAMPLES - len(ours.samples)])


@dataclass(slots=True)
class DoctorReport:
    """What ``Engine.doctor`` saw: versions, the settings that matter for durability,
    sizes in bytes, row or key counts, missing indexes, and what to change."""

    engine: str
    server_version: str
    schema_version: int | None = None
    settings: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    missing_indexes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
