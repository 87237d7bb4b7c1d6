"""Lifecycle policies over a store: archive, restore, purge by age, and the background sweeper.

Each policy walks the sessions it concerns a listing page at a time (keyset cursors, so
pages neither repeat nor skip sessions while others change) and acts on each session with
the store's own calls, pinned to the version it listed: a session that changed, was
deleted or expired after it was listed is left as it is and counted as skipped. Nothing
here loads every session at once, and every run is safe to repeat, also after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self

from .errors import (
    AlreadyExists,
    BackendUnavailable,
    InvalidInput,
    NotFound,
    SessionKeeperError,
    VersionConflict,
)
from .models import FolderRecord, MessageRecord, SessionRecord, SessionSummary, Status
from .store import SessionStore

__all__ = [
    "ArchiveReport",
    "Progress",
    "PurgeReport",
    "RestoreReport",
    "SweepReport",
    "Sweeper",
    "archive",
    "parse_duration",
    "purge",
    "restore",
]

#: Called with (sessions handled, sessions to handle) as a run goes on.
Progress = Callable[[int, int], None]

DEFAULT_CONCURRENCY = 8
_MAX_SAMPLES = 50  # ids and errors kept in a report; the counts count them all
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"([0-9]{1,9})([smhdw])", re.ASCII)
# What to do with one listed session: ("done" | "skipped" | "failed", messages, error).
_Outcome = tuple[Literal["done", "skipped", "failed"], int, str]
_Action = Callable[[SessionStore, SessionSummary], Awaitable[_Outcome]]

_log = logging.getLogger("sessionkeeper.maintenance")


def parse_duration(text: object, option: str) -> float:
    """The seconds of a duration written as a whole number and a unit: ``45s``, ``30m``,
    ``12h``, ``90d`` or ``2w``. Raises InvalidInput naming ``option`` otherwise."""
    if not isinstance(text, str):
        raise InvalidInput(option, f"must be a duration such as 90d, not {type(text).__name__}")
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise InvalidInput(
            option,
            f"must be a whole number and a unit, s, m, h, d or w (such as 90d), not {text!r}",
        )
    seconds = int(found[1]) * _UNITS[found[2]]
    if not seconds:
        raise InvalidInput(option, "must be longer than 0")
    return float(seconds)


def _seconds(value: object, field: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, f"must be seconds or a timedelta, not {type(value).__name__}")
    if not value > 0 or not math.isfinite(value):
        raise InvalidInput(field, "must be a positive, finite number of seconds")
    return float(value)


def _page_size(store: SessionStore, batch_size: object) -> int:
    size = store.settings.purge_batch_size if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInput("batch_size", f"must be a positive integer, not {size!r}")
    return min(size, store.settings.max_page_size)


def _concurrency(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise InvalidInput("concurrency", f"must be an integer from 1 to 256, not {value!r}")
    return value


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


async def _tenants(store: SessionStore, all_tenants: bool) -> list[SessionStore]:
    if not all_tenants:
        return [store]
    return [store.for_tenant(t) for t in await store.list_tenants()]


def _check_other(store: SessionStore, other: SessionStore, field: str) -> None:
    """Refuse to move sessions between a store and itself: the copy would be the session,
    and deleting the original would delete it."""
    if other.engine is store.engine:
        raise InvalidInput(field, "is the same store: name another one")


def _failure(store: SessionStore, session_id: str, exc: SessionKeeperError) -> _Outcome:
    return "failed", 0, f"{store.tenant}/{session_id}: {exc}"


# --- walking the sessions a policy concerns ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Filter:
    """The sessions a policy acts on: by status (None: any), older than a cutoff."""

    statuses: Sequence[Status | None]
    created_before: datetime | None = None
    updated_before: datetime | None = None

    @property
    def order_by(self) -> Literal["created_at", "updated_at"]:
        return "created_at" if self.created_before is not None else "updated_at"

    async def count(self, store: SessionStore) -> int:
        return sum(
            [
                await store.count_sessions(
                    status=status,
                    created_before=self.created_before,
                    updated_before=self.updated_before,
                )
                for status in self.statuses
            ]
        )

    async def pages(self, store: SessionStore, size: int) -> AsyncIterator[list[SessionSummary]]:
        """The matching sessions, oldest first, a page at a time."""
        for status in self.statuses:
            cursor: str | None = None
            while True:
                page = await store.list_sessions(
                    status=status,
                    created_before=self.created_before,
                    updated_before=self.updated_before,
                    order_by=self.order_by,
                    descending=False,
                    limit=size,
                    cursor=cursor,
                )
                if page.items:
                    yield page.items
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor


@dataclass(slots=True)
class _Tally:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    messages: int = 0
    errors: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)
    seen: int = 0
    total: int = 0

    def add(self, store: SessionStore, session_id: str, outcome: _Outcome) -> None:
        kind, messages, error = outcome
        self.seen += 1
        if kind == "done":
            self.done += 1
            self.messages += messages
            if len(self.sample) < _MAX_SAMPLES:
                self.sample.append(f"{store.tenant}/{session_id}")
        elif kind == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            if len(self.errors) < _MAX_SAMPLES:
                self.errors.append(error)


async def _walk(
    tenants: list[SessionStore],
    which: _Filter,
    action: _Action,
    *,
    page_size: int,
    concurrency: int,
    progress: Progress | None,
) -> _Tally:
    """Run ``action`` on every session ``which`` selects in ``tenants``, ``concurrency``
    at a time; an error that is not the session's own (the engine is down) stops it."""
    tally = _Tally()
    if progress is not None:
        tally.total = sum([await which.count(t) for t in tenants])
        progress(0, tally.total)
    for tenant in tenants:
        async for page in which.pages(tenant, page_size):
            for start in range(0, len(page), concurrency):
                chunk = page[start : start + concurrency]
                # every task finishes before an error is raised: none is left running
                outcomes = await asyncio.gather(
                    *(action(tenant, s) for s in chunk), return_exceptions=True
                )
                for session, outcome in zip(chunk, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        raise outcome
                    tally.add(tenant, session.id, outcome)
                if progress is not None:
                    progress(tally.seen, max(tally.total, tally.seen))
    return tally


# --- the actions -------------------------------------------------------------------------


async def _set_archived(store: SessionStore, session: SessionSummary) -> _Outcome:
    try:
        await store.change_session(session.id, status="archived", expected_version=session.version)
    except (NotFound, VersionConflict):  # gone, or active again, since it was listed
        return "skipped", 0, ""
    except BackendUnavailable:
        raise
    except SessionKeeperError as exc:
        return _failure(store, session.id, exc)
    return "done", 0, ""


async def _delete(store: SessionStore, session: SessionSummary) -> _Outcome:
    try:
        await store.delete_session(session.id, expected_version=session.version)
    except (NotFound, VersionConflict):
        return "skipped", 0, ""
    return "done", 0, ""


async def _expire(store: SessionStore, session: SessionSummary) -> _Outcome:
    try:
        await store.expire_session(session.id, expected_version=session.version, last_seen=session)
    except (NotFound, VersionConflict):
        return "skipped", 0, ""
    return "done", 0, ""


async def _would(store: SessionStore, session: SessionSummary) -> _Outcome:
    """What a dry run does with a session: count it, with its messages."""
    return "done", session.message_count, ""


class _Folders:
    """Copies folders from one tenant's store to another as the sessions in them move,
    each at most once per run (a session can only be loaded into a folder that exists)."""

    __slots__ = ("_copied", "_known", "_lock", "_source", "_target")

    def __init__(self, source: SessionStore, target: SessionStore) -> None:
        self._source = source
        self._target = target
        self._copied: set[str] = set()
        self._known: dict[str, FolderRecord] | None = None
        self._lock = asyncio.Lock()

    async def ensure(self, folder_id: str) -> None:
        """Make sure the target has the folder ``folder_id``. Raises NotFound if the
        source has it no longer, AlreadyExists if its owner uses its name in the target."""
        if folder_id in self._copied:
            return
        async with self._lock:
            if folder_id in self._copied:
                return
            try:
                await self._target.get_folder(folder_id)
            except NotFound:
                await self._target.load_folder(await self._record(folder_id))
            self._copied.add(folder_id)

    async def _record(self, folder_id: str) -> FolderRecord:
        if self._known is None or folder_id not in self._known:
            self._known = {f.id: f for f in await self._source.export_folders()}
        if folder_id not in self._known:
            raise NotFound(f"no folder {folder_id!r}")
        return self._known[folder_id]


async def _drop_copy(store: SessionStore, session_id: str, version: int) -> None:
    with contextlib.suppress(NotFound, VersionConflict):
        await store.delete_session(session_id, expected_version=version)


def _mover(
    archive_store: SessionStore, cutoff: float
) -> Callable[[SessionStore, SessionSummary], Awaitable[_Outcome]]:
    """The action that moves a session of a tenant to the same tenant of ``archive_store``:
    copied exactly, then deleted from the source only once the copy has landed."""
    folders: dict[str, _Folders] = {}

    async def move(source: SessionStore, session: SessionSummary) -> _Outcome:
        target = archive_store.for_tenant(source.tenant)
        try:
            record, messages = await source.export_session(session.id)
        except NotFound:
            return "skipped", 0, ""
        if record.updated_at >= cutoff:  # active again since it was listed
            return "skipped", 0, ""
        try:
            if record.folder is not None:
                mover = folders.setdefault(source.tenant, _Folders(source, target))
                await mover.ensure(record.folder)
            # replace: the copy of a run that stopped before deleting the source is
            # overwritten by the source's session, which is the live one until it is gone
            outcome = await target.load_session(record, messages, replace=True)
        except BackendUnavailable:
            raise
        except SessionKeeperError as exc:
            return _failure(source, session.id, exc)
        if outcome == "expired":  # purge will take it
            return "skipped", 0, ""
        try:
            await source.delete_session(session.id, expected_version=record.version)
        except (NotFound, VersionConflict):
            # changed or deleted since it was copied: the source's fate wins
            await _drop_copy(target, record.id, record.version)
            return "skipped", 0, ""
        return "done", len(messages), ""

    return move


# --- archive -----------------------------------------------------------------------------


@dataclass(slots=True)
class ArchiveReport:
    """What ``archive`` did, or would do in a dry run."""

    dry_run: bool = False
    moved: bool = False
    older_than: float = 0.0
    cutoff: str = ""
    tenants: int = 0
    archived: int = 0
    messages: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


async def archive(
    store: SessionStore,
    *,
    older_than: float | timedelta,
    to: SessionStore | None = None,
    dry_run: bool = False,
    all_tenants: bool = False,
    batch_size: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
) -> ArchiveReport:
    """Archive the sessions whose last activity (``updated_at``) is more than
    ``older_than`` ago: set their status to ``archived`` (a change: new version,
    ``updated_at`` now), or with ``to``, move them to that store exactly as they are (ids,
    versions, times, expiry, messages, folders), deleting each from ``store`` only after
    its copy landed.

    Only ``store``'s tenant unless ``all_tenants``. A session changed, deleted or expired
    after it was listed is skipped. Safe to run again, also after a crash: a session
    copied but not yet deleted is copied again and then deleted. ``dry_run`` counts and
    samples what would be archived, changing nothing.
    """
    seconds = _seconds(older_than, "older_than")
    size = _page_size(store, batch_size)
    window = _concurrency(concurrency)
    if to is not None:
        _check_other(store, to, "to")
    started = time.perf_counter()
    cutoff = store.clock.now() - seconds
    report = ArchiveReport(dry_run=dry_run, moved=to is not None, older_than=seconds)
    report.cutoff = _utc(cutoff).isoformat()
    tenants = await _tenants(store, all_tenants)
    report.tenants = len(tenants)
    if to is None:
        # archived sessions are left alone, so a second run finds nothing to do
        which = _Filter(("active", "completed"), updated_before=_utc(cutoff))
        action: _Action = _set_archived
    else:
        which = _Filter((None,), updated_before=_utc(cutoff))
        action = _mover(to, cutoff)
    if dry_run:
        action = _would
    tally = await _walk(
        tenants, which, action, page_size=size, concurrency=window, progress=progress
    )
    report.archived = tally.done
    report.messages = tally.messages if to is not None else 0
    _tell(report, tally)
    report.seconds = time.perf_counter() - started
    return report


def _tell(report: ArchiveReport | PurgeReport, tally: _Tally) -> None:
    """What a walk skipped and failed, with its samples, into its report."""
    report.skipped = tally.skipped
    report.failed = tally.failed
    report.errors = tally.errors
    report.sample = tally.sample


# --- restore -----------------------------------------------------------------------------


@dataclass(slots=True)
class RestoreReport:
    """What ``restore`` did to one session, or would do in a dry run."""

    tenant: str
    session_id: str
    dry_run: bool = False
    moved: bool = False
    reactivated: bool = False
    messages: int = 0
    status: str = "active"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def restore(
    store: SessionStore,
    session_id: str,
    *,
    source: SessionStore | None = None,
    dry_run: bool = False,
) -> RestoreReport:
    """Bring an archived session back to ``store``, active.

    With ``source`` (the archive store ``archive(to=...)`` moved it to), the session is
    copied back exactly, deleted from the archive once the copy landed, and then, if its
    status is ``archived``, set to ``active``; without, its status is set from
    ``archived`` to ``active``. A session already live and not archived is left alone.
    Safe to run again after a crash. Raises NotFound if neither has the session, and
    AlreadyExists if ``store`` has another live session with its id.
    """
    if source is not None:
        _check_other(store, source, "source")
    report = RestoreReport(store.tenant, session_id, dry_run=dry_run)
    if source is not None:
        archived = source.for_tenant(store.tenant)
        try:
            record, messages = await archived.export_session(session_id)
        except NotFound:
            # restored already (perhaps by a run that stopped before reactivating it)
            try:
                await store.get_session(session_id)
            except NotFound:
                raise NotFound(
                    f"no session {session_id!r} in the archive nor in the store"
                ) from None
        else:
            report.moved = True
            report.messages = len(messages)
            if dry_run:
                store.check_loadable(record, messages)
                report.status = "active" if record.status == "archived" else record.status
                report.reactivated = record.status == "archived"
                return report
            await _bring_back(store, archived, record, messages)
    session = await store.get_session(session_id)
    report.status = session.status
    if session.status == "archived":
        report.reactivated = True
        report.status = "active"
        if not dry_run:
            await store.update_session(
                session_id, status="active", expected_version=session.version
            )
    return report


async def _bring_back(
    store: SessionStore,
    archived: SessionStore,
    record: SessionRecord,
    messages: list[MessageRecord],
) -> None:
    session_id = record.id
    if record.folder is not None:
        await _Folders(archived, store).ensure(record.folder)
    outcome = await store.load_session(record, messages)
    if outcome == "expired":
        raise NotFound(f"session {session_id!r} has expired in the archive")
    if outcome == "kept":
        # the copy of a run that stopped before deleting the archived one, or another
        # session with the same id
        live, _ = await store.export_session(session_id)
        same = (live.version, live.updated_at, live.last_seq)
        if same != (record.version, record.updated_at, record.last_seq):
            raise AlreadyExists(
                f"session {session_id!r} is live in the store and differs from the archived "
                "copy: delete one of them first"
            )
    with contextlib.suppress(NotFound):  # a concurrent restore removed it
        await archived.delete_session(session_id, expected_version=record.version)


# --- purge -------------------------------------------------------------------------------


@dataclass(slots=True)
class PurgeReport:
    """What ``purge`` deleted, or would delete in a dry run. ``expired`` is None when
    expired sessions were not asked for, or in a dry run: the engines count expired
    sessions only by purging them."""

    dry_run: bool = False
    expired: int | None = None
    older_than: float | None = None
    cutoff: str | None = None
    old: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def purged(self) -> int:
        return (self.expired or 0) + self.old

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "purged": self.purged, "ok": self.ok}


