"""Copying stores whole: the export format, export, import, migrate, verify and backup.

Everything here goes through the store's transfer methods (``list_tenants``,
``export_session``, ``export_folders``, ``load_session``, ``load_folder``), so a copy is
checked like any write and the source is never changed: nothing here renews a session.
Sessions stream page by page (a listing ordered by ``(created_at, id)``) with at most
``concurrency`` of them in memory, so memory stays flat however large the store.

The export format (version 2) is JSON Lines, one object per line, every object written
with sorted keys and no spaces (so two exports of equal stores are equal byte for byte):

1. a header: ``{"format":"sessionkeeper-export","version":2}``;
2. per tenant (sorted): its folders (by id), ``{"type":"folder","tenant",...}``, then its
   live sessions by ``(created_at, id)``, each ONE line ``{"type":"session",...}`` holding
   every field of the session and its messages, oldest first, then its analytics
   counters by day and owner, ``{"type":"daily","tenant","day","owner",...}``;
3. an end line with the counts: ``{"type":"end","tenants","folders","sessions",
   "messages","daily"}``, so a cut-off file is told from a whole one.

Version 1 files (no daily lines, no ``daily`` count) are read too.

Times are Unix seconds as written by the store (floats, exact); state, metadata and
content are JSON values. ``.jsonl.gz`` and ``.jsonl.zst`` files are compressed as they
stream (zstd needs ``pip install 'sessionkeeper[zstd]'``).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar, cast

import orjson

from .analytics import day_of
from .errors import AlreadyExists, BackendUnavailable, InvalidInput, NotFound, SessionKeeperError
from .models import DAILY_COUNTERS, DailyRecord, FolderRecord, MessageRecord, SessionRecord
from .store import SessionStore

__all__ = [
    "EXPORT_SUFFIXES",
    "FORMAT",
    "FORMAT_VERSION",
    "BackupReport",
    "ExportReport",
    "ImportReport",
    "MigrateReport",
    "OnConflict",
    "Progress",
    "VerifyReport",
    "backup",
    "daily_line",
    "daily_lines",
    "export_store",
    "import_file",
    "migrate",
    "records_of_line",
    "session_checksum",
    "session_line",
    "verify",
]

FORMAT = "sessionkeeper-export"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
EXPORT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DEFAULT_CONCURRENCY = 8
_DAILY_SPAN = 7_305  # days of analytics counters a migration copies: twenty years

OnConflict = Literal["skip", "overwrite", "fail"]
#: Called with (done, total) as work moves: sessions for export, migrate and verify,
#: bytes of the file read for import.
Progress = Callable[[int, int], None]

_PAGE = 500
_MAX_SAMPLES = 50  # errors and differing ids kept in a report; the counts count them all
_SESSION_FIELDS = (
    "tenant",
    "id",
    "owner",
    "folder",
    "title",
    "status",
    "step",
    "metadata",
    "state",
    "version",
    "created_at",
    "updated_at",
    "expires_at",
    "idle_ttl",
    "deadline",
    "message_count",
    "last_seq",
    "input_tokens",
    "output_tokens",
    "cost",
    "messages",
)
_MESSAGE_FIELDS = (
    "seq",
    "role",
    "content",
    "input_tokens",
    "output_tokens",
    "cost",
    "metadata",
    "created_at",
)
_FOLDER_FIELDS = ("tenant", "id", "owner", "name", "created_at")
_END_FIELDS = ("tenants", "folders", "sessions", "messages")
_DAILY_FIELDS = ("tenant", "day", "owner", *DAILY_COUNTERS)
_EPOCH = date(1970, 1, 1)

T = TypeVar("T")
_Export = tuple[SessionRecord, list[MessageRecord]]


# --- the format ------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS) + b"\n"


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def session_line(record: SessionRecord, messages: list[MessageRecord]) -> bytes:
    """The canonical export line of a session and its messages (ending in a newline)."""
    r = record
    return _dumps(
        {
            "type": "session",
            "tenant": r.tenant,
            "id": r.id,
            "owner": r.owner,
            "folder": r.folder,
            "title": r.title,
            "status": r.status,
            "step": r.step,
            "metadata": orjson.loads(r.metadata),
            "state": orjson.loads(r.state or "{}"),
            "version": r.version,
            "created_at": float(r.created_at),
            "updated_at": float(r.updated_at),
            "expires_at": _float(r.expires_at),
            "idle_ttl": _float(r.idle_ttl),
            "deadline": _float(r.deadline),
            "message_count": r.message_count,
            "last_seq": r.last_seq,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "cost": float(r.cost),
            "messages": [
                {
                    "seq": m.seq,
                    "role": m.role,
                    "content": orjson.loads(m.content),
                    "input_tokens": m.input_tokens,
                    "output_tokens": m.output_tokens,
                    "cost": float(m.cost),
                    "metadata": orjson.loads(m.metadata),
                    "created_at": float(m.created_at),
                }
                for m in messages
            ],
        }
    )


def session_checksum(record: SessionRecord, messages: list[MessageRecord]) -> str:
    """A checksum of a session and its messages: BLAKE2b-128 of its canonical line."""
    return hashlib.blake2b(session_line(record, messages), digest_size=16).hexdigest()


def _folder_line(record: FolderRecord) -> bytes:
    r = record
    return _dumps(
        {
            "type": "folder",
            "tenant": r.tenant,
            "id": r.id,
            "owner": r.owner,
            "name": r.name,
            "created_at": float(r.created_at),
        }
    )


def _check_fields(value: object, names: tuple[str, ...], what: str, prefix: str = "") -> None:
    if not isinstance(value, dict):
        raise InvalidInput(prefix or what, "must be a JSON object")
    for name in names:
        if name not in value:
            raise InvalidInput(f"{prefix}{name}", f"is missing from the {what}")
    unknown = sorted(set(value) - set(names) - {"type"})
    if unknown:
        raise InvalidInput(f"{prefix}{unknown[0]}", f"is not a field of a {what}")


def daily_line(tenant: str, row: DailyRecord) -> bytes:
    """One day's analytics counters of one owner as an export line."""
    counters = {name: getattr(row, name) for name in DAILY_COUNTERS}
    day = (_EPOCH + timedelta(days=row.day)).isoformat()
    return _dumps({"type": "daily", "tenant": tenant, "day": day, "owner": row.owner, **counters})


