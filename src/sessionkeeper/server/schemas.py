"""The bodies the API reads and the small ones it writes; the rest are the library's models.

Request models name their fields as the store's arguments do and check only their JSON
types: the store checks every value (ids, lengths, limits) and names the field it refuses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..models import MessageIn, Period, Status

__all__ = [
    "AppendIn",
    "BudgetIn",
    "ChangeIn",
    "Count",
    "FolderDeleted",
    "FolderIn",
    "FolderRename",
    "HitIn",
    "Identity",
    "LoginIn",
    "Removed",
    "SessionIn",
    "SessionPatch",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionIn(_In):
    """A new session; every field may be left out."""

    id: str | None = Field(None, description="The session id (default: 144 random bits)")
    owner: str | None = None
    folder: str | None = Field(None, description="A folder id of the same owner")
    title: str = ""
    status: Status = "active"
    step: str | None = None
    state: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    ttl: float | None = Field(None, description="Absolute lifetime in seconds")
    idle_ttl: float | None = Field(None, description="Idle lifetime in seconds, renewed on use")


class SessionPatch(_In):
    """Fields to set; those left out stay as they are, and null clears owner, folder or
    step."""

    title: str | None = None
    owner: str | None = None
    folder: str | None = None
    status: Status | None = None
    step: str | None = None
    metadata: dict[str, Any] | None = None


class ChangeIn(SessionPatch):
    """One atomic change: a state patch or a new state, fields, and messages to append;
    all of it lands under one new version, or none of it does."""

    state_patch: dict[str, Any] | None = Field(None, description="An RFC 7396 merge patch")
    state: dict[str, Any] | None = Field(None, description="A new state, replacing it whole")
    messages: list[MessageIn] = Field(default_factory=list)


class AppendIn(_In):
    messages: list[MessageIn] = Field(description="Appended in order, with the next seqs")


class FolderIn(_In):
    name: str
    owner: str | None = None


class FolderRename(_In):
    name: str


class HitIn(_In):
    key: str = Field(description="What is limited, e.g. api:alice")
    limit: int = Field(description="Hits allowed per window")
    window: float = Field(description="Seconds of the sliding window")
    cost: int = Field(1, description="The weight of this hit")


class LoginIn(_In):
    ip: str | None = Field(None, description="The client's address")
    account: str | None = None


class BudgetIn(_In):
    owner: str | None = Field(None, description="Give an owner or a session_id")
    session_id: str | None = None
    tokens: int | None = Field(None, description="Input plus output tokens per period")
    cost: float | None = Field(None, description="Cost per period")
    period: Period | None = None


class Count(BaseModel):
    count: int


class Removed(BaseModel):
    removed: int = Field(description="How many were removed")


class FolderDeleted(BaseModel):
    sessions: int = Field(description="Sessions the folder had: moved, deleted or left")


class Identity(BaseModel):
    """The key a request was made with."""

    key_id: str
    tenant: str
    role: str
    name: str