async def purge(
    store: SessionStore,
    *,
    expired: bool = False,
    older_than: float | timedelta | None = None,
    dry_run: bool = False,
    all_tenants: bool = False,
    batch_size: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
) -> PurgeReport:
    """Delete, with their messages, the sessions whose TTL has run out (``expired``)
    and those whose last activity (``updated_at``) is more than ``older_than`` ago, of
    any status. A session changed since it was listed is skipped. Only ``store``'s
    tenant unless ``all_tenants``. ``dry_run`` counts and samples the old sessions,
    deleting nothing (expired sessions it cannot count)."""
    if not expired and older_than is None:
        raise InvalidInput("older_than", "give older_than, expired=True, or both")
    seconds = None if older_than is None else _seconds(older_than, "older_than")
    size = _page_size(store, batch_size)
    window = _concurrency(concurrency)
    started = time.perf_counter()
    report = PurgeReport(dry_run=dry_run, older_than=seconds)
    if expired and not dry_run:
        report.expired = await store.purge_expired(batch_size=size, all_tenants=all_tenants)
    if seconds is not None:
        cutoff = store.clock.now() - seconds
        report.cutoff = _utc(cutoff).isoformat()
        tally = await _walk(
            await _tenants(store, all_tenants),
            _Filter((None,), updated_before=_utc(cutoff)),
            _would if dry_run else _delete,
            page_size=size,
            concurrency=window,
            progress=progress,
        )
        report.old = tally.done
        _tell(report, tally)
    report.seconds = time.perf_counter() - started
    return report