async def daily_lines(tenant: SessionStore) -> list[bytes]:
    """The export lines of a tenant's analytics counters of the last twenty years, by day
    and owner (after what the store counted is written)."""
    await tenant.flush_analytics()
    today = day_of(tenant.clock.now())
    rows = await tenant.engine.read_daily(
        tenant.tenant, today - _DAILY_SPAN, today + 1, None, False
    )
    rows.sort(key=lambda r: (r.day, r.owner or ""))
    return [daily_line(tenant.tenant, row) for row in rows]


def _daily_of_line(line: dict[str, Any]) -> tuple[str, DailyRecord]:
    _check_fields(line, _DAILY_FIELDS, "daily line")
    tenant, day, owner = line["tenant"], line["day"], line["owner"]
    if not isinstance(tenant, str):
        raise InvalidInput("tenant", f"must be a string, not {type(tenant).__name__}")
    try:
        number = (date.fromisoformat(day) - _EPOCH).days
    except (TypeError, ValueError):
        raise InvalidInput("day", f"must be a date as YYYY-MM-DD, not {day!r}") from None
    if owner is not None and (not isinstance(owner, str) or not owner):
        raise InvalidInput("owner", "must be a non-empty string or null")
    row = DailyRecord(number, owner)
    for name in DAILY_COUNTERS:
        value = line[name]
        if name == "cost":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput("cost", f"must be a number, not {type(value).__name__}")
            value = float(value)
            if not 0 <= value < float("inf"):
                raise InvalidInput("cost", "must be a finite number, 0 or more")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(name, f"must be a whole number, 0 or more, not {value!r}")
        setattr(row, name, value)
    return tenant, row


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def records_of_line(line: dict[str, Any]) -> tuple[SessionRecord, list[MessageRecord]]:
    """The records of a parsed session line; the store checks their values when loading."""
    _check_fields(line, _SESSION_FIELDS, "session line")
    raw_messages = line["messages"]
    if not isinstance(raw_messages, list):
        raise InvalidInput("messages", "must be a list")
    session_id = line["id"]
    messages = []
    for index, m in enumerate(raw_messages):
        _check_fields(m, _MESSAGE_FIELDS, "message", f"messages[{index}].")
        messages.append(
            MessageRecord(
                session_id=session_id,
                seq=m["seq"],
                role=m["role"],
                content=_json_text(m["content"]),
                input_tokens=m["input_tokens"],
                output_tokens=m["output_tokens"],
                cost=m["cost"],
                metadata=_json_text(m["metadata"]),
                created_at=m["created_at"],
            )
        )
    record = SessionRecord(
        tenant=line["tenant"],
        id=session_id,
        owner=line["owner"],
        folder=line["folder"],
        title=line["title"],
        status=line["status"],
        step=line["step"],
        metadata=_json_text(line["metadata"]),
        state=_json_text(line["state"]),
        version=line["version"],
        created_at=line["created_at"],
        updated_at=line["updated_at"],
        expires_at=line["expires_at"],
        idle_ttl=line["idle_ttl"],
        deadline=line["deadline"],
        message_count=line["message_count"],
        last_seq=line["last_seq"],
        input_tokens=line["input_tokens"],
        output_tokens=line["output_tokens"],
        cost=line["cost"],
    )
    return record, messages


