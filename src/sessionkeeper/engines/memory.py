"""The in-process engine: dictionaries behind one lock. Fast, and gone when the process ends."""

from __future__ import annotations

import bisect
import dataclasses
import platform
import threading
from dataclasses import dataclass, field

from .. import rules
from ..errors import AlreadyExists, NotFound
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
    SessionQuery,
    SessionRecord,
    Stats,
)
from .base import Engine, T, Tally, has_gap, tally_differs

__all__ = ["MemoryEngine"]


@dataclass(slots=True)
class _Tenant:
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    messages: dict[str, list[MessageRecord]] = field(default_factory=dict)
    folders: dict[str, FolderRecord] = field(default_factory=dict)
    guards: dict[str, GuardRecord] = field(default_factory=dict)
    daily: dict[tuple[int, str | None], DailyRecord] = field(default_factory=dict)


def _seq(message: MessageRecord) -> int:
    return message.seq


class MemoryEngine(Engine):
    """Every operation runs under one lock, so each is atomic across threads and tasks.

    Records are replaced, never mutated, so what a caller holds never changes under it.
    """

    __slots__ = ("_lock", "_tenants")
    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _tenant(self, tenant: str) -> _Tenant:
        found = self._tenants.get(tenant)
        if found is None:
            found = self._tenants[tenant] = _Tenant()
        return found

    def _live(self, space: _Tenant, session_id: str, now: float) -> SessionRecord | None:
        record = space.sessions.get(session_id)
        if record is None or rules.is_expired(record.expires_at, now):
            return None
        return record

    def _touch(self, space: _Tenant, session_id: str, now: float) -> SessionRecord | None:
        """The live session, with its idle expiry renewed."""
        record = self._live(space, session_id, now)
        if record is None or record.idle_ttl is None:
            return record
        renewed = rules.renewed_expiry(record.expires_at, record.idle_ttl, record.deadline, now)
        if renewed != record.expires_at:
            record = dataclasses.replace(record, expires_at=renewed)
            space.sessions[session_id] = record
        return record

    def _writable(
        self, space: _Tenant, session_id: str, now: float, expected_version: int | None
    ) -> SessionRecord:
        record = self._live(space, session_id, now)
        if record is None:
            raise NotFound(f"no session {session_id!r}")
        rules.check_version(record, expected_version)
        return record

    def _check_folder(self, space: _Tenant, folder_id: str | None, owner: str | None) -> None:
        if folder_id is None:
            return
        folder = space.folders.get(folder_id)
        if folder is None or folder.owner != owner:
            raise NotFound(f"no folder {folder_id!r} of owner {owner!r}")

    def _drop(self, space: _Tenant, session_id: str) -> None:
        space.sessions.pop(session_id, None)
        space.messages.pop(session_id, None)

    # --- sessions ----------------------------------------------------------------------

    async def insert_session(self, record: SessionRecord, now: float) -> None:
        with self._lock:
            space = self._tenant(record.tenant)
            if self._live(space, record.id, now) is not None:
                raise AlreadyExists(f"session {record.id!r} already exists")
            self._check_folder(space, record.folder, record.owner)
            self._drop(space, record.id)
            space.sessions[record.id] = record
            space.messages[record.id] = []

    async def get_session(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        with self._lock:
            return self._touch(self._tenant(tenant), session_id, now)

    async def delete_session(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> None:
        with self._lock:
            space = self._tenant(tenant)
            self._writable(space, session_id, now, expected_version)
            self._drop(space, session_id)

    async def change_session(
        self, tenant: str, session_id: str, change: Change, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        with self._lock:
            space = self._tenant(tenant)
            current = self._writable(space, session_id, now, None)
            new, appended = rules.apply_change(current, change, now)
            if "owner" in change.fields or "folder" in change.fields:
                self._check_folder(space, new.folder, new.owner)
            space.sessions[session_id] = new
            if appended:
                space.messages[session_id].extend(appended)
            return new, appended

    # --- messages ----------------------------------------------------------------------

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageDraft],
        now: float,
        expected_version: int | None,
    ) -> list[MessageRecord]:
        with self._lock:
            space = self._tenant(tenant)
            current = self._writable(space, session_id, now, expected_version)
            new, appended = rules.apply_append(current, messages, now)
            space.sessions[session_id] = new
            space.messages[session_id].extend(appended)
            return appended

    async def read_messages(
        self, tenant: str, session_id: str, now: float, after_seq: int, limit: int
    ) -> list[MessageRecord] | None:
        with self._lock:
            space = self._tenant(tenant)
            if self._touch(space, session_id, now) is None:
                return None
            messages = space.messages[session_id]
            start = bisect.bisect_right(messages, after_seq, key=_seq)
            return messages[start : start + limit]

    async def last_messages(
        self, tenant: str, session_id: str, now: float, limit: int
    ) -> list[MessageRecord] | None:
        with self._lock:
            space = self._tenant(tenant)
            if self._touch(space, session_id, now) is None:
                return None
            messages = space.messages[session_id]
            return messages[max(len(messages) - limit, 0) :]

    async def pop_message(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, MessageRecord | None]:
        with self._lock:
            space = self._tenant(tenant)
            current = self._writable(space, session_id, now, expected_version)
            messages = space.messages[session_id]
            popped = messages.pop() if messages else None
            new = (
                current
                if popped is None
                else rules.remove_messages(
                    current, 1, popped.input_tokens, popped.output_tokens, popped.cost, now
                )
            )
            space.sessions[session_id] = new
            return new, popped

    async def clear_messages(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, int]:
        with self._lock:
            space = self._tenant(tenant)
            current = self._writable(space, session_id, now, expected_version)
            removed = len(space.messages[session_id])
            space.messages[session_id] = []
            new = rules.remove_messages(
                current, removed, current.input_tokens, current.output_tokens, current.cost, now
            )
            space.sessions[session_id] = new
            return new, removed

    # --- queries -----------------------------------------------------------------------

    def _matching(self, tenant: str, query: SessionQuery, now: float) -> list[SessionRecord]:
        space = self._tenant(tenant)
        return [r for r in space.sessions.values() if rules.matches(r, query, now)]

    async def list_sessions(
        self, tenant: str, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        with self._lock:
            found = [
                r for r in self._matching(tenant, query, now) if rules.is_after_cursor(r, query)
            ]
        found.sort(key=lambda r: rules.sort_key(r, query), reverse=query.descending)
        return found[: query.limit]

    async def count_sessions(self, tenant: str, query: SessionQuery, now: float) -> int:
        with self._lock:
            return len(self._matching(tenant, query, now))

    async def stats(self, tenant: str, now: float, since: float, top: int) -> Stats:
        with self._lock:
            live = self._matching(tenant, SessionQuery(), now)
        return rules.stats_of(live, since, top)

    # --- folders -----------------------------------------------------------------------

    def _name_taken(self, space: _Tenant, owner: str | None, name: str) -> bool:
        return any(f.owner == owner and f.name == name for f in space.folders.values())

    def _counted(self, space: _Tenant, folder: FolderRecord, now: float) -> FolderRecord:
        count = sum(
            1
            for r in space.sessions.values()
            if r.folder == folder.id and not rules.is_expired(r.expires_at, now)
        )
        return dataclasses.replace(folder, session_count=count)

    async def insert_folder(self, record: FolderRecord) -> None:
        with self._lock:
            space = self._tenant(record.tenant)
            if self._name_taken(space, record.owner, record.name):
                raise AlreadyExists(f"owner {record.owner!r} already has a folder {record.name!r}")
            if record.id in space.folders:
                raise AlreadyExists(f"folder {record.id!r} already exists")
            space.folders[record.id] = record

    async def get_folder(self, tenant: str, folder_id: str, now: float) -> FolderRecord | None:
        with self._lock:
            space = self._tenant(tenant)
            folder = space.folders.get(folder_id)
            return None if folder is None else self._counted(space, folder, now)

    async def rename_folder(
        self, tenant: str, folder_id: str, name: str, now: float
    ) -> FolderRecord:
        with self._lock:
            space = self._tenant(tenant)
            folder = space.folders.get(folder_id)
            if folder is None:
                raise NotFound(f"no folder {folder_id!r}")
            if folder.name != name and self._name_taken(space, folder.owner, name):
                raise AlreadyExists(f"owner {folder.owner!r} already has a folder {name!r}")
            space.folders[folder_id] = folder = dataclasses.replace(folder, name=name)
            return self._counted(space, folder, now)

    async def list_folders(
        self, tenant: str, owner: str | None, owner_set: bool, now: float
    ) -> list[FolderRecord]:
        with self._lock:
            space = self._tenant(tenant)
            chosen = [f for f in space.folders.values() if not owner_set or f.owner == owner]
            counted = [self._counted(space, f, now) for f in chosen]
        counted.sort(key=lambda f: (f.owner or "", f.name, f.id))
        return counted

    async def delete_folder(
        self,
        tenant: str,
        folder_id: str,
        now: float,
        reassign_to: str | None,
        cascade: bool,
    ) -> int:
        with self._lock:
            space = self._tenant(tenant)
            folder = space.folders.get(folder_id)
            if folder is None:
                raise NotFound(f"no folder {folder_id!r}")
            if reassign_to is not None:
                self._check_folder(space, reassign_to, folder.owner)
            members = [r for r in space.sessions.values() if r.folder == folder_id]
            live = sum(1 for r in members if not rules.is_expired(r.expires_at, now))
            for record in members:
                if cascade:
                    self._drop(space, record.id)
                else:
                    space.sessions[record.id] = dataclasses.replace(
                        record, folder=reassign_to, version=record.version + 1, updated_at=now
                    )
            del space.folders[folder_id]
            return live

    # --- expiry ------------------------------------------------------------------------

    async def purge_expired(
        self, tenant: str | None, now: float, limit: int
    ) -> list[tuple[str, str]]:
        with self._lock:
            names = [tenant] if tenant is not None else list(self._tenants)
            purged: list[tuple[str, str]] = []
            for name in names:
                space = self._tenant(name)
                expired = [
                    sid for sid, r in space.sessions.items() if rules.is_expired(r.expires_at, now)
                ][: limit - len(purged)]
                for session_id in expired:
                    self._drop(space, session_id)
                purged += [(name, sid) for sid in expired]
                if len(purged) >= limit:
                    break
            return purged

    # --- transfer ----------------------------------------------------------------------

    async def list_tenants(self, now: float) -> list[str]:
        with self._lock:
            return sorted(
                name
                for name, space in self._tenants.items()
                if space.folders
                or any(not rules.is_expired(r.expires_at, now) for r in space.sessions.values())
            )

    async def export_session(
        self, tenant: str, session_id: str, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]] | None:
        with self._lock:
            space = self._tenant(tenant)
            record = self._live(space, session_id, now)
            if record is None:
                return None
            return record, list(space.messages[session_id])

    async def load_session(
        self, record: SessionRecord, messages: list[MessageRecord], now: float, replace: bool
    ) -> bool:
        with self._lock:
            space = self._tenant(record.tenant)
            if not replace and self._live(space, record.id, now) is not None:
                return False
            self._check_folder(space, record.folder, record.owner)
            self._drop(space, record.id)
            space.sessions[record.id] = record
            space.messages[record.id] = sorted(messages, key=_seq)
            return True

    async def load_folder(self, record: FolderRecord, replace: bool) -> bool:
        with self._lock:
            space = self._tenant(record.tenant)
            existing = space.folders.get(record.id)
            if existing is not None and not replace:
                return False
            others = (f for f in space.folders.values() if f.id != record.id)
            if any(f.owner == record.owner and f.name == record.name for f in others):
                raise AlreadyExists(f"owner {record.owner!r} already has a folder {record.name!r}")
            space.folders[record.id] = dataclasses.replace(record, session_count=0)
            return True

    # --- check and doctor --------------------------------------------------------------

    async def check(self, tenant: str | None, now: float, repair: bool) -> CheckReport:
        report = CheckReport()
        with self._lock:
            names = [tenant] if tenant is not None else sorted(self._tenants)
            for name in names:
                self._check_tenant(name, self._tenant(name), repair, report)
        return report

    def _check_tenant(self, name: str, space: _Tenant, repair: bool, report: CheckReport) -> None:
        for session_id in [sid for sid in space.messages if sid not in space.sessions]:
            orphans = len(space.messages[session_id])
            if repair:
                del space.messages[session_id]
            report.found("orphan_messages", f"{name}/{session_id}", repair, orphans)
        for session_id, record in list(space.sessions.items()):
            messages = space.messages.setdefault(session_id, [])
            tally: Tally = (
                len(messages),
                sum(m.input_tokens for m in messages),
                sum(m.output_tokens for m in messages),
                sum(m.cost for m in messages),
                messages[0].seq if messages else 0,
                messages[-1].seq if messages else 0,
            )
            subject = f"{name}/{session_id}"
            if has_gap(tally):
                report.found("seq_gaps", subject)
            stored = (
                record.message_count,
                record.input_tokens,
                record.output_tokens,
                record.cost,
                record.last_seq,
            )
            if tally_differs(stored, tally):
                if repair:
                    record = dataclasses.replace(
                        record,
                        message_count=tally[0],
                        input_tokens=tally[1],
                        output_tokens=tally[2],
                        cost=tally[3],
                        last_seq=max(record.last_seq, tally[5]),
                        version=record.version + 1,
                    )
                    space.sessions[session_id] = record
                report.found("aggregates", subject, repair)
            if record.folder is not None and record.folder not in space.folders:
                if repair:
                    space.sessions[session_id] = dataclasses.replace(
                        record, folder=None, version=record.version + 1
                    )
                report.found("missing_folder", subject, repair)

    async def doctor(self, now: float) -> DoctorReport:
        with self._lock:
            spaces = list(self._tenants.values())
            counts = {
                "tenants": len(spaces),
                "sessions": sum(len(s.sessions) for s in spaces),
                "messages": sum(len(m) for s in spaces for m in s.messages.values()),
                "folders": sum(len(s.folders) for s in spaces),
                "guards": sum(len(s.guards) for s in spaces),
            }
        return DoctorReport(
            engine=self.name,
            server_version=f"python {platform.python_version()}",
            settings={"durability": "none: the data is gone when the process ends"},
            counts=counts,
        )

    # --- guards ------------------------------------------------------------------------

    def _guard(self, space: _Tenant, key: str, now: float) -> GuardRecord | None:
        guard = space.guards.get(key)
        if guard is not None and rules.is_expired(guard.expires_at, now):
            del space.guards[key]
            return None
        return guard

    async def update_guard(self, tenant: str, key: str, update: GuardUpdate[T], now: float) -> T:
        with self._lock:
            space = self._tenant(tenant)
            guard = self._guard(space, key, now)
            value, expires_at, result = update(None if guard is None else guard.value)
            if value is None:
                space.guards.pop(key, None)
            else:
                space.guards[key] = GuardRecord(key, value, expires_at)
            return result

    async def get_guard(self, tenant: str, key: str, now: float) -> str | None:
        with self._lock:
            guard = self._guard(self._tenant(tenant), key, now)
            return None if guard is None else guard.value

    async def list_guards(self, tenant: str, prefix: str, now: float) -> list[GuardRecord]:
        with self._lock:
            space = self._tenant(tenant)
            found = [
                guard
                for key in sorted(space.guards)
                if key.startswith(prefix) and (guard := self._guard(space, key, now)) is not None
            ]
        return found

    # --- analytics ---------------------------------------------------------------------

    async def add_daily(self, tenant: str, rows: list[DailyRecord], replace: bool = False) -> None:
        with self._lock:
            daily = self._tenant(tenant).daily
            for row in rows:
                found = daily.get((row.day, row.owner))
                if found is None or replace:
                    found = daily[row.day, row.owner] = DailyRecord(row.day, row.owner)
                for name in DAILY_COUNTERS:
                    setattr(found, name, getattr(found, name) + getattr(row, name))

    async def read_daily(
        self,
        tenant: str,
        first: int,
        last: int,
        owner: str | None,
        owner_set: bool,
        group_by: str = "day",
    ) -> list[DailyRecord]:
        with self._lock:
            return [
                dataclasses.replace(row)
                for (day, who), row in self._tenant(tenant).daily.items()
                if first <= day <= last and (not owner_set or who == owner)
            ]

    async def session_owners(self, tenant: str, session_ids: list[str]) -> dict[str, str | None]:
        with self._lock:
            sessions = self._tenant(tenant).sessions
            return {sid: sessions[sid].owner for sid in session_ids if sid in sessions}