# --- the sweeper -------------------------------------------------------------------------


@dataclass(slots=True)
class SweepReport:
    """One pass of the sweeper: expired sessions purged, sessions past
    ``max_session_age`` archived or purged (``aged``), and those skipped because they
    changed on the way."""

    expired: int = 0
    aged: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sweeper:
    """Every ``interval`` seconds, purges the expired sessions of every tenant and applies
    ``max_session_age``: an asyncio task for services on engines without native TTL.

    ``interval`` and ``batch_size`` default to the ``sweep_interval`` and
    ``purge_batch_size`` settings; an interval of 0 (or a setting of None) disables it.
    Use ``async with Sweeper(store):`` or ``start()`` and ``stop()``. A pass that fails
    (the engine is down) is logged on ``sessionkeeper.maintenance`` and the next one runs
    on time; stopping cancels the task cleanly, between writes or in one (each write is
    atomic).
    """

    __slots__ = ("_batch_size", "_store", "_task", "interval", "last_report", "passes")

    def __init__(
        self,
        store: SessionStore,
        *,
        interval: float | None = None,
        batch_size: int | None = None,
    ) -> None:
        chosen = store.settings.sweep_interval if interval is None else interval
        if chosen is None:
            chosen = 0.0
        if isinstance(chosen, bool) or not isinstance(chosen, int | float):
            raise InvalidInput("interval", f"must be seconds, not {type(chosen).__name__}")
        if not 0 <= chosen < math.inf:
            raise InvalidInput("interval", "must be a finite number of seconds, 0 or more")
        self._store = store
        self._batch_size = _page_size(store, batch_size)
        self._task: asyncio.Task[None] | None = None
        self.interval = float(chosen)
        self.passes = 0
        self.last_report: SweepReport | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    async def sweep(self) -> SweepReport:
        """One pass, now: purge expired sessions, then apply ``max_session_age``."""
        store = self._store
        settings = store.settings
        started = time.perf_counter()
        report = SweepReport()
        report.expired = await store.purge_expired(batch_size=self._batch_size, all_tenants=True)
        if settings.max_session_age is not None:
            cutoff = _utc(store.clock.now() - settings.max_session_age)
            if settings.max_session_age_action == "purge":
                which = _Filter((None,), created_before=cutoff)
                action: _Action = _expire
            else:
                which = _Filter(("active", "completed"), created_before=cutoff)
                action = _set_archived
            tally = await _walk(
                await _tenants(store, True),
                which,
                action,
                page_size=self._batch_size,
                concurrency=DEFAULT_CONCURRENCY,
                progress=None,
            )
            report.aged = tally.done
            report.skipped = tally.skipped
            report.failed = tally.failed
            for error in tally.errors:
                _log.warning("sweeper: %s", error)
        report.seconds = time.perf_counter() - started
        return report

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled (at once if disabled)."""
        while self.enabled:
            try:
                self.last_report = await self.sweep()
            except Exception:
                _log.exception("sweeper: a pass failed; the next one runs in %g s", self.interval)
            self.passes += 1
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Run the sweeper as a task of the running event loop (nothing if disabled)."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self.run(), name="sessionkeeper-sweeper")

    async def stop(self) -> None:
        """Cancel the task and wait until it has stopped."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the caller was cancelled too, not only the sweeper

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
