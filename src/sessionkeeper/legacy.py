"""Importing the hand-rolled JSON layouts people migrate from, into sessions.

Two layouts are read (``auto`` tells them apart: a ``users.json`` means the second):

``sessions-folder``: a folder of one JSON object per session (``*.json``, by name)::

    session_id            -> id (the file name without .json if absent)
    company_id            -> owner
    company_name          -> title, and metadata.company_name
    created_at            -> created_at
    last_updated          -> updated_at
    conversation_history  -> messages (role, content, input_tokens, output_tokens,
                             cost, metadata, timestamp or created_at)
    job_data              -> state (wrapped as {"job_data": ...} when not an object)
    current_step          -> step
    is_complete           -> status "completed" (else "active")
    anything else         -> metadata.legacy.<field>

``users-json``: ``users.json`` (a list of users with ``user_id`` or ``id``, or an object
keyed by user id) and ``user_data/<user_id>.json`` holding that user's conversations (a
list, an object keyed by conversation id, or ``{"conversations": ...}``). Each
conversation (``id``/``conversation_id``, ``title``, ``provider``, ``model``,
``timestamp``, ``messages``) becomes one session owned by the user, with ``provider`` and
``model`` in its metadata.

Real files are messy, so: times may be ISO 8601 with or without a zone (none means UTC),
Unix seconds or milliseconds, as numbers or strings; token counts and costs may be
numeric strings; missing times fall back to the nearest known one (the file's
modification time last) and the report says so. An id that is not a valid session id is
replaced by ``legacy-`` and a hash of it (the same on every run, so a second import
skips what the first wrote), kept in ``metadata.legacy_id``, and reported. A record that
cannot be imported is skipped with its reason; the import never stops half way through a
session, and never reads a path built from an unchecked id. ``field_map`` renames fields
(``{"sid": "session_id"}``) in every record, conversation and message before mapping.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from . import rules
from .errors import BackendUnavailable, InvalidInput, SessionKeeperError
from .models import MessageRecord, SessionRecord
from .store import SessionStore
from .transfer import OnConflict

__all__ = ["LAYOUTS", "LegacyReport", "Skipped", "import_legacy", "parse_map"]

Layout = Literal["auto", "sessions-folder", "users-json"]
LAYOUTS: tuple[str, ...] = ("auto", "sessions-folder", "users-json")

_SESSION_FIELDS = (
    "session_id",
    "company_id",
    "company_name",
    "created_at",
    "last_updated",
    "conversation_history",
    "job_data",
    "current_step",
    "is_complete",
)
_CONVERSATION_FIELDS = (
    "id",
    "conversation_id",
    "title",
    "provider",
    "model",
    "timestamp",
    "created_at",
    "messages",
)
_MESSAGE_FIELDS = (
    "role",
    "content",
    "input_tokens",
    "output_tokens",
    "cost",
    "metadata",
    "timestamp",
    "created_at",
)
_KNOWN_FIELDS = frozenset((*_SESSION_FIELDS, *_CONVERSATION_FIELDS, *_MESSAGE_FIELDS, "user_id"))
_MAX_LIST = 200  # skipped records, renamed ids and notes kept in a report


@dataclass(slots=True)
class Skipped:
    """A record that was not imported, and why."""

    source: str
    reason: str


@dataclass(slots=True)
class LegacyReport:
    path: str
    layout: str
    dry_run: bool = False
    imported: int = 0
    existing: int = 0
    messages: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def skip(self, source: str, reason: str) -> None:
        if len(self.skipped) < _MAX_LIST:
            self.skipped.append(Skipped(source, reason))

    def note(self, text: str) -> None:
        if len(self.notes) < _MAX_LIST:
            self.notes.append(text)


def parse_map(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["old=new", ...]`` as a dict; InvalidInput naming the bad pair."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise InvalidInput("map", f"{pair!r} is not old=new")
        if new not in _KNOWN_FIELDS:
            known = ", ".join(sorted(_KNOWN_FIELDS))
            raise InvalidInput("map", f"{new!r} is not a field the import reads; one of {known}")
        mapping[old] = new
    return mapping


# --- messy values ----------------------------------------------------------------------


def _time(value: object) -> float | None:
    """Unix seconds from ISO 8601 (a missing zone is UTC), seconds or milliseconds."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp()
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return value / 1000.0 if value > 100_000_000_000 else float(value)
    return None