def _folder_of_line(line: dict[str, Any]) -> FolderRecord:
    _check_fields(line, _FOLDER_FIELDS, "folder line")
    return FolderRecord(
        tenant=line["tenant"],
        id=line["id"],
        owner=line["owner"],
        name=line["name"],
        created_at=line["created_at"],
    )


# --- files -----------------------------------------------------------------------------


def is_export_path(path: str | Path) -> bool:
    """Whether ``path`` names an export file by its suffix."""
    return str(path).endswith(EXPORT_SUFFIXES)


def _export_path(path: str | Path, field: str) -> Path:
    if not isinstance(path, str | Path) or not str(path):
        raise InvalidInput(field, "must be a file path")
    if not is_export_path(path):
        raise InvalidInput(field, f"must end with {', '.join(EXPORT_SUFFIXES)}: {str(path)!r}")
    return Path(path)


def _zstandard() -> Any:
    try:
        import zstandard
    except ModuleNotFoundError:
        raise InvalidInput(
            "path", ".jsonl.zst files need zstandard: pip install 'sessionkeeper[zstd]'"
        ) from None
    return zstandard


@contextmanager
def _writer(path: Path) -> Iterator[IO[bytes]]:
    """A file that compresses by suffix and appears at ``path`` only once it is whole."""
    partial = path.with_name(path.name + ".part")
    try:
        raw = open(partial, "wb")  # noqa: SIM115 - closed below, after the compressor
    except OSError as exc:
        raise InvalidInput("path", f"cannot write {str(path)!r}: {exc.strerror}") from None
    try:
        stream: IO[bytes]
        if path.name.endswith(".gz"):
            # no name and mtime 0, so equal exports compress to equal bytes
            stream = cast(IO[bytes], gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
        elif path.name.endswith(".zst"):
            stream = _zstandard().ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        else:
            stream = raw
        yield stream
        if stream is not raw:
            stream.close()
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        os.replace(partial, path)
    except BaseException:
        raw.close()
        partial.unlink(missing_ok=True)
        raise


@contextmanager
def _reader(path: Path) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """The decompressed lines of ``path`` and the raw file (whose position is progress)."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidInput("path", f"cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        stream: IO[bytes]
        if path.name.endswith(".gz"):
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
        elif path.name.endswith(".zst"):
            reader = _zstandard().ZstdDecompressor().stream_reader(raw, closefd=False)
            stream = io.BufferedReader(reader, 1 << 16)
        else:
            stream = raw
        yield stream, raw
    finally:
        raw.close()


# --- a window of concurrent work, results in order --------------------------------------


class _Window(Generic[T]):
    """Runs up to ``size`` coroutines at once and hands their results back in order."""

    __slots__ = ("_pending", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._pending: deque[asyncio.Task[T]] = deque()

    async def push(self, work: Awaitable[T]) -> list[T]:
        """Start ``work``; return the results (in order) of what had to finish first."""
        self._pending.append(asyncio.ensure_future(work))
        done = []
        while len(self._pending) >= self._size or (self._pending and self._pending[0].done()):
            done.append(await self._pending.popleft())
        return done

    async def drain(self) -> list[T]:
        done = []
        while self._pending:
            done.append(await self._pending.popleft())
        return done

    async def cancel(self) -> None:
        """Cancel what is still running and wait for it (each load is atomic)."""
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()


def _concurrency(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise InvalidInput("concurrency", f"must be an integer from 1 to 256, not {value!r}")
    return value


async def _session_ids(store: SessionStore) -> AsyncIterator[list[str]]:
    """The ids of the tenant's live sessions by (created_at, id), a page at a time."""
    cursor: str | None = None
    limit = min(_PAGE, store.settings.max_page_size)
    while True:
        page = await store.list_sessions(
            order_by="created_at", descending=False, limit=limit, cursor=cursor
        )
        if page.items:
            yield [s.id for s in page.items]
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


async def _tenants(store: SessionStore) -> list[SessionStore]:
    return [store.for_tenant(t) for t in await store.list_tenants()]


async def _total(tenants: list[SessionStore]) -> int:
    return sum([await t.count_sessions() for t in tenants])


def _noop(done: int, total: int) -> None:
    return None


async def _exported(
    store: SessionStore, session_id: str
) -> tuple[SessionRecord, list[MessageRecord]] | None:
    try:
        return await store.export_session(session_id)
    except NotFound:  # expired or deleted since it was listed
        return None


# --- export ----------------------------------------------------------------------------


@dataclass(slots=True)
class ExportReport:
    path: str
    tenants: int = 0
    folders: int = 0
    sessions: int = 0
    messages: int = 0
    daily: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def export_store(
    store: SessionStore,
    path: str | Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
) -> ExportReport:
    """Write every tenant's folders and live sessions to ``path`` (``.jsonl``,
    ``.jsonl.gz`` or ``.jsonl.zst``) in the canonical format. The file appears only when
    it is whole. The store is read, never changed."""
    target = _export_path(path, "path")
    window_size = _concurrency(concurrency)
    report = ExportReport(path=str(target))
    started = time.perf_counter()
    tell = progress or _noop
    tenants = await _tenants(store)
    total = await _total(tenants)
    tell(0, total)
    with _writer(target) as out:

        def write(found: _Export | None) -> None:
            if found is not None:
                out.write(session_line(*found))
                report.sessions += 1
                report.messages += len(found[1])
                tell(report.sessions, total)

        out.write(_dumps({"format": FORMAT, "version": FORMAT_VERSION}))
        for tenant in tenants:
            report.tenants += 1
            for folder in await tenant.export_folders():
                out.write(_folder_line(folder))
                report.folders += 1
            window: _Window[_Export | None] = _Window(window_size)
            try:
                async for ids in _session_ids(tenant):
                    for session_id in ids:
                        for found in await window.push(_exported(tenant, session_id)):
                            write(found)
                for found in await window.drain():
                    write(found)
            finally:
                await window.cancel()
            for line in await daily_lines(tenant):
                out.write(line)
                report.daily += 1
        out.write(
            _dumps(
                {
                    "type": "end",
                    "tenants": report.tenants,
                    "folders": report.folders,
                    "sessions": report.sessions,
                    "messages": report.messages,
                    "daily": report.daily,
                }
            )
        )
    report.seconds = time.perf_counter() - started
    return report


# --- import ----------------------------------------------------------------------------


@dataclass(slots=True)
class LineError:
    """A line that was not imported, and why."""

    line: int
    error: str


@dataclass(slots=True)
class ImportReport:
    path: str
    dry_run: bool = False
    imported: int = 0
    skipped: int = 0
    expired: int = 0
    failed: int = 0
    messages: int = 0
    folders_imported: int = 0
    folders_skipped: int = 0
    daily: int = 0  # analytics counter rows set (or, dry, read)
    errors: list[LineError] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Loaded:
    """What became of one session line."""

    line: int
    session_id: str
    outcome: str | SessionKeeperError
    messages: int


def _at_line(line: int, exc: SessionKeeperError) -> SessionKeeperError:
    """The same error, naming the line of the file it came from."""
    if isinstance(exc, InvalidInput):
        return InvalidInput(f"line {line}: {exc.field}", exc.reason)
    if isinstance(exc, AlreadyExists | NotFound):
        return type(exc)(f"line {line}: {exc}")
    return exc


def _on_conflict(value: object) -> OnConflict:
    if value not in ("skip", "overwrite", "fail"):
        raise InvalidInput("on_conflict", f"must be skip, overwrite or fail, not {value!r}")
    return value


async def import_file(
    store: SessionStore,
    path: str | Path,
    *,
    on_conflict: OnConflict = "skip",
    keep_going: bool = False,
    dry_run: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
) -> ImportReport:
    """Load an export file into the store, each session atomically, into the tenants the
    file names.

    A session or folder whose id is taken is kept (``skip``), replaced (``overwrite``) or
    stops the import (``fail``). A line that is not valid stops the import with an error
    naming the line and the reason, after the lines before it have landed and before any
    line after it is written; with ``keep_going`` it is counted as failed, listed in the
    report, and the import goes on. Either way no session is half imported. Sessions
    whose ``expires_at`` has passed are counted as expired and not written. ``dry_run``
    checks every line and counts what would happen, writing nothing.
    """
    source = _export_path(path, "path")
    run = _Import(store, _on_conflict(on_conflict), keep_going, dry_run, _concurrency(concurrency))
    report = run.report
    report.path = str(source)
    started = time.perf_counter()
    tell = progress or _noop
    try:
        with _reader(source) as (lines, raw):
            size = os.fstat(raw.fileno()).st_size
            for number, text in enumerate(_readable(lines), 1):
                if isinstance(text, Exception):  # the decompressor could not go on
                    await run.settle(await run.window.drain())
                    raise InvalidInput(f"line {number}", f"the file is damaged or cut off: {text}")
                if number % 256 == 0:
                    tell(raw.tell(), size)
                await run.line(number, text)
            await run.finish()
    finally:
        await run.window.cancel()
    tell(size, size)
    report.seconds = time.perf_counter() - started
    return report


def _readable(lines: IO[bytes]) -> Iterator[bytes | Exception]:
    """The lines, then the error that stopped the decompressor (gzip's EOFError or
    BadGzipFile, zstd's ZstdError), if one did."""
    try:
        yield from lines
    except Exception as exc:  # each compressor has errors of its own
        yield exc


class _Import:
    """One import, line by line: sessions are checked in line order, then written up to
    ``concurrency`` at a time; their outcomes are counted in line order."""

    def __init__(
        self,
        store: SessionStore,
        conflict: OnConflict,
        keep_going: bool,
        dry_run: bool,
        concurrency: int,
    ) -> None:
        self.store = store
        self.conflict = conflict
        self.keep_going = keep_going
        self.dry_run = dry_run
        self.replace = conflict == "overwrite"
        self.report = ImportReport(path="", dry_run=dry_run)
        self.window: _Window[_Loaded] = _Window(concurrency)
        self.tenants: dict[str, SessionStore] = {}
        self.lines = 0
        self.sessions_read = 0
        self.daily_read = 0
        self.version = FORMAT_VERSION
        self.ended = False
        # daily lines waiting to be set, for one tenant at a time
        self.daily: list[DailyRecord] = []
        self.daily_tenant: str | None = None

    def tenant(self, name: object) -> SessionStore:
        if not isinstance(name, str):
            raise InvalidInput("tenant", f"must be a string, not {type(name).__name__}")
        if name not in self.tenants:
            self.tenants[name] = self.store.for_tenant(name)
        return self.tenants[name]

    async def fail(self, number: int, exc: SessionKeeperError) -> None:
        """Count a failed line; stop (once what came before has landed) unless keep_going."""
        self.report.failed += 1
        located = _at_line(number, exc)
        if not self.keep_going:
            # lines before this one land first; the first of them to fail is the error
            await self.settle(await self.window.drain())
            raise located
        if len(self.report.errors) < _MAX_SAMPLES:
            self.report.errors.append(LineError(number, str(located)))

    async def settle(self, results: list[_Loaded]) -> None:
        report = self.report
        for result in results:
            outcome = result.outcome
            if isinstance(outcome, SessionKeeperError):
                await self.fail(result.line, outcome)
            elif outcome == "loaded":
                report.imported += 1
                report.messages += result.messages
            elif outcome == "expired":
                report.expired += 1
            elif self.conflict == "fail":
                exists = AlreadyExists(f"session {result.session_id!r} already exists")
                await self.fail(result.line, exists)
            else:
                report.skipped += 1

    async def load(
        self, number: int, record: SessionRecord, messages: list[MessageRecord]
    ) -> _Loaded:
        try:
            outcome = await self.tenant(record.tenant).load_session(
                record, messages, replace=self.replace, dry_run=self.dry_run
            )
        except BackendUnavailable:
            raise
        except SessionKeeperError as exc:
            return _Loaded(number, record.id, exc, 0)
        return _Loaded(number, record.id, outcome, len(messages))

    async def line(self, number: int, text: bytes) -> None:
        self.lines = number
        if number == 1:
            self.version = _check_header(text)
            return
        if not text.strip():
            return
        if self.ended:
            raise InvalidInput(f"line {number}", "comes after the end line")
        try:
            kind, parsed = _parse_line(text, self.version)
            if kind == "session":
                self.sessions_read += 1
                # checked before it is queued, so nothing after a bad line is written
                record, messages = self.tenant(parsed[0].tenant).check_loadable(*parsed)
        except InvalidInput as exc:
            await self.fail(number, exc)
            return
        if kind == "session":
            await self.settle(await self.window.push(self.load(number, record, messages)))
            return
        if kind == "daily":
            await self.queue_daily(*parsed)
            return
        await self.settle(await self.window.drain())  # what came before lands first
        try:
            await self.set_daily()
            if kind == "folder":
                await self.load_folder(parsed)
            else:
                self.end(parsed)
        except BackendUnavailable:
            raise
        except SessionKeeperError as exc:
            await self.fail(number, exc)

    async def load_folder(self, folder: FolderRecord) -> None:
        written = await self.tenant(folder.tenant).load_folder(
            folder, replace=self.replace, dry_run=self.dry_run
        )
        if written:
            self.report.folders_imported += 1
        elif self.conflict == "fail":
            raise AlreadyExists(f"folder {folder.id!r} already exists")
        else:
            self.report.folders_skipped += 1

    async def queue_daily(self, tenant: str, row: DailyRecord) -> None:
        """Keep a daily line; a tenant's lines are set together (set, not added, so an
        import run again changes nothing), after its sessions landed."""
        self.daily_read += 1
        if tenant != self.daily_tenant:
            await self.settle(await self.window.drain())
            await self.set_daily()
            self.daily_tenant = tenant
        self.daily.append(row)
        if len(self.daily) >= _PAGE:
            await self.set_daily()

    async def set_daily(self) -> None:
        rows, self.daily = self.daily, []
        if not rows or self.daily_tenant is None:
            return
        if not self.dry_run:
            rows.sort(key=lambda r: (r.day, r.owner or ""))
            await self.store.engine.add_daily(self.tenant(self.daily_tenant).tenant, rows, True)
        self.report.daily += len(rows)

    def end(self, line: dict[str, Any]) -> None:
        self.ended = True
        if not self.report.failed and line["sessions"] != self.sessions_read:
            raise InvalidInput(
                "sessions",
                f"the end line counts {line['sessions']!r} sessions, "
                f"the file has {self.sessions_read}",
            )
        if not self.report.failed and line.get("daily", 0) != self.daily_read:
            raise InvalidInput(
                "daily",
                f"the end line counts {line['daily']!r} daily lines, the file has "
                f"{self.daily_read}",
            )

    async def finish(self) -> None:
        await self.settle(await self.window.drain())
        await self.set_daily()
        if self.lines == 0:
            raise InvalidInput("path", "holds no lines: not an export, or cut off")
        if not self.ended:
            cut = InvalidInput("end", "the file ends without its end line: it was cut off")
            await self.fail(self.lines + 1, cut)


def _parse_line(text: bytes, version: int = FORMAT_VERSION) -> tuple[str, Any]:
    """("session", (record, messages)), ("folder", record), ("daily", (tenant, row)) or
    ("end", the line)."""
    try:
        line = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("line", f"is not JSON: {exc}") from None
    kind = line.get("type") if isinstance(line, dict) else None
    if kind == "session":
        return kind, records_of_line(line)
    if kind == "folder":
        return kind, _folder_of_line(line)
    if kind == "daily" and version >= 2:
        return kind, _daily_of_line(line)
    if kind == "end":
        _check_fields(line, (*_END_FIELDS, "daily") if version >= 2 else _END_FIELDS, "end line")
        return kind, line
    if version >= 2:
        raise InvalidInput("type", "must be folder, session, daily or end")
    raise InvalidInput("type", "must be folder, session or end")


def _check_header(text: bytes) -> int:
    """The format version of a header line; InvalidInput if it is none this reads."""
    try:
        line = orjson.loads(text)
    except orjson.JSONDecodeError:
        line = None
    if not isinstance(line, dict) or line.get("format") != FORMAT:
        raise InvalidInput("line 1", f"is not a {FORMAT} header: not an export file")
    version = line.get("version")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise InvalidInput(
            "line 1",
            f"is format version {version!r}; this sessionkeeper reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}",
        )
    return int(version)


# --- migrate and verify ----------------------------------------------------------------


@dataclass(slots=True)
class VerifyReport:
    tenants: int = 0
    source_sessions: int = 0
    destination_sessions: int = 0
    matched: int = 0
    different: int = 0
    missing: int = 0
    extra: int = 0
    source_folders: int = 0
    folders_matched: int = 0
    folders_different: int = 0
    folders_missing: int = 0
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.different or self.missing or self.extra or self.folders_different) and (
            not self.folders_missing
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(slots=True)
class MigrateReport:
    dry_run: bool = False
    tenants: int = 0
    copied: int = 0
    replaced: int = 0
    unchanged: int = 0
    expired: int = 0
    failed: int = 0
    messages: int = 0
    folders_copied: int = 0
    folders_replaced: int = 0
    folders_unchanged: int = 0
    folders_failed: int = 0
    daily_rows: int = 0  # analytics counters, one per tenant, day and owner, copied
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verify: VerifyReport | None = None

    @property
    def ok(self) -> bool:
        """Nothing failed, and the verify (if one ran) found the two sides equal."""
        clean = not self.failed and not self.folders_failed
        return clean and (self.verify is None or self.verify.ok)

    @property
    def sessions_per_second(self) -> float:
        moved = self.copied + self.replaced + self.unchanged
        return moved / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["sessions_per_second"] = round(self.sessions_per_second, 1)
        data["verify"] = None if self.verify is None else self.verify.to_dict()
        return data


def _same_folder(a: FolderRecord, b: FolderRecord) -> bool:
    return (a.id, a.owner, a.name, a.created_at) == (b.id, b.owner, b.name, b.created_at)


async def migrate(
    source: SessionStore,
    destination: SessionStore,
    *,
    dry_run: bool = False,
    verify_after: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
) -> MigrateReport:
    """Copy every tenant's folders and live sessions from ``source`` to ``destination``.

    Ids, versions, timestamps, absolute expiry (so the remaining TTL), folders and
    messages (seqs kept) are kept; expired sessions are not copied; the analytics
    counters of the last twenty years come along (set, not added); the source is only
    read. Safe to run again, also after a crash: a session the destination already holds
    unchanged is left alone, one that differs (changed in the source since) is replaced
    by the source's copy, and nothing is ever duplicated. Sessions the destination has
    and the source has not are left alone. ``dry_run`` counts what would be copied or
    replaced, writing nothing; ``verify_after`` runs ``verify`` when done.
    """
    window_size = _concurrency(concurrency)
    report = MigrateReport(dry_run=dry_run)
    started = time.perf_counter()
    tell = progress or _noop
    tenants = await _tenants(source)
    total = await _total(tenants)
    done = 0
    tell(0, total)
    await source.flush_analytics()  # what this process counted is copied too
    today = day_of(source.clock.now())

    def count(result: tuple[str, int, str]) -> None:
        nonlocal done
        outcome, messages, error = result
        done += 1
        tell(done, total)
        if outcome == "copied":
            report.copied += 1
            report.messages += messages
        elif outcome == "replaced":
            report.replaced += 1
            report.messages += messages
        elif outcome == "unchanged":
            report.unchanged += 1
        elif outcome == "expired":
            report.expired += 1
        else:
            report.failed += 1
            if len(report.errors) < _MAX_SAMPLES:
                report.errors.append(error)

    for tenant in tenants:
        report.tenants += 1
        target = destination.for_tenant(tenant.tenant)
        await _migrate_folders(tenant, target, report, dry_run)
        window: _Window[tuple[str, int, str]] = _Window(window_size)
        try:
            async for ids in _session_ids(tenant):
                for session_id in ids:
                    for result in await window.push(
                        _copy_session(tenant, target, session_id, dry_run)
                    ):
                        count(result)
            for result in await window.drain():
                count(result)
        finally:
            await window.cancel()
        rows = await source.engine.read_daily(
            tenant.tenant, today - _DAILY_SPAN, today + 1, None, False
        )
        if rows and not dry_run:
            await target.engine.add_daily(target.tenant, rows, replace=True)
        report.daily_rows += len(rows)
    report.seconds = time.perf_counter() - started
    if verify_after and not dry_run:
        report.verify = await verify(
            source, destination, concurrency=window_size, progress=progress
        )
    return report


async def _migrate_folders(
    source: SessionStore, target: SessionStore, report: MigrateReport, dry_run: bool
) -> None:
    existing = {f.id: f for f in await target.export_folders()}
    for folder in await source.export_folders():
        there = existing.get(folder.id)
        try:
            if there is None:
                await target.load_folder(folder, dry_run=dry_run)
                report.folders_copied += 1
            elif _same_folder(folder, there):
                report.folders_unchanged += 1
            else:
                await target.load_folder(folder, replace=True, dry_run=dry_run)
                report.folders_replaced += 1
        except BackendUnavailable:
            raise
        except SessionKeeperError as exc:  # say a folder of the owner has its name there
            report.folders_failed += 1
            if len(report.errors) < _MAX_SAMPLES:
                report.errors.append(f"{source.tenant}/folder {folder.id}: {exc}")


async def _copy_session(
    source: SessionStore, target: SessionStore, session_id: str, dry_run: bool
) -> tuple[str, int, str]:
    """Copy one session: ("copied" | "replaced" | "unchanged" | "expired" | "failed",
    messages written, the error of a failure)."""
    found = await _exported(source, session_id)
    if found is None:
        return "expired", 0, ""
    record, messages = found
    try:
        outcome = await target.load_session(record, messages, dry_run=dry_run)
        if outcome == "loaded":
            return "copied", len(messages), ""
        if outcome == "expired":
            return "expired", 0, ""
        there = await _exported(target, session_id)
        if there is not None and session_line(*there) == session_line(record, messages):
            return "unchanged", 0, ""
        outcome = await target.load_session(record, messages, replace=True, dry_run=dry_run)
        return ("replaced", len(messages), "") if outcome == "loaded" else ("expired", 0, "")
    except BackendUnavailable:
        raise
    except SessionKeeperError as exc:
        return "failed", 0, f"{source.tenant}/{session_id}: {exc}"


async def verify(
    source: SessionStore,
    destination: SessionStore,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare every tenant's live sessions and folders of ``source`` with
    ``destination``: counts, and each session's checksum (its canonical line) on both
    sides. Reads only; renews nothing."""
    window_size = _concurrency(concurrency)
    report = VerifyReport()
    started = time.perf_counter()
    tell = progress or _noop
    tenants = await _tenants(source)
    total = await _total(tenants)
    done = 0
    tell(0, total)

    def count(result: tuple[str, str]) -> None:
        nonlocal done
        outcome, name = result
        done += 1
        tell(done, total)
        if outcome == "matched":
            report.matched += 1
        elif outcome == "gone":
            return
        else:
            if outcome == "missing":
                report.missing += 1
            else:
                report.different += 1
            if len(report.samples) < _MAX_SAMPLES:
                report.samples.append(f"{outcome}: {name}")

    names = set(await source.list_tenants()) | set(await destination.list_tenants())
    for name in sorted(names):
        report.tenants += 1
        tenant = source.for_tenant(name)
        target = destination.for_tenant(name)
        report.destination_sessions += await target.count_sessions()
        theirs = {f.id: f for f in await target.export_folders()}
        for folder in await tenant.export_folders():
            report.source_folders += 1
            there = theirs.get(folder.id)
            if there is None:
                report.folders_missing += 1
            elif _same_folder(folder, there):
                report.folders_matched += 1
            else:
                report.folders_different += 1
        window: _Window[tuple[str, str]] = _Window(window_size)
        try:
            async for ids in _session_ids(tenant):
                for session_id in ids:
                    for result in await window.push(_compare(tenant, target, session_id)):
                        count(result)
            for result in await window.drain():
                count(result)
        finally:
            await window.cancel()
    report.source_sessions = report.matched + report.different + report.missing
    report.extra = max(report.destination_sessions - report.matched - report.different, 0)
    report.seconds = time.perf_counter() - started
    return report


async def _compare(source: SessionStore, target: SessionStore, session_id: str) -> tuple[str, str]:
    name = f"{source.tenant}/{session_id}"
    mine = await _exported(source, session_id)
    if mine is None:
        return "gone", name
    theirs = await _exported(target, session_id)
    if theirs is None:
        return "missing", name
    if session_checksum(*mine) != session_checksum(*theirs):
        return "different", name
    return "matched", name


# --- backup ----------------------------------------------------------------------------


@dataclass(slots=True)
class BackupReport:
    path: str
    method: Literal["sqlite-backup", "export"]
    bytes: int = 0
    seconds: float = 0.0
    export: ExportReport | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["export"] = None if self.export is None else self.export.to_dict()
        return data


async def backup(
    store: SessionStore, dest: str | Path, *, progress: Progress | None = None
) -> BackupReport:
    """Back the whole store up to ``dest``: an export when ``dest`` ends with ``.jsonl``,
    ``.jsonl.gz`` or ``.jsonl.zst`` (any engine), else a copy of the SQLite database
    made with SQLite's online backup API while writers keep writing."""
    if not isinstance(dest, str | Path) or not str(dest):
        raise InvalidInput("dest", "must be a file path")
    target = Path(dest)
    started = time.perf_counter()
    if is_export_path(target):
        exported = await export_store(store, target, progress=progress)
        report = BackupReport(str(target), "export", export=exported)
    elif store.can_backup_file:
        await store.backup_file(target)
        report = BackupReport(str(target), "sqlite-backup")
    else:
        raise InvalidInput(
            "dest",
            f"a {store.engine.name} store is backed up by export: "
            f"name a file ending with {', '.join(EXPORT_SUFFIXES)}",
        )
    report.bytes = os.stat(target).st_size
    report.seconds = time.perf_counter() - started
    return report