def _count(value: object, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise InvalidInput(name, f"is not a count of tokens: {value!r}")


def _money(value: object, name: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, str):
        try:
            value = float(value.strip().lstrip("$"))
        except ValueError:
            raise InvalidInput(name, f"is not a cost: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(name, f"is not a cost: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(name, f"is not a cost: {value!r}")
    return float(value)


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _one_line(value: object) -> str | None:
    text = _text(value)
    return None if text is None else " ".join(text.split()) or None


def _renamed(value: dict[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    if not mapping:
        return value
    return {mapping.get(key, key): item for key, item in value.items()}


def _legacy_id(old: str) -> str:
    return "legacy-" + hashlib.sha256(old.encode()).hexdigest()[:24]


# --- building one session --------------------------------------------------------------


@dataclass(slots=True)
class _Draft:
    """A session read from a legacy record, before the store checks it."""

    source: str
    old_id: str
    owner: str | None
    title: str
    step: str | None
    status: str
    state: Any
    metadata: dict[str, Any]
    created: float | None
    updated: float | None
    fallback: float
    history: object
    history_field: str


class _Builder:
    def __init__(self, store: SessionStore, report: LegacyReport, mapping: Mapping[str, str]):
        self.store = store
        self.report = report
        self.mapping = mapping

    def session_id(self, draft: _Draft) -> str:
        try:
            return rules.check_id(draft.old_id, "id")
        except InvalidInput:
            new = _legacy_id(draft.old_id)
            draft.metadata["legacy_id"] = draft.old_id
            if len(self.report.renamed) < _MAX_LIST:
                self.report.renamed.append(f"{draft.old_id!r} -> {new} ({draft.source})")
            return new

    def build(self, draft: _Draft) -> tuple[SessionRecord, list[MessageRecord]]:
        session_id = self.session_id(draft)
        history = draft.history
        if history is None:
            history = []
        if not isinstance(history, list):
            raise InvalidInput(draft.history_field, "must be a list of messages")
        messages: list[MessageRecord] = []
        times: list[float] = []
        for index, raw in enumerate(history):
            where = f"{draft.history_field}[{index}]"
            if isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str):
                raw = {"role": raw[0], "content": raw[1]}  # [role, content] pairs
            if not isinstance(raw, dict):
                raise InvalidInput(where, "is not a message object")
            m = _renamed(raw, self.mapping)
            role = m.get("role")
            if not isinstance(role, str) or not role.strip():
                raise InvalidInput(f"{where}.role", "is missing")
            at = _time(m.get("timestamp", m.get("created_at")))
            extra = {k: v for k, v in m.items() if k not in _MESSAGE_FIELDS}
            given = m.get("metadata")
            metadata: dict[str, Any] = given if isinstance(given, dict) else {}
            if extra:
                metadata = {**metadata, "legacy": extra}
            if at is not None:
                times.append(at)
            messages.append(
                MessageRecord(
                    session_id=session_id,
                    seq=index + 1,
                    role=role.strip(),
                    content=orjson.dumps(m.get("content")).decode(),
                    input_tokens=_count(m.get("input_tokens"), f"{where}.input_tokens"),
                    output_tokens=_count(m.get("output_tokens"), f"{where}.output_tokens"),
                    cost=_money(m.get("cost"), f"{where}.cost"),
                    metadata=orjson.dumps(metadata).decode(),
                    created_at=at if at is not None else -1.0,  # filled in below
                )
            )
        created = draft.created
        if created is None:
            created = min(times) if times else draft.updated or draft.fallback
            self.report.note(f"{draft.source}: no readable creation time, used {created:.0f}")
        updated = max([created, *([draft.updated] if draft.updated else []), *times])
        for message in messages:
            if message.created_at < 0:
                message.created_at = created
        record = SessionRecord(
            tenant=self.store.tenant,
            id=session_id,
            owner=draft.owner,
            folder=None,
            title=draft.title,
            status=draft.status,
            step=draft.step,
            metadata=orjson.dumps(draft.metadata).decode(),
            state=orjson.dumps(draft.state).decode(),
            version=1,
            created_at=created,
            updated_at=updated,
            expires_at=None,
            idle_ttl=None,
            deadline=None,
            message_count=len(messages),
            last_seq=len(messages),
            input_tokens=sum(m.input_tokens for m in messages),
            output_tokens=sum(m.output_tokens for m in messages),
            cost=sum(m.cost for m in messages),
        )
        return record, messages


def _session_draft(path: Path, data: dict[str, Any], fallback: float) -> _Draft:
    extra = {k: v for k, v in data.items() if k not in _SESSION_FIELDS}
    metadata: dict[str, Any] = {"legacy_source": path.name}
    if data.get("company_name") is not None:
        metadata["company_name"] = data["company_name"]
    if extra:
        metadata["legacy"] = extra
    state = data.get("job_data")
    if state is None:
        state = {}
    elif not isinstance(state, dict):
        state = {"job_data": state}
    old_id = data.get("session_id")
    title = _text(data.get("company_name")) or ""
    return _Draft(
        source=path.name,
        old_id=path.stem if old_id is None else str(old_id),
        owner=_text(data.get("company_id")),
        title=" ".join(title.split()),
        step=_one_line(data.get("current_step")),
        status="completed" if data.get("is_complete") in (True, "true", "True", 1) else "active",
        state=state,
        metadata=metadata,
        created=_time(data.get("created_at")),
        updated=_time(data.get("last_updated")),
        fallback=fallback,
        history=data.get("conversation_history"),
        history_field="conversation_history",
    )


def _conversation_draft(
    user_id: str, index: int, key: str | None, data: dict[str, Any], fallback: float
) -> _Draft:
    conversation_id = data.get("id", data.get("conversation_id", key))
    old_id = f"{user_id}-{index + 1}" if conversation_id is None else str(conversation_id)
    metadata: dict[str, Any] = {}
    for name in ("provider", "model"):
        if data.get(name) is not None:
            metadata[name] = data[name]
    extra = {k: v for k, v in data.items() if k not in _CONVERSATION_FIELDS}
    if extra:
        metadata["legacy"] = extra
    title = _text(data.get("title")) or ""
    return _Draft(
        source=f"user_data/{user_id}.json[{index}]",
        old_id=old_id,
        owner=user_id,
        title=" ".join(title.split()),
        step=None,
        status="active",
        state={},
        metadata=metadata,
        created=_time(data.get("timestamp", data.get("created_at"))),
        updated=None,
        fallback=fallback,
        history=data.get("messages"),
        history_field="messages",
    )


# --- reading the layouts ---------------------------------------------------------------


def _read_json(path: Path) -> Any:
    with open(path, "rb") as file:
        return orjson.loads(file.read())


def _mtime(path: Path) -> float:
    return os.stat(path).st_mtime


def _folder_drafts(
    root: Path, report: LegacyReport, mapping: Mapping[str, str]
) -> Iterator[_Draft]:
    for path in sorted(root.glob("*.json")):
        try:
            data = _read_json(path)
        except (OSError, orjson.JSONDecodeError) as exc:
            report.skip(path.name, f"cannot be read as JSON: {exc}")
            continue
        if not isinstance(data, dict):
            report.skip(path.name, "is not a JSON object")
            continue
        yield _session_draft(path, _renamed(data, mapping), _mtime(path))


def _users(root: Path, report: LegacyReport, mapping: Mapping[str, str]) -> list[str]:
    try:
        data = _read_json(root / "users.json")
    except (OSError, orjson.JSONDecodeError) as exc:
        raise InvalidInput("path", f"users.json cannot be read as JSON: {exc}") from None
    entries: list[tuple[str, Any]]
    if isinstance(data, dict) and isinstance(data.get("users"), list | dict):
        data = data["users"]
    if isinstance(data, dict):
        entries = [(str(key), value) for key, value in data.items()]
    elif isinstance(data, list):
        entries = []
        for index, user in enumerate(data):
            user = _renamed(user, mapping) if isinstance(user, dict) else user
            user_id = user.get("user_id", user.get("id")) if isinstance(user, dict) else user
            if user_id is None or isinstance(user_id, dict | list | bool):
                report.skip(f"users.json[{index}]", "has no user_id")
                continue
            entries.append((str(user_id), user))
    else:
        raise InvalidInput("path", "users.json holds neither a list nor an object of users")
    users = []
    for user_id, _ in entries:
        try:
            users.append(rules.check_id(user_id, "user_id"))
        except InvalidInput as exc:  # never a path from an unchecked id
            report.skip(f"users.json user {user_id!r}", f"{exc}: its file is not read")
    return users


def _user_drafts(root: Path, report: LegacyReport, mapping: Mapping[str, str]) -> Iterator[_Draft]:
    users = _users(root, report, mapping)
    listed = set(users)
    data_dir = root / "user_data"
    if data_dir.is_dir():
        for path in sorted(data_dir.glob("*.json")):
            if path.stem not in listed:
                report.skip(f"user_data/{path.name}", "its user is not in users.json")
    for user_id in users:
        path = data_dir / f"{user_id}.json"
        if not path.is_file():
            report.note(f"user {user_id!r} has no user_data/{user_id}.json")
            continue
        try:
            data = _read_json(path)
        except (OSError, orjson.JSONDecodeError) as exc:
            report.skip(f"user_data/{path.name}", f"cannot be read as JSON: {exc}")
            continue
        if isinstance(data, dict) and isinstance(data.get("conversations"), list | dict):
            data = data["conversations"]
        items: list[tuple[str | None, Any]]
        if isinstance(data, dict):
            items = [(str(key), value) for key, value in data.items()]
        elif isinstance(data, list):
            items = [(None, value) for value in data]
        else:
            report.skip(f"user_data/{path.name}", "holds no list of conversations")
            continue
        fallback = _mtime(path)
        for index, (key, conversation) in enumerate(items):
            if not isinstance(conversation, dict):
                report.skip(f"user_data/{path.name}[{index}]", "is not a conversation object")
                continue
            renamed = _renamed(conversation, mapping)
            yield _conversation_draft(user_id, index, key, renamed, fallback)


def _folder(path: Path) -> Path:
    """The folder to read: ``path``, or the folder of a ``users.json`` named directly."""
    if path.is_file() and path.name == "users.json":
        path = path.parent
    if not path.is_dir():
        raise InvalidInput("path", f"{str(path)!r} is not a folder")
    return path


def _layout_of(root: Path, layout: object) -> str:
    if layout not in LAYOUTS:
        raise InvalidInput("layout", f"must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if layout == "auto":
        if (root / "users.json").is_file():
            return "users-json"
        if any(root.glob("*.json")):
            return "sessions-folder"
        raise InvalidInput("path", f"{str(root)!r} has neither users.json nor *.json session files")
    if layout == "users-json" and not (root / "users.json").is_file():
        raise InvalidInput("path", f"{str(root)!r} has no users.json")
    return str(layout)


async def import_legacy(
    store: SessionStore,
    path: str | Path,
    *,
    layout: Layout = "auto",
    field_map: Mapping[str, str] | None = None,
    on_conflict: OnConflict = "skip",
    dry_run: bool = False,
) -> LegacyReport:
    """Import a legacy folder into the store's tenant, one session at a time; see the
    module docstring for the layouts and the mapping. Sessions whose id is taken are
    kept (``skip``, the default: a second run adds nothing), replaced (``overwrite``) or
    reported as skipped (``fail``). Returns what was imported, skipped and why."""
    if not isinstance(path, str | Path) or not str(path):
        raise InvalidInput("path", "must be a folder")
    root = _folder(Path(path))
    if on_conflict not in ("skip", "overwrite", "fail"):
        raise InvalidInput("on_conflict", f"must be skip, overwrite or fail, not {on_conflict!r}")
    mapping = dict(field_map or {})
    chosen = _layout_of(root, layout)
    report = LegacyReport(path=str(root), layout=chosen, dry_run=dry_run)
    builder = _Builder(store, report, mapping)
    drafts = (_folder_drafts if chosen == "sessions-folder" else _user_drafts)(
        root, report, mapping
    )
    for draft in drafts:
        try:
            record, messages = builder.build(draft)
            outcome = await store.load_session(
                record, messages, replace=on_conflict == "overwrite", dry_run=dry_run
            )
        except BackendUnavailable:
            raise
        except SessionKeeperError as exc:
            report.skip(draft.source, str(exc))
            continue
        if outcome == "loaded":
            report.imported += 1
            report.messages += len(messages)
        elif on_conflict == "fail":
            report.skip(draft.source, f"session {record.id!r} already exists")
        else:
            report.existing += 1
    return report
