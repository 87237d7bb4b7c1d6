"""The JSON-files engine: one JSON record and one append-only JSONL log per session.

Layout under the root folder of ``file:///path/dir``::

    sessionkeeper.json                      {"format": 1}: marks the folder as a store
    tenants/<tenant>/sessions/<id>.json     a session: fields, aggregates, state inline
    tenants/<tenant>/sessions/<id>.jsonl    its messages, one JSON object a line, by seq
    tenants/<tenant>/folders/<id>.json      a folder
    tenants/<tenant>/guards/<sha256>.json   a guard (rate limit, login failures, budget)
    locks/                                  lock files only, never data
    tmp/                                    files being written (<pid>.<engine>.<n>.tmp)
    quarantine/<tenant>/<kind>/             damaged files, moved aside with a warning

Names. A tenant or id becomes part of a path only after it matched ``rules.ID_PATTERN``
again here (letters, digits and ``._:-``, not starting with a dot, at most 128), so no name
holds a separator, a NUL or a ``..``; each tenant folder is resolved once and must lie
inside the resolved root. Guard keys are free text, so their files are named by a hash.

Locks. ``flock`` on dedicated lock files. A session is guarded by one of 64 stripes,
``locks/sessions-<nn>.lock``, by a CRC of its tenant and id: exclusively to write, shared
to read. Each stripe file is opened once per engine and also guarded by a
``threading.Lock``, because flock belongs to the open file description: two threads using
one descriptor would not exclude each other, while other descriptors of any file (in this
process or another) never release it, unlike POSIX ``fcntl``/``lockf`` locks. Folder
writes hold ``locks/tenant-<t>.lock`` exclusively; session writes that name a folder share
it first, so locks are always taken tenant first, then one stripe at a time. Guards use
``locks/guards-<xx>.lock``. The waits happen on the engine's threads, never on the loop.

Records are checkpoints. A record holds the session as of ``log_size`` bytes of its log.
An append writes only the log: its lines in one ``write()`` on a descriptor opened with
``O_APPEND``, then ``fsync``. Each line carries the ``version`` its call made and the
``batch_end`` seq of that call, so a reader rolls the record forward over every whole call
after ``log_size`` with ``rules.apply_append``. Every other change writes the record; an
append writes it when 128 lines (or 64 KiB) have piled up past it. Appenders of one session
in one process share one lock hold, one ``write()`` and one ``fsync`` (group commit).

Write order, and what a crash leaves:

- Records: a temp file in ``tmp/``, ``fsync``, ``os.replace``, then ``fsync`` of the
  folder (checkpoints and idle renewals skip the last: losing one only means rolling
  forward further, or expiring a little early). A crash leaves the old record or the new
  one, and maybe a temp file, removed at the next open once its process is gone.
- Appends: a crash mid-``write()`` leaves a partial call at the end of the log. Readers
  stop at the last whole call that continues the record (next seq, next version), so a
  partial line or call is never returned; the next writer truncates it under the lock.
- Changes that append (``change_session``) mark their lines ``in_change``: they count only
  once the record that follows them names them, so a crash between log and record drops
  the messages with the rest of the change.
- Pop and clear write the record first (its ``log_size`` ends before the removed lines),
  then truncate the log: lines past ``log_size`` whose seqs the record already counts are
  never rolled forward, and the next writer truncates them.
- Delete removes the record (the commit), then the log. A new session with the id empties
  a leftover log durably before its record exists, so it never adopts old lines.

A record that is not valid JSON of the expected shape, a log shorter than its record says,
or a damaged line inside the committed log moves the session's files to ``quarantine/``
with a warning on the ``sessionkeeper.files`` logger; the session then reads as absent and
``quarantined()`` lists the files. Damaged folder files are quarantined the same way.

Caches. Each stripe file also holds one 8-byte change counter per slot (4096 slots, by the
same CRC); every write of a record (or its removal) adds one to its slot under the
exclusive lock. A session's rolled-forward head and its open log descriptor are kept in
memory (a bounded LRU) and trusted while the counter and the log's size are unchanged, so
an append reads no record: lock, counter, ``fstat``, ``write``, ``fsync``, unlock.

Listing, counting, statistics, folder counts and purge scan the tenant's records (never the
messages, beyond the lines after each checkpoint): O(sessions in the tenant).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import logging
import os
import re
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

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
    SessionQuery,
    SessionRecord,
    Stats,
)
from ..settings import Settings
from .base import Engine, Tally, has_gap, tally_differs

__all__ = ["FORMAT", "FileLock", "FilesEngine"]

R = TypeVar("R")
T = TypeVar("T")

log = logging.getLogger("sessionkeeper.files")

FORMAT = 1
MARKER = "sessionkeeper.json"
STRIPES = 64
SLOTS = 4096  # change counters per stripe file
CHECKPOINT_LINES = 128
CHECKPOINT_BYTES = 65_536
HEADS = 16_384  # sessions whose rolled-forward head is kept in memory
LOG_FDS = 32  # open message logs kept for the next append or read
THREADS = min(32, (os.cpu_count() or 1) + 4)  # as many as asyncio's default executor

_FIRST_READ = 4096
_SCAN_CHUNK = 65_536
_TAIL_CHUNK = 8192
_WINDOW = 65_536  # below this many bytes a seq search scans instead of bisecting
_SEQ = re.compile(rb'\A\{"seq":(\d+),')
_ROOT_ENTRIES = frozenset({MARKER, "tenants", "locks", "tmp", "quarantine"})
_CLOEXEC = os.O_CLOEXEC
_NO_LOG = -1  # passed for a log descriptor: the session has no log file
_READ_BATCH = 64  # most reads one thread takes in one go


class _Damaged(Exception):
    """Files of one session (or a folder file) that cannot be trusted.

    ``counter`` is the session's change counter when the damage was seen: the committed
    log changes only with its record, so the same counter means the same damaged bytes.
    """

    def __init__(
        self, kind: str, tenant: str, name: str, why: str, counter: int | None = None
    ) -> None:
        super().__init__(f"{kind} {tenant}/{name}: {why}")
        self.kind = kind
        self.tenant = tenant
        self.name = name
        self.why = why
        self.counter = counter


class _OtherCase(Exception):
    """The file belongs to a name that differs only in case: on a file system that ignores
    case (macOS, Windows) both names lead to it. It is that other one's, not damaged."""


def _check_owner(doc: dict[str, Any], tenant: str, name: str) -> None:
    found = (doc.get("tenant"), doc.get("id"))
    if found == (tenant, name):
        return
    if all(isinstance(x, str) for x in found) and (
        str(found[0]).lower() == tenant.lower() and str(found[1]).lower() == name.lower()
    ):
        raise _OtherCase
    raise ValueError("it names another session or folder")


# --- small file helpers ----------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_span(fd: int, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of an open file (fewer if it is shorter)."""
    parts: list[bytes] = []
    while start < end:
        chunk = os.pread(fd, end - start, start)
        if not chunk:
            break
        parts.append(chunk)
        start += len(chunk)
    return b"".join(parts)


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        data = os.read(fd, _FIRST_READ)
        if len(data) < _FIRST_READ:
            return data
        parts = [data]
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(value: object, field: str) -> str:
    """A tenant or id, checked again before it becomes part of a path."""
    if not isinstance(value, str) or rules.ID_PATTERN.fullmatch(value) is None:
        raise InvalidInput(
            field,
            "must be 1-128 characters of letters, digits and ._:- and must not start with a dot",
        )
    return value


def _fragment(text: str) -> orjson.Fragment:
    """JSON text (from the store or another engine) embedded as is, on one line."""
    data = text.encode()
    if b"\n" in data or b"\r" in data:
        data = orjson.dumps(orjson.loads(data))
    return orjson.Fragment(data)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    return float(value)


def _optional_number(value: object) -> float | None:
    return None if value is None else _number(value)


def _optional_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError("not a string")


def _int(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if type(value) is not int:
        raise ValueError(f"{name} is not an integer")
    return value


# --- locks -----------------------------------------------------------------------------


class FileLock:
    """An ``flock`` held through a descriptor of its own, until ``release``.

    flock belongs to the open file description: no other descriptor of the file (in this
    process or another) releases it, and two of these exclude each other even in one
    thread (so never take one you already hold).
    """

    __slots__ = ("_fd",)

    def __init__(self, path: str, exclusive: bool, blocking: bool = True) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o644)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode if blocking else mode | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # the only descriptor of this open file description: unlocks

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Stripes:
    """The session lock stripes: lock files opened once, each also guarded by a mutex,
    each holding the change counters of its slots."""

    __slots__ = ("_fds", "_folder", "_mutexes", "_opening")

    def __init__(self, folder: str) -> None:
        self._folder = folder
        self._fds: list[int] = [-1] * STRIPES
        self._mutexes = [threading.Lock() for _ in range(STRIPES)]
        self._opening = threading.Lock()

    def _fd(self, stripe: int) -> int:
        fd = self._fds[stripe]
        if fd < 0:
            with self._opening:
                fd = self._fds[stripe]
                if fd < 0:
                    path = f"{self._folder}/sessions-{stripe:02x}.lock"
                    flags = os.O_RDWR | os.O_CREAT | _CLOEXEC
                    fd = self._fds[stripe] = os.open(path, flags, 0o644)
        return fd

    def hold(self, stripe: int, exclusive: bool) -> _Held:
        """The stripe, held (``with``) exclusively or shared until the block ends."""
        return _Held(self._mutexes[stripe], self._fd(stripe), exclusive)

    def busy(self, stripe: int) -> bool:
        return self._mutexes[stripe].locked()

    def counter(self, stripe: int, slot: int) -> int:
        """The slot's change counter; the stripe must be held."""
        return int.from_bytes(os.pread(self._fd(stripe), 8, slot * 8), "little")

    def bump(self, stripe: int, slot: int) -> int:
        """Add one to the slot's change counter; the stripe must be held exclusively."""
        value = self.counter(stripe, slot) + 1
        os.pwrite(self._fd(stripe), value.to_bytes(8, "little"), slot * 8)
        return value

    def close(self) -> None:
        fds, self._fds = self._fds, [-1] * STRIPES
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class _Held:
    """A stripe held: its mutex, then its flock (released in the other order)."""

    __slots__ = ("_exclusive", "_fd", "_mutex")

    def __init__(self, mutex: threading.Lock, fd: int, exclusive: bool) -> None:
        self._mutex = mutex
        self._fd = fd
        self._exclusive = exclusive

    def __enter__(self) -> None:
        self._mutex.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX if self._exclusive else fcntl.LOCK_SH)
        except BaseException:
            self._mutex.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()


# --- on-disk shapes --------------------------------------------------------------------


@dataclass(slots=True)
class _Where:
    """Where one session lives: its paths, its lock stripe and its counter slot."""

    tenant: str
    id: str
    record: str
    log: str
    stripe: int
    slot: int

    @property
    def key(self) -> tuple[str, str]:
        return self.tenant, self.id


@dataclass(slots=True)
class _Head:
    """A session rolled forward over its log, as of one change counter and log size."""

    record: SessionRecord  # without state
    counter: int
    checkpoint: int  # the record's log_size
    end: int  # where the last whole call ends: the committed log
    size: int  # the log's size when this was computed (> end: a torn tail to repair)
    tail: int  # lines between checkpoint and end


@dataclass(slots=True)
class _Line:
    seq: int
    version: int
    batch_end: int
    created_at: float
    input_tokens: int
    output_tokens: int
    cost: float
    in_change: bool


@dataclass(slots=True)
class _AppendJob:
    drafts: list[MessageDraft]
    now: float
    expected_version: int | None
    future: asyncio.Future[list[MessageRecord]]


def _record_bytes(r: SessionRecord, state: str, log_size: int) -> bytes:
    doc = {
        "format": FORMAT,
        "tenant": r.tenant,
        "id": r.id,
        "owner": r.owner,
        "folder": r.folder,
        "title": r.title,
        "status": r.status,
        "step": r.step,
        "version": r.version,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "expires_at": r.expires_at,
        "idle_ttl": r.idle_ttl,
        "deadline": r.deadline,
        "message_count": r.message_count,
        "last_seq": r.last_seq,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cost": r.cost,
        "log_size": log_size,
        "metadata": _fragment(r.metadata),
        "state": _fragment(state),
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def _parse_record(data: bytes, w: _Where) -> tuple[SessionRecord, int]:
    """The record with its state, and its log_size; ValueError if the bytes are not a
    record of this session."""
    doc = orjson.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a session record of a known format")
    _check_owner(doc, w.tenant, w.id)
    title, status = doc.get("title"), doc.get("status")
    if not isinstance(title, str) or not isinstance(status, str):
        raise ValueError("title or status is not a string")
    metadata, state = doc.get("metadata"), doc.get("state")
    if not isinstance(metadata, dict) or not isinstance(state, dict):
        raise ValueError("metadata or state is not an object")
    record = SessionRecord(
        tenant=w.tenant,
        id=w.id,
        owner=_optional_str(doc.get("owner")),
        folder=_optional_str(doc.get("folder")),
        title=title,
        status=status,
        step=_optional_str(doc.get("step")),
        metadata=_dumps(metadata),
        state=_dumps(state),
        version=_int(doc, "version"),
        created_at=_number(doc.get("created_at")),
        updated_at=_number(doc.get("updated_at")),
        expires_at=_optional_number(doc.get("expires_at")),
        idle_ttl=_optional_number(doc.get("idle_ttl")),
        deadline=_optional_number(doc.get("deadline")),
        message_count=_int(doc, "message_count"),
        last_seq=_int(doc, "last_seq"),
        input_tokens=_int(doc, "input_tokens"),
        output_tokens=_int(doc, "output_tokens"),
        cost=_number(doc.get("cost")),
    )
    return record, _int(doc, "log_size")


def _line_bytes(m: MessageRecord, version: int, batch_end: int, in_change: bool) -> bytes:
    doc: dict[str, Any] = {
        "seq": m.seq,
        "role": m.role,
        "content": _fragment(m.content),
        "input_tokens": m.input_tokens,
        "output_tokens": m.output_tokens,
        "cost": m.cost,
        "metadata": _fragment(m.metadata),
        "created_at": m.created_at,
        "version": version,
        "batch_end": batch_end,
    }
    if in_change:
        doc["in_change"] = True
    return orjson.dumps(doc) + b"\n"


def _parse_line(data: bytes) -> _Line:
    """One log line; ValueError if it is not one we wrote."""
    try:
        doc = orjson.loads(data)
        line = _Line(
            doc["seq"],
            doc["version"],
            doc["batch_end"],
            doc["created_at"],
            doc["input_tokens"],
            doc["output_tokens"],
            doc["cost"],
            doc.get("in_change") is True,
        )
        role, metadata = doc["role"], doc["metadata"]
        if "content" not in doc:
            raise KeyError("content")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a message line: {exc}") from None
    if (
        type(line.seq) is not int
        or type(line.version) is not int
        or type(line.batch_end) is not int
        or type(line.input_tokens) is not int
        or type(line.output_tokens) is not int
        or type(role) is not str
        or type(metadata) is not dict
    ):
        raise ValueError("a field of a message line has the wrong type")
    if type(line.created_at) is not float:
        line.created_at = _number(line.created_at)
    if type(line.cost) is not float:
        line.cost = _number(line.cost)
    return line


def _read_message(session_id: str, raw: bytes) -> MessageRecord:
    """A message of the committed log, for a reader (lines are only ever written whole by
    this engine, so this checks no more than it needs to build the record)."""
    try:
        doc = orjson.loads(raw)
        seq, cost, created_at = doc["seq"], doc["cost"], doc["created_at"]
        metadata = doc["metadata"]
        return MessageRecord(
            session_id,
            seq if type(seq) is int else int(seq),
            doc["role"],
            orjson.dumps(doc["content"]).decode(),
            doc["input_tokens"],
            doc["output_tokens"],
            cost if type(cost) is float else _number(cost),
            orjson.dumps(metadata).decode() if metadata else "{}",
            created_at if type(created_at) is float else _number(created_at),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a message line: {exc}") from None


def _roll_forward(record: SessionRecord, data: bytes, start: int) -> tuple[SessionRecord, int, int]:
    """Apply every whole plain append in ``data`` (the log from offset ``start``) that
    continues ``record``. Returns the record, where the last applied call ends, and how
    many lines were applied. Anything after that is torn or stale, and never returned."""
    pos = applied = 0
    while pos < len(data):
        batch: list[_Line] = []
        cursor = pos
        whole = False
        while True:
            newline = data.find(b"\n", cursor)
            if newline < 0:
                break
            try:
                line = _parse_line(data[cursor:newline])
            except ValueError:
                break
            batch.append(line)
            cursor = newline + 1
            if line.seq >= line.batch_end:
                whole = line.seq == line.batch_end
                break
        if not whole or not _continues(record, batch):
            break
        drafts = [MessageDraft("", "", x.input_tokens, x.output_tokens, x.cost, "") for x in batch]
        record, _ = rules.apply_append(record, drafts, batch[0].created_at)
        pos = cursor
        applied += len(batch)
    return record, start + pos, applied


def _continues(record: SessionRecord, batch: list[_Line]) -> bool:
    """Whether ``batch`` is the plain append that comes right after ``record``."""
    first = batch[0]
    if first.version != record.version + 1:
        return False
    return all(
        line.seq == record.last_seq + 1 + offset
        and line.version == first.version
        and line.batch_end == batch[-1].seq
        and line.created_at == first.created_at
        and not line.in_change
        for offset, line in enumerate(batch)
    )


def _folder_bytes(f: FolderRecord) -> bytes:
    doc = {
        "format": FORMAT,
        "tenant": f.tenant,
        "id": f.id,
        "owner": f.owner,
        "name": f.name,
        "created_at": f.created_at,
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def _parse_folder(data: bytes, tenant: str, folder_id: str) -> FolderRecord:
    doc = orjson.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a folder record of a known format")
    _check_owner(doc, tenant, folder_id)
    name = doc.get("name")
    if not isinstance(name, str):
        raise ValueError("name is not a string")
    owner = _optional_str(doc.get("owner"))
    return FolderRecord(tenant, folder_id, owner, name, _number(doc.get("created_at")))


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # its caller gave up waiting
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        _settle(future, ok, value)


_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


# --- the engine ------------------------------------------------------------------------


class FilesEngine(Engine):
    """Sessions as JSON files under one folder: durable, safe for threads and processes."""

    __slots__ = (
        "_appends",
        "_cache_lock",
        "_heads",
        "_logs",
        "_pending",
        "_pool",
        "_reads",
        "_stripes",
        "_temp_names",
        "_temp_tag",
        "_tenant_dirs",
        "root",
        "settings",
    )
    name = "files"

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.settings = settings
        self._pool: ThreadPoolExecutor | None = None
        self._stripes: _Stripes | None = None
        self._cache_lock = threading.Lock()
        self._heads: OrderedDict[tuple[str, str], _Head] = OrderedDict()
        # session -> (change counter, descriptor) of its log, opened O_RDWR | O_APPEND
        self._logs: OrderedDict[tuple[str, str], tuple[int, int, int]] = OrderedDict()
        self._tenant_dirs: dict[str, str] = {}
        self._temp_names = itertools.count()
        self._temp_tag = secrets.token_hex(4)
        # appends waiting for the batch in flight of their session, per event loop
        self._appends: dict[tuple[asyncio.AbstractEventLoop, str, str], list[_AppendJob]] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        # reads asked for during the current turn of each event loop, handed over together
        self._reads: dict[asyncio.AbstractEventLoop, list[_Call]] = {}

    # --- plumbing ----------------------------------------------------------------------

    def _open_sync(self) -> None:
        root = self.root.absolute()
        if not root.parent.is_dir():
            raise BackendUnavailable(f"files: the folder {root.parent} does not exist")
        with contextlib.suppress(FileExistsError):
            root.mkdir()
        real = root.resolve()
        entries = set(os.listdir(real))
        if MARKER in entries:
            try:
                found = orjson.loads(_read_file(f"{real}/{MARKER}"))["format"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BackendUnavailable(f"files: {real / MARKER} is damaged") from exc
            if found != FORMAT:
                raise BackendUnavailable(
                    f"files: {real} has format {found!r}; this sessionkeeper knows "
                    f"{FORMAT}: upgrade sessionkeeper"
                )
        elif {e for e in entries if e not in _ROOT_ENTRIES and not e.startswith(".marker.")}:
            raise BackendUnavailable(
                f"files: {real} holds other files and no {MARKER}: point the URL at an "
                "empty or new folder"
            )
        for name in ("tenants", "locks", "tmp", "quarantine"):
            if name not in entries:
                with contextlib.suppress(FileExistsError):
                    (real / name).mkdir()
        if MARKER not in entries:
            temp = real / f".marker.{os.getpid()}.{next(self._temp_names)}"
            temp.write_bytes(orjson.dumps({"format": FORMAT}) + b"\n")
            os.replace(temp, real / MARKER)
        if not entries >= _ROOT_ENTRIES:  # something was made: make it durable
            _fsync_dir(str(real))
        self.root = real
        self._remove_stale_temps()
        self._stripes = _Stripes(f"{real}/locks")
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="sessionkeeper-files")
        self._opened()

    def _remove_stale_temps(self) -> None:
        """Remove temp files whose writer process is gone (it died mid-write)."""
        folder = f"{self.root}/tmp"
        for name in os.listdir(folder):
            pid = name.split(".", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{folder}/{name}")
            except PermissionError:
                pass  # alive, run by another user

    async def open(self) -> None:
        if self._pool is None:
            try:
                await asyncio.to_thread(self._open_sync)
            except OSError as exc:
                raise BackendUnavailable(f"files: cannot open {self.root}: {exc}") from exc

    async def close(self) -> None:
        if self._pool is None:
            return
        if self._forked:  # the parent's threads and descriptors: leave them be
            self._pool = None
            self._closed()
            return
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # reads asked for in this turn are handed over first
        while pending := [f for f in self._pending if f.get_loop() is loop]:
            # calls already made (and appends queued behind them) finish first
            await asyncio.gather(*pending, return_exceptions=True)
        pool, self._pool = self._pool, None
        self._closed()
        await asyncio.to_thread(pool.shutdown, True)
        with self._cache_lock:
            logs = [fd for _, fd, _ in self._logs.values()]
            self._logs.clear()
            self._heads.clear()
        for fd in logs:
            os.close(fd)
        if self._stripes is not None:
            self._stripes.close()

    def _check_usable(self) -> ThreadPoolExecutor:
        if self._forked:
            raise BackendUnavailable(
                "this files store was opened before fork(); open a new one in the child"
            )
        if self._pool is None:
            raise BackendUnavailable("the files engine is closed")
        return self._pool

    def _call(self, fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
        """Run ``fn(*args)`` on a thread; the result comes back in one hop to the loop."""
        pool = self._check_usable()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        pool.submit(self._work, loop, future, fn, args)
        return future

    def _work(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        try:
            value, ok = self._guarded(fn, *args), True
        except BaseException as exc:
            value, ok = exc, False
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
            loop.call_soon_threadsafe(_settle, future, ok, value)

    def _read(self, fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
        """Like ``_call``, for a read: the reads of one turn of the event loop go to one
        thread together and come back in one hop, so many small reads do not each pay for
        a thread hand-over (appends and changes keep a thread each: they wait on fsync)."""
        self._check_usable()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        batch = self._reads.get(loop)
        if batch is None:
            batch = self._reads[loop] = []
            loop.call_soon(self._hand_over_reads, loop)
        batch.append((fn, args, future))
        return future

    def _hand_over_reads(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._reads.pop(loop, [])
        try:
            pool = self._check_usable()
        except BackendUnavailable as exc:
            for _, _, future in batch:
                _settle(future, False, exc)
            return
        for start in range(0, len(batch), _READ_BATCH):
            done = loop.create_future()  # close() waits for it
            self._pending.add(done)
            done.add_done_callback(self._pending.discard)
            pool.submit(self._work_reads, loop, batch[start : start + _READ_BATCH], done)

    def _work_reads(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Call], done: asyncio.Future[None]
    ) -> None:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        for fn, args, future in batch:
            try:
                results.append((future, True, self._guarded(fn, *args)))
            except BaseException as exc:
                results.append((future, False, exc))
        results.append((done, True, None))
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
            loop.call_soon_threadsafe(_settle_all, results)

    def _guarded(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn``; quarantine what it found damaged and run it again; wrap OS errors."""
        try:
            for _ in range(3):
                try:
                    return fn(*args)
                except _Damaged as damaged:
                    self._quarantine(damaged)
            raise BackendUnavailable("files: the same files keep being damaged")
        except OSError as exc:
            raise BackendUnavailable(f"files: {exc}") from exc

    @property
    def _locks(self) -> _Stripes:
        if self._stripes is None:
            raise BackendUnavailable("the files engine is closed")
        return self._stripes

    # --- paths -------------------------------------------------------------------------

    def _tenant_dir(self, tenant: str, create: bool) -> str | None:
        """The tenant's folder, checked to lie inside the root; None if it does not exist
        (and not ``create``)."""
        found = self._tenant_dirs.get(tenant)
        if found is not None:
            return found
        base = f"{self.root}/tenants/{_check_name(tenant, 'tenant')}"
        if not os.path.isdir(base):
            if not create:
                return None
            with contextlib.suppress(FileExistsError):
                os.mkdir(base)
            _fsync_dir(f"{self.root}/tenants")
        made = False
        for sub in ("sessions", "folders", "guards"):
            path = f"{base}/{sub}"
            if not os.path.isdir(path):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path)
                    made = True
            if os.path.realpath(path) != path:
                raise BackendUnavailable(f"files: {path} leads outside the store")
        if made:
            _fsync_dir(base)
        self._tenant_dirs[tenant] = base
        return base

    def _where(self, tenant_dir: str, tenant: str, session_id: str) -> _Where:
        base = f"{tenant_dir}/sessions/{_check_name(session_id, 'session_id')}"
        spot = zlib.crc32(f"{tenant}/{session_id}".encode())
        return _Where(
            tenant,
            session_id,
            f"{base}.json",
            f"{base}.jsonl",
            spot % STRIPES,
            spot // STRIPES % SLOTS,
        )

    def _session(self, tenant: str, session_id: str, create: bool = False) -> _Where | None:
        tenant_dir = self._tenant_dir(tenant, create)
        if tenant_dir is None:
            _check_name(session_id, "session_id")
            return None
        return self._where(tenant_dir, tenant, session_id)

    def _folder_path(self, tenant_dir: str, folder_id: str) -> str:
        return f"{tenant_dir}/folders/{_check_name(folder_id, 'folder_id')}.json"

    def _tenant_lock(self, tenant: str, exclusive: bool) -> FileLock:
        return FileLock(f"{self.root}/locks/tenant-{_check_name(tenant, 'tenant')}.lock", exclusive)

    def _write_atomic(self, path: str, data: bytes, sync_dir: bool) -> None:
        """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of its folder."""
        # The engine's own random part keeps two engines of one process on one folder
        # from ever writing the same temp file.
        temp = f"{self.root}/tmp/{os.getpid()}.{self._temp_tag}.{next(self._temp_names)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if sync_dir:
            _fsync_dir(os.path.dirname(path))

    # --- caches (a session's entries are used only while its stripe is held) ------------

    # Heads are replaced, never changed, and each step here is one dict operation (atomic
    # in Python): no lock, so readers on several threads never queue for one. The order is
    # that of the last write, which is what the bound needs.

    def _cached(self, key: tuple[str, str]) -> _Head | None:
        return self._heads.get(key)

    def _remember(self, key: tuple[str, str], head: _Head | None) -> None:
        self._heads.pop(key, None)
        if head is not None:
            self._heads[key] = head
            if len(self._heads) > HEADS:
                with contextlib.suppress(KeyError):
                    self._heads.popitem(last=False)

    def _log(self, w: _Where, counter: int) -> int | None:
        """The session's log, opened for appending and reading; None if it has none.

        The descriptor is kept for the next call while the counter stays: the log is only
        ever replaced or removed along with its record, which moves the counter.
        """
        with self._cache_lock:
            found = self._logs.get(w.key)
            if found is not None:
                if found[0] == counter:
                    self._logs.move_to_end(w.key)
                    return found[1]
                del self._logs[w.key]
        if found is not None:
            os.close(found[1])
        try:
            fd = os.open(w.log, os.O_RDWR | os.O_APPEND | _CLOEXEC)
        except FileNotFoundError:
            return None
        self._keep_log(w, counter, fd)
        return fd

    @contextlib.contextmanager
    def _log_to_read(self, w: _Where, counter: int) -> Iterator[int]:
        """The log for one read: the kept descriptor if there is one, else one of its own,
        closed afterwards (readers go through many sessions: keeping each would only
        push out the appenders' logs). Yields _NO_LOG if the session has no log."""
        with self._cache_lock:
            found = self._logs.get(w.key)
        if found is not None and found[0] == counter:
            yield found[1]
            return
        try:
            fd = os.open(w.log, os.O_RDONLY | _CLOEXEC)
        except FileNotFoundError:
            yield _NO_LOG
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _keep_log(self, w: _Where, counter: int, fd: int) -> None:
        closing: list[tuple[tuple[str, str], int]] = []
        with self._cache_lock:
            self._logs[w.key] = (counter, fd, w.stripe)
            excess = len(self._logs) - LOG_FDS
            if excess > 0:
                for key, (_, other, stripe) in self._logs.items():
                    if not self._locks.busy(stripe):  # nobody is using it
                        closing.append((key, other))
                        if len(closing) == excess:
                            break
                for key, _ in closing:
                    del self._logs[key]
        for _, other in closing:
            os.close(other)

    def _forget_log(self, w: _Where) -> None:
        with self._cache_lock:
            found = self._logs.pop(w.key, None)
        if found is not None:
            os.close(found[1])

    def _bump(self, w: _Where, same_log: bool) -> int:
        """Move the session's change counter before its record is written or removed;
        a kept log stays only if the same file goes on (``same_log``)."""
        counter = self._locks.bump(w.stripe, w.slot)
        if not same_log:
            self._remember(w.key, None)
            self._forget_log(w)
            return counter
        with self._cache_lock:
            found = self._logs.get(w.key)
            if found is not None:
                self._logs[w.key] = (counter, found[1], found[2])
        return counter

    # --- loading a session (its stripe held) -------------------------------------------

    def _load(
        self, w: _Where, state: bool, fd: int | None = None, counter: int | None = None
    ) -> tuple[_Head, str | None, int | None] | None:
        """The session's head, its state if asked, and its log (kept open, or None if it
        has none); None if the session has no record. The stripe must be held.

        ``fd``: the log, if the caller has it open (_NO_LOG: it has none); ``counter``:
        the session's change counter, if the caller has read it. Raises _Damaged when the
        record cannot be read or the log is shorter than the record says.
        """
        if counter is None:
            counter = self._locks.counter(w.stripe, w.slot)
        if fd is None:
            fd = self._log(w, counter)
        elif fd == _NO_LOG:
            fd = None
        size = 0 if fd is None else os.fstat(fd).st_size
        head = self._cached(w.key)
        if head is not None and head.counter == counter:
            if size != head.size:
                if size >= head.end:  # the log grew (or lost a torn tail) since
                    head = self._roll(head.record, head, size, fd, head.end)
                    self._remember(w.key, head)
                else:
                    head = None  # shorter than what the record names: read it again
            if head is not None and not state:
                return head, None, fd
        else:
            head = None
        try:
            data = _read_file(w.record)
        except FileNotFoundError:
            return None
        try:
            record, checkpoint = _parse_record(data, w)
        except _OtherCase:
            return None
        except ValueError as exc:
            raise _Damaged("sessions", w.tenant, w.id, f"record: {exc}", counter) from None
        state_text, record.state = record.state, None
        if head is not None:
            return head, state_text, fd  # only the state was missing
        if size < checkpoint:
            why = "the log is shorter than its record"
            raise _Damaged("sessions", w.tenant, w.id, why, counter)
        base = _Head(record, counter, checkpoint, checkpoint, checkpoint, 0)
        head = self._roll(record, base, size, fd, checkpoint)
        self._remember(w.key, head)
        return head, state_text, fd

    def _roll(
        self, record: SessionRecord, base: _Head, size: int, fd: int | None, start: int
    ) -> _Head:
        if size == start or fd is None:
            return dataclasses.replace(base, size=size)
        rolled, end, lines = _roll_forward(record.copy(), _read_span(fd, start, size), start)
        return _Head(rolled, base.counter, base.checkpoint, end, size, base.tail + lines)

    def _live(
        self, w: _Where, now: float, state: bool, fd: int | None = None, counter: int | None = None
    ) -> tuple[_Head, str | None, int | None] | None:
        loaded = self._load(w, state, fd, counter)
        if loaded is None or rules.is_expired(loaded[0].record.expires_at, now):
            return None
        return loaded

    def _writable(
        self, w: _Where, now: float, expected_version: int | None
    ) -> tuple[_Head, str, int | None]:
        """The live session with its state, for a change. Raises NotFound, VersionConflict."""
        loaded = self._live(w, now, True)
        if loaded is None:
            raise NotFound(f"no session {w.id!r}")
        head, state, fd = loaded
        rules.check_version(head.record, expected_version)
        assert state is not None  # loaded with state=True
        return head, state, fd

    def _save(
        self,
        w: _Where,
        record: SessionRecord,
        state: str,
        end: int,
        sync_dir: bool,
        size: int | None = None,
    ) -> _Head:
        """Write ``record`` as the checkpoint of the log's first ``end`` bytes (the log
        being ``size`` long, if not ``end``)."""
        plain = record.copy()
        plain.state = None
        counter = self._bump(w, same_log=True)
        self._write_atomic(w.record, _record_bytes(plain, state, end), sync_dir)
        saved = _Head(plain, counter, end, end, end if size is None else size, 0)
        self._remember(w.key, saved)
        return saved

    def _appendable(self, w: _Where, fd: int | None, head: _Head) -> int:
        """The log ready for a write at its committed end: made if missing, a torn tail
        cut off."""
        if fd is None:
            fd = os.open(w.log, os.O_RDWR | os.O_APPEND | os.O_CREAT | _CLOEXEC, 0o644)
            _fsync_dir(os.path.dirname(w.log))
            self._keep_log(w, head.counter, fd)
        if head.size > head.end:
            os.ftruncate(fd, head.end)
        return fd

    def _renewed(
        self, w: _Where, head: _Head, state: str | None, now: float
    ) -> tuple[_Head, str | None]:
        """The head with idle expiry renewed at ``now`` (and written); the stripe is held
        exclusively."""
        record = head.record
        renewed = rules.renewed_expiry(record.expires_at, record.idle_ttl, record.deadline, now)
        if renewed == record.expires_at:
            return head, state
        if state is None:
            loaded = self._load(w, True)
            assert loaded is not None  # the stripe is held: it cannot have gone
            head, state, _ = loaded
            assert state is not None
        new = head.record.copy()
        new.expires_at = renewed
        return self._save(w, new, state, head.end, sync_dir=False, size=head.size), state

    # --- sessions ----------------------------------------------------------------------

    def _s_put(
        self, record: SessionRecord, messages: list[MessageRecord], now: float, replace: bool
    ) -> bool:
        """Write a new session (over an expired one, or a live one if ``replace``); False
        if a live one has the id and ``replace`` is not set."""
        w = self._session(record.tenant, record.id, create=True)
        assert w is not None
        tenant_lock = self._tenant_lock(record.tenant, False) if record.folder else None
        try:
            with self._locks.hold(w.stripe, True):
                try:
                    existing = self._load(w, False)
                except _Damaged as damaged:
                    self._quarantine_held(damaged)
                    existing = None
                if existing is not None:
                    live = not rules.is_expired(existing[0].record.expires_at, now)
                    if live and not replace:
                        return False
                elif os.path.exists(w.record):
                    raise AlreadyExists(
                        f"session {record.id!r}: this file system ignores case, and a "
                        "session whose id differs only in case has its files"
                    )
                if record.folder is not None:
                    self._check_folder(record.tenant, record.folder, record.owner)
                self._bump(w, same_log=False)
                if existing is not None:  # the one it replaces goes first, for good
                    os.unlink(w.record)
                    _fsync_dir(os.path.dirname(w.record))
                self._write_new(w, record, messages)
                return True
        finally:
            if tenant_lock is not None:
                tenant_lock.release()

    def _write_new(self, w: _Where, record: SessionRecord, messages: list[MessageRecord]) -> None:
        """Write a session that has no record now: its log first, its record last (the
        commit). A log left behind is emptied durably first, so no line of it is ever
        taken for this session's."""
        size = 0
        if messages:
            data = b"".join(
                _line_bytes(m, record.version, m.seq, in_change=False)
                for m in sorted(messages, key=lambda m: m.seq)
            )
            self._write_atomic(w.log, data, sync_dir=True)
            size = len(data)
        else:
            try:
                fd = os.open(w.log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)
            except FileExistsError:
                fd = os.open(w.log, os.O_WRONLY | os.O_TRUNC | _CLOEXEC)
                os.fsync(fd)
            os.close(fd)
        state = record.state if record.state is not None else "{}"
        plain = record.copy()
        plain.state = None
        # One fsync of the folder makes the record and an empty log's name durable; an
        # empty log lost with it is made again by the first append.
        self._write_atomic(w.record, _record_bytes(plain, state, size), sync_dir=True)
        counter = self._locks.counter(w.stripe, w.slot)
        self._remember(w.key, _Head(plain, counter, size, size, size, 0))

    def _s_get(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        w = self._session(tenant, session_id)
        if w is None:
            return None
        exclusive = self._may_renew(w)
        while True:
            with self._locks.hold(w.stripe, exclusive):
                counter = self._locks.counter(w.stripe, w.slot)
                with self._log_to_read(w, counter) as fd:
                    loaded = self._live(w, now, True, fd, counter)
                if loaded is None:
                    return None
                head, state, _ = loaded
                if head.record.idle_ttl is not None:
                    if not exclusive:  # flock cannot upgrade in place: take it again
                        exclusive = True
                        continue
                    head, state = self._renewed(w, head, state, now)
                record = head.record.copy()
                record.state = state
                return record

    def _may_renew(self, w: _Where) -> bool:
        """Whether a read should lock exclusively, to renew idle expiry (a guess from the
        cache; a wrong one costs one more lock)."""
        head = self._cached(w.key)
        return head is not None and head.record.idle_ttl is not None

    def _s_delete(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> None:
        w = self._session(tenant, session_id)
        if w is None:
            raise NotFound(f"no session {session_id!r}")
        with self._locks.hold(w.stripe, True):
            loaded = self._live(w, now, False)
            if loaded is None:
                raise NotFound(f"no session {session_id!r}")
            rules.check_version(loaded[0].record, expected_version)
            self._drop(w)

    def _drop(self, w: _Where) -> None:
        """Delete a session's record (the commit), then its log; the stripe is held."""
        self._bump(w, same_log=False)
        os.unlink(w.record)
        _fsync_dir(os.path.dirname(w.record))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.log)

    def _s_change(
        self, tenant: str, session_id: str, change: Change, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        w = self._session(tenant, session_id)
        if w is None:
            raise NotFound(f"no session {session_id!r}")
        moves = "owner" in change.fields or "folder" in change.fields
        tenant_lock = self._tenant_lock(tenant, False) if moves else None
        try:
            with self._locks.hold(w.stripe, True):
                head, state, fd = self._writable(w, now, None)
                current = head.record.copy()
                current.state = state
                new, appended = rules.apply_change(current, change, now)
                if moves and new.folder is not None:
                    self._check_folder(tenant, new.folder, new.owner)
                end = head.end
                if appended:
                    fd = self._appendable(w, fd, head)
                    data = b"".join(
                        _line_bytes(m, new.version, appended[-1].seq, in_change=True)
                        for m in appended
                    )
                    _write_all(fd, data)
                    os.fsync(fd)
                    end += len(data)
                assert new.state is not None
                self._save(w, new, new.state, end, sync_dir=True)
                return new, appended
        finally:
            if tenant_lock is not None:
                tenant_lock.release()

    # --- messages ----------------------------------------------------------------------

    def _s_append(
        self, tenant: str, session_id: str, jobs: list[_AppendJob]
    ) -> list[tuple[bool, Any]]:
        """Append every job's messages in order under one lock hold, one write() and one
        fsync; a job that fails (NotFound, VersionConflict) changes nothing."""
        w = self._session(tenant, session_id)
        absent = (False, NotFound(f"no session {session_id!r}"))
        if w is None:
            return [absent] * len(jobs)
        with self._locks.hold(w.stripe, True):
            loaded = self._load(w, False)
            if loaded is None:
                return [absent] * len(jobs)
            head, _, fd = loaded
            record = head.record
            results: list[tuple[bool, Any]] = []
            chunks: list[bytes] = []
            lines = 0
            for job in jobs:
                if not job.drafts:  # the contract says at least one; fail only this call
                    results.append((False, InvalidInput("messages", "must not be empty")))
                    continue
                if rules.is_expired(record.expires_at, job.now):
                    results.append(absent)
                    continue
                try:
                    rules.check_version(record, job.expected_version)
                except VersionConflict as exc:
                    results.append((False, exc))
                    continue
                record, appended = rules.apply_append(record, job.drafts, job.now)
                last = appended[-1].seq
                chunks += [_line_bytes(m, record.version, last, False) for m in appended]
                lines += len(appended)
                results.append((True, appended))
            if not chunks:
                return results
            data = b"".join(chunks)
            try:
                fd = self._appendable(w, fd, head)
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                self._remember(w.key, None)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, head.end)
                raise
            end = head.end + len(data)
            new = _Head(record, head.counter, head.checkpoint, end, end, head.tail + lines)
            self._remember(w.key, new)
            if new.tail >= CHECKPOINT_LINES or end - new.checkpoint >= CHECKPOINT_BYTES:
                self._checkpoint(w, fd)
            return results

    def _checkpoint(self, w: _Where, fd: int) -> None:
        """Write the rolled-forward record; the appends are durable without it."""
        try:
            loaded = self._load(w, True, fd)
            if loaded is not None:
                head, state, _ = loaded
                assert state is not None
                self._save(w, head.record, state, head.end, sync_dir=False)
        except (OSError, _Damaged) as exc:
            log.warning("files: could not checkpoint %s/%s: %s", w.tenant, w.id, exc)

    def _reading(
        self,
        tenant: str,
        session_id: str,
        now: float,
        read: Callable[[int, _Head], list[MessageRecord]],
    ) -> list[MessageRecord] | None:
        """Run ``read`` on the live session's log and head, its stripe held (exclusively
        when idle expiry must be renewed); None if the session is absent."""
        w = self._session(tenant, session_id)
        if w is None:
            return None
        exclusive = self._may_renew(w)
        while True:
            with self._locks.hold(w.stripe, exclusive):
                counter = self._locks.counter(w.stripe, w.slot)
                with self._log_to_read(w, counter) as fd:
                    loaded = self._live(w, now, False, fd, counter)
                    if loaded is None:
                        return None
                    head = loaded[0]
                    if head.record.idle_ttl is not None:
                        if not exclusive:
                            exclusive = True
                            continue
                        head, _ = self._renewed(w, head, None, now)
                    if fd == _NO_LOG or head.end == 0:
                        return []
                    try:
                        return read(fd, head)
                    except ValueError:
                        why = "a message line is damaged"
                        counter = head.counter
                        raise _Damaged("sessions", tenant, session_id, why, counter) from None

    def _s_read(
        self, tenant: str, session_id: str, now: float, after_seq: int, limit: int
    ) -> list[MessageRecord] | None:
        def read(fd: int, head: _Head) -> list[MessageRecord]:
            start = _seek_after(fd, head.end, after_seq)
            return _lines_from(fd, session_id, start, head.end, after_seq, limit)

        return self._reading(tenant, session_id, now, read)

    def _s_last(
        self, tenant: str, session_id: str, now: float, limit: int
    ) -> list[MessageRecord] | None:
        def read(fd: int, head: _Head) -> list[MessageRecord]:
            return [_read_message(session_id, raw) for raw in _last_lines(fd, head.end, limit)]

        return self._reading(tenant, session_id, now, read)

    def _s_pop(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, MessageRecord | None]:
        w = self._session(tenant, session_id)
        if w is None:
            raise NotFound(f"no session {session_id!r}")
        with self._locks.hold(w.stripe, True):
            head, state, fd = self._writable(w, now, expected_version)
            if fd is None or head.end == 0:
                return head.record.copy(), None
            raw = _line_span(fd, head.end)
            try:
                popped = _read_message(session_id, raw[:-1])
            except ValueError:
                why = "a message line is damaged"
                raise _Damaged("sessions", tenant, session_id, why, head.counter) from None
            start = head.end - len(raw)
            new = rules.remove_messages(
                head.record, 1, popped.input_tokens, popped.output_tokens, popped.cost, now
            )
            self._save(w, new, state, start, sync_dir=True)
            os.ftruncate(fd, start)  # the record no longer counts what is cut here
            os.fsync(fd)
            return new, popped

    def _s_clear(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, int]:
        w = self._session(tenant, session_id)
        if w is None:
            raise NotFound(f"no session {session_id!r}")
        with self._locks.hold(w.stripe, True):
            head, state, fd = self._writable(w, now, expected_version)
            current = head.record
            removed = current.message_count
            new = rules.remove_messages(
                current, removed, current.input_tokens, current.output_tokens, current.cost, now
            )
            self._save(w, new, state, 0, sync_dir=True)
            if fd is not None:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            return new, removed

    # --- scans -------------------------------------------------------------------------

    def _scan(self, tenant: str) -> list[SessionRecord]:
        """Every session of the tenant rolled forward (live or not, without state), each
        read with its stripe held, one stripe at a time. Damaged ones are quarantined
        afterwards and left out."""
        tenant_dir = self._tenant_dir(tenant, create=False)
        if tenant_dir is None:
            return []
        by_stripe: dict[int, list[_Where]] = {}
        with os.scandir(f"{tenant_dir}/sessions") as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".json") and rules.ID_PATTERN.fullmatch(name[:-5]):
                    w = self._where(tenant_dir, tenant, name[:-5])
                    by_stripe.setdefault(w.stripe, []).append(w)
        found: list[SessionRecord] = []
        damaged: list[_Damaged] = []
        for stripe, sessions in by_stripe.items():
            with self._locks.hold(stripe, False):
                for w in sessions:
                    try:
                        loaded = self._scanned(w)
                    except _Damaged as seen:
                        damaged.append(seen)
                        continue
                    if loaded is not None:
                        found.append(loaded)
        for each in damaged:
            self._quarantine(each)
        return found

    def _scanned(self, w: _Where) -> SessionRecord | None:
        """One session's head for a scan, without keeping its log open."""
        counter = self._locks.counter(w.stripe, w.slot)
        head = self._cached(w.key)
        if head is not None and head.counter == counter:
            try:
                if os.stat(w.log).st_size == head.size:
                    return head.record
            except FileNotFoundError:
                if head.size == 0:
                    return head.record
        with self._log_to_read(w, counter) as fd:
            loaded = self._load(w, False, fd, counter)
        return None if loaded is None else loaded[0].record

    def _s_list(self, tenant: str, query: SessionQuery, now: float) -> list[SessionRecord]:
        chosen = [
            r
            for r in self._scan(tenant)
            if rules.matches(r, query, now) and rules.is_after_cursor(r, query)
        ]
        chosen.sort(key=lambda r: rules.sort_key(r, query), reverse=query.descending)
        return [r.copy() for r in chosen[: query.limit]]

    def _s_count(self, tenant: str, query: SessionQuery, now: float) -> int:
        return sum(1 for r in self._scan(tenant) if rules.matches(r, query, now))

    def _s_stats(self, tenant: str, now: float, since: float, top: int) -> Stats:
        live = [r for r in self._scan(tenant) if not rules.is_expired(r.expires_at, now)]
        return rules.stats_of(live, since, top)

    # --- folders -----------------------------------------------------------------------

    def _folders(self, tenant: str, tenant_dir: str, locked: bool) -> list[FolderRecord]:
        """Every folder of the tenant. Damaged files are quarantined (under the tenant
        lock, which the caller already holds if ``locked``) and left out."""
        with os.scandir(f"{tenant_dir}/folders") as entries:
            names = [e.name[:-5] for e in entries if e.name.endswith(".json")]
        found: list[FolderRecord] = []
        damaged: list[_Damaged] = []
        for folder_id in names:
            if rules.ID_PATTERN.fullmatch(folder_id) is not None:
                try:
                    folder = self._read_folder(tenant, folder_id)
                except _Damaged as seen:
                    damaged.append(seen)
                    continue
                if folder is not None:
                    found.append(folder)
        for each in damaged:
            if locked:
                self._quarantine_held(each)
            else:
                self._quarantine(each)
        return found

    def _read_folder(self, tenant: str, folder_id: str) -> FolderRecord | None:
        tenant_dir = self._tenant_dir(tenant, create=False)
        if tenant_dir is None:
            _check_name(folder_id, "folder_id")
            return None
        try:
            data = _read_file(self._folder_path(tenant_dir, folder_id))
        except FileNotFoundError:
            return None
        try:
            return _parse_folder(data, tenant, folder_id)
        except _OtherCase:
            return None
        except ValueError as exc:
            raise _Damaged("folders", tenant, folder_id, str(exc)) from None

    def _check_folder(self, tenant: str, folder_id: str, owner: str | None) -> None:
        folder = self._read_folder(tenant, folder_id)
        if folder is None or folder.owner != owner:
            raise NotFound(f"no folder {folder_id!r} of owner {owner!r}")

    def _counted(self, folders: list[FolderRecord], tenant: str, now: float) -> None:
        counts: dict[str, int] = {}
        for r in self._scan(tenant):
            if r.folder is not None and not rules.is_expired(r.expires_at, now):
                counts[r.folder] = counts.get(r.folder, 0) + 1
        for folder in folders:
            folder.session_count = counts.get(folder.id, 0)

    def _f_put(self, record: FolderRecord, replace: bool | None) -> bool:
        """Insert a folder (``replace`` None: AlreadyExists if the id is taken), or load
        one (False if the id is taken and not ``replace``)."""
        tenant_dir = self._tenant_dir(record.tenant, create=True)
        assert tenant_dir is not None
        path = self._folder_path(tenant_dir, record.id)
        with self._tenant_lock(record.tenant, True):
            folders = self._folders(record.tenant, tenant_dir, locked=True)
            exists = any(f.id == record.id for f in folders)
            if not exists and os.path.exists(path):
                raise AlreadyExists(
                    f"folder {record.id!r}: this file system ignores case, and a folder "
                    "whose id differs only in case has its file"
                )
            others = [f for f in folders if f.id != record.id or replace is None]
            if any(f.owner == record.owner and f.name == record.name for f in others):
                if replace is not None and exists and not replace:
                    return False
                raise AlreadyExists(f"owner {record.owner!r} already has a folder {record.name!r}")
            if exists and not replace:
                if replace is None:
                    raise AlreadyExists(f"folder {record.id!r} already exists")
                return False
            self._write_atomic(path, _folder_bytes(record), sync_dir=True)
            return True

    def _f_get(self, tenant: str, folder_id: str, now: float) -> FolderRecord | None:
        folder = self._read_folder(tenant, folder_id)
        if folder is not None:
            self._counted([folder], tenant, now)
        return folder

    def _f_rename(self, tenant: str, folder_id: str, name: str, now: float) -> FolderRecord:
        tenant_dir = self._tenant_dir(tenant, create=False)
        _check_name(folder_id, "folder_id")
        if tenant_dir is None:
            raise NotFound(f"no folder {folder_id!r}")
        with self._tenant_lock(tenant, True):
            folders = self._folders(tenant, tenant_dir, locked=True)
            folder = next((f for f in folders if f.id == folder_id), None)
            if folder is None:
                raise NotFound(f"no folder {folder_id!r}")
            if folder.name != name and any(
                f.owner == folder.owner and f.name == name for f in folders
            ):
                raise AlreadyExists(f"owner {folder.owner!r} already has a folder {name!r}")
            folder.name = name
            path = self._folder_path(tenant_dir, folder_id)
            self._write_atomic(path, _folder_bytes(folder), sync_dir=True)
        self._counted([folder], tenant, now)
        return folder

    def _f_list(
        self, tenant: str, owner: str | None, owner_set: bool, now: float
    ) -> list[FolderRecord]:
        tenant_dir = self._tenant_dir(tenant, create=False)
        if tenant_dir is None:
            return []
        folders = [
            f
            for f in self._folders(tenant, tenant_dir, locked=False)
            if not owner_set or f.owner == owner
        ]
        self._counted(folders, tenant, now)
        folders.sort(key=lambda f: (f.owner or "", f.name, f.id))
        return folders

    def _f_delete(
        self, tenant: str, folder_id: str, now: float, reassign_to: str | None, cascade: bool
    ) -> int:
        """Members first, one at a time under their stripes, the folder file last: a crash
        in between leaves the folder, and running the delete again finishes it."""
        tenant_dir = self._tenant_dir(tenant, create=False)
        _check_name(folder_id, "folder_id")
        if reassign_to is not None:
            _check_name(reassign_to, "reassign_to")
        if tenant_dir is None:
            raise NotFound(f"no folder {folder_id!r}")
        with self._tenant_lock(tenant, True):
            folder = self._read_folder(tenant, folder_id)
            if folder is None:
                raise NotFound(f"no folder {folder_id!r}")
            if reassign_to is not None:
                self._check_folder(tenant, reassign_to, folder.owner)
            members = [r.id for r in self._scan(tenant) if r.folder == folder_id]
            live = 0
            for session_id in members:
                w = self._where(tenant_dir, tenant, session_id)
                live += self._move_member(w, folder_id, now, reassign_to, cascade)
            os.unlink(self._folder_path(tenant_dir, folder_id))
            _fsync_dir(f"{tenant_dir}/folders")
            return live

    def _move_member(
        self, w: _Where, folder_id: str, now: float, reassign_to: str | None, cascade: bool
    ) -> int:
        """Move or delete one session of a deleted folder; 1 if it was live."""
        with self._locks.hold(w.stripe, True):
            loaded = self._load(w, True)
            if loaded is None or loaded[0].record.folder != folder_id:
                return 0
            head, state, _ = loaded
            assert state is not None
            live = 0 if rules.is_expired(head.record.expires_at, now) else 1
            if cascade:
                self._drop(w)
                return live
            new = head.record.copy()
            new.folder = reassign_to
            new.version += 1
            new.updated_at = now
            self._save(w, new, state, head.end, sync_dir=True)
            return live

    # --- guards ------------------------------------------------------------------------
    # A guard is tenants/<t>/guards/<sha256 of its key>.json, written under one of 256
    # lock stripes (by that hash): temp file, fsync, rename, without the folder's fsync, so
    # a power cut may cost a guard its last update but never leaves it damaged.

    def _guard_path(self, tenant_dir: str, key: str) -> tuple[str, str]:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{tenant_dir}/guards/{digest}.json", f"{self.root}/locks/guards-{digest[:2]}.lock"

    def _read_guard(self, path: str, key: str | None, now: float) -> GuardRecord | None:
        """The live guard in ``path`` (of ``key``, if given), or None; a damaged file reads
        as absent and the next update replaces it."""
        try:
            doc = orjson.loads(_read_file(path))
            found = GuardRecord(
                doc["key"], _dumps(doc["value"]), _optional_number(doc.get("expires_at"))
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("files: ignoring the damaged guard file %s", path)
            return None
        if not isinstance(found.key, str) or (key is not None and found.key != key):
            return None
        return None if rules.is_expired(found.expires_at, now) else found

    def _g_update(self, tenant: str, key: str, update: GuardUpdate[T], now: float) -> T:
        tenant_dir = self._tenant_dir(tenant, create=True)
        assert tenant_dir is not None
        path, lock = self._guard_path(tenant_dir, key)
        with FileLock(lock, True):
            current = self._read_guard(path, key, now)
            value, expires_at, result = update(None if current is None else current.value)
            if value is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                doc = {"format": FORMAT, "key": key, "value": _fragment(value)}
                doc["expires_at"] = expires_at
                self._write_atomic(path, orjson.dumps(doc) + b"\n", sync_dir=False)
            return result

    def _g_get(self, tenant: str, key: str, now: float) -> str | None:
        tenant_dir = self._tenant_dir(tenant, create=False)
        if tenant_dir is None:
            return None
        found = self._read_guard(self._guard_path(tenant_dir, key)[0], key, now)
        return None if found is None else found.value

    def _g_list(self, tenant: str, prefix: str, now: float) -> list[GuardRecord]:
        tenant_dir = self._tenant_dir(tenant, create=False)
        if tenant_dir is None:
            return []
        with os.scandir(f"{tenant_dir}/guards") as entries:
            paths = [e.path for e in entries if e.name.endswith(".json")]
        found = [g for g in (self._read_guard(p, None, now) for p in paths) if g is not None]
        return sorted((g for g in found if g.key.startswith(prefix)), key=lambda g: g.key)

    # --- analytics: one JSON file of daily counters per tenant ---------------------------

    def _daily_path(self, tenant: str, create: bool) -> str | None:
        tenant_dir = self._tenant_dir(tenant, create)
        return None if tenant_dir is None else f"{tenant_dir}/daily.json"

    def _daily_lock(self, tenant: str, exclusive: bool) -> FileLock:
        return FileLock(f"{self.root}/locks/daily-{_check_name(tenant, 'tenant')}.lock", exclusive)

    def _read_daily(self, tenant: str, path: str) -> list[DailyRecord]:
        """The counters in ``path``; a damaged file is moved to quarantine (under the
        exclusive lock only) and reads as empty: figures are history, not session data."""
        try:
            doc = orjson.loads(_read_file(path))
            return [
                DailyRecord(row["day"], row["owner"], *(row[name] for name in DAILY_COUNTERS))
                for row in doc["rows"]
            ]
        except FileNotFoundError:
            return []
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            folder = f"{self.root}/quarantine/{tenant}/daily"
            os.makedirs(folder, exist_ok=True)
            target = f"{folder}/{time.time_ns()}-daily.json"
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, target)
            log.warning("files: moved damaged daily counters to %s (%s)", target, exc)
            return []

    def _d_add(self, tenant: str, rows: list[DailyRecord], replace: bool) -> None:
        path = self._daily_path(tenant, create=True)
        assert path is not None
        with self._daily_lock(tenant, True):
            stored = {(r.day, r.owner): r for r in self._read_daily(tenant, path)}
            for row in rows:
                if replace:
                    stored.pop((row.day, row.owner), None)
                found = stored.setdefault((row.day, row.owner), DailyRecord(row.day, row.owner))
                for name in DAILY_COUNTERS:
                    setattr(found, name, getattr(found, name) + getattr(row, name))
            ordered = sorted(stored.values(), key=lambda r: (r.day, r.owner or ""))
            doc = {"format": FORMAT, "rows": [dataclasses.asdict(r) for r in ordered]}
            self._write_atomic(path, orjson.dumps(doc) + b"\n", sync_dir=False)

    def _d_read(self, tenant: str) -> list[DailyRecord]:
        path = self._daily_path(tenant, create=False)
        if path is None:
            return []
        with self._daily_lock(tenant, True):  # exclusive: a damaged file may be moved
            return self._read_daily(tenant, path)

    def _s_owners(self, tenant: str, session_ids: list[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for sid in session_ids:
            w = self._session(tenant, sid)
            if w is None:
                return found
            with self._locks.hold(w.stripe, False):
                try:
                    record = self._scanned(w)
                except _Damaged:
                    continue  # check reports it; its figures count as ownerless
            if record is not None:
                found[sid] = record.owner
        return found

    def _purge_guards(self, tenant_dir: str, now: float) -> None:
        """Remove the guard files that have expired (they read as absent already)."""
        with os.scandir(f"{tenant_dir}/guards") as entries:
            names = [e.name for e in entries if e.name.endswith(".json")]
        for name in names:
            path = f"{tenant_dir}/guards/{name}"
            with FileLock(f"{self.root}/locks/guards-{name[:2]}.lock", True):
                try:
                    doc = orjson.loads(_read_file(path))
                    expired = rules.is_expired(_optional_number(doc.get("expires_at")), now)
                except (OSError, ValueError, AttributeError):
                    continue  # gone, or damaged: the next update replaces it
                if expired:
                    os.unlink(path)

    # --- expiry and transfer -----------------------------------------------------------

    def _tenants(self) -> list[str]:
        names = os.listdir(f"{self.root}/tenants")
        return sorted(name for name in names if rules.ID_PATTERN.fullmatch(name))

    def _s_purge(self, tenant: str | None, now: float, limit: int) -> list[tuple[str, str]]:
        purged: list[tuple[str, str]] = []
        for name in [tenant] if tenant is not None else self._tenants():
            tenant_dir = self._tenant_dir(name, create=False)
            if tenant_dir is None:
                continue
            self._purge_guards(tenant_dir, now)  # not counted: only sessions are
            for record in self._scan(name):
                if len(purged) >= limit:
                    return purged
                if rules.is_expired(record.expires_at, now):
                    w = self._where(tenant_dir, name, record.id)
                    with self._locks.hold(w.stripe, True):
                        loaded = self._load(w, False)
                        if loaded is not None and rules.is_expired(
                            loaded[0].record.expires_at, now
                        ):
                            self._drop(w)
                            purged.append((name, record.id))
        return purged

    def _s_tenants(self, now: float) -> list[str]:
        found: list[str] = []
        for name in self._tenants():
            tenant_dir = self._tenant_dir(name, create=False)
            if tenant_dir is None:
                continue
            if self._folders(name, tenant_dir, locked=False) or any(
                not rules.is_expired(r.expires_at, now) for r in self._scan(name)
            ):
                found.append(name)
        return found

    def _s_export(
        self, tenant: str, session_id: str, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]] | None:
        w = self._session(tenant, session_id)
        if w is None:
            return None
        with self._locks.hold(w.stripe, False):
            counter = self._locks.counter(w.stripe, w.slot)
            with self._log_to_read(w, counter) as fd:
                loaded = self._live(w, now, True, fd, counter)
                if loaded is None:
                    return None
                head, state, _ = loaded
                record = head.record.copy()
                record.state = state
                if fd == _NO_LOG or head.end == 0:
                    return record, []
                try:
                    return record, _lines_from(fd, session_id, 0, head.end, 0, None)
                except ValueError:
                    why = "a message line is damaged"
                    raise _Damaged("sessions", tenant, session_id, why, counter) from None

    # --- quarantine --------------------------------------------------------------------

    def _quarantine(self, damaged: _Damaged) -> None:
        """Move damaged files aside, under the lock that guards them, if they are still
        the damaged ones."""
        if damaged.kind == "folders":
            with self._tenant_lock(damaged.tenant, True):
                try:
                    self._read_folder(damaged.tenant, damaged.name)
                except _Damaged:
                    self._quarantine_held(damaged)
            return
        w = self._session(damaged.tenant, damaged.name)
        if w is None:
            return
        with self._locks.hold(w.stripe, True):
            if damaged.counter != self._locks.counter(w.stripe, w.slot):
                return  # rewritten since: look again
            self._quarantine_held(damaged)

    def _quarantine_held(self, damaged: _Damaged) -> None:
        tenant_dir = self._tenant_dir(damaged.tenant, create=False)
        if tenant_dir is None:
            return
        if damaged.kind == "folders":
            sources = [self._folder_path(tenant_dir, damaged.name)]
        else:
            w = self._where(tenant_dir, damaged.tenant, damaged.name)
            self._bump(w, same_log=False)
            sources = [w.record, w.log]
        folder = f"{self.root}/quarantine/{damaged.tenant}/{damaged.kind}"
        os.makedirs(folder, exist_ok=True)
        stamp = time.time_ns()
        moved: list[str] = []
        for source in sources:
            target = f"{folder}/{stamp}-{os.path.basename(source)}"
            try:
                os.replace(source, target)
            except FileNotFoundError:
                continue
            moved.append(os.path.relpath(target, self.root))
        if moved:
            _fsync_dir(folder)
            _fsync_dir(os.path.dirname(sources[0]))
            log.warning(
                "files: moved damaged %s of %s to quarantine (%s): %s",
                damaged.kind,
                self.root,
                damaged.why,
                ", ".join(moved),
            )

    def _s_quarantined(self) -> list[Path]:
        found: list[Path] = []
        for parent, _, names in os.walk(f"{self.root}/quarantine"):
            found += [Path(parent, name).relative_to(self.root) for name in names]
        return sorted(found)

    async def quarantined(self) -> list[Path]:
        """Files moved to ``quarantine/`` because they were damaged, relative to the root."""
        return await self._call(self._s_quarantined)

    # --- check and doctor --------------------------------------------------------------

    def _s_check(self, tenant: str | None, repair: bool) -> CheckReport:
        report = CheckReport()
        for name in [tenant] if tenant is not None else self._tenants():
            tenant_dir = self._tenant_dir(name, create=False)
            if tenant_dir is None:
                continue
            for record in self._scan(name):  # quarantines what it cannot read
                self._check_session(self._where(tenant_dir, name, record.id), repair, report)
            self._check_orphan_logs(tenant_dir, name, repair, report)
        for path in self._s_quarantined():
            if tenant is None or path.parts[1] == tenant:
                report.found("quarantined_file", str(path))
        return report

    def _check_session(self, w: _Where, repair: bool, report: CheckReport) -> None:
        """One session's aggregates against its log, and its folder; each repaired under
        the session's stripe (and the tenant's lock, for the folder), after reading again."""
        subject = f"{w.tenant}/{w.id}"
        with self._locks.hold(w.stripe, repair):
            loaded = self._load(w, repair)
            if loaded is None:
                return
            head, state, fd = loaded
            try:
                messages = (
                    []
                    if fd is None or head.end == 0
                    else _lines_from(fd, w.id, 0, head.end, 0, None)
                )
            except ValueError:
                why = "a message line is damaged"
                raise _Damaged("sessions", w.tenant, w.id, why, head.counter) from None
            tally: Tally = (
                len(messages),
                sum(m.input_tokens for m in messages),
                sum(m.output_tokens for m in messages),
                sum(m.cost for m in messages),
                messages[0].seq if messages else 0,
                messages[-1].seq if messages else 0,
            )
            r = head.record
            if has_gap(tally):
                report.found("seq_gaps", subject)
            stored = (r.message_count, r.input_tokens, r.output_tokens, r.cost, r.last_seq)
            if tally_differs(stored, tally):
                if repair:
                    assert state is not None  # loaded with state when repairing
                    new = dataclasses.replace(
                        r,
                        message_count=tally[0],
                        input_tokens=tally[1],
                        output_tokens=tally[2],
                        cost=tally[3],
                        last_seq=max(r.last_seq, tally[5]),
                        version=r.version + 1,
                    )
                    self._save(w, new, state, head.end, sync_dir=True, size=head.size)
                report.found("aggregates", subject, repair)
            folder = r.folder
        if folder is not None and self._read_folder(w.tenant, folder) is None:
            fixed = repair and self._clear_folder(w, folder)
            report.found("missing_folder", subject, fixed)

    def _clear_folder(self, w: _Where, folder: str) -> bool:
        with self._tenant_lock(w.tenant, False), self._locks.hold(w.stripe, True):
            loaded = self._load(w, True)
            if loaded is None or self._read_folder(w.tenant, folder) is not None:
                return False
            head, state, _ = loaded
            if head.record.folder != folder:
                return False
            assert state is not None
            new = dataclasses.replace(head.record, folder=None, version=head.record.version + 1)
            self._save(w, new, state, head.end, sync_dir=True, size=head.size)
            return True

    def _check_orphan_logs(
        self, tenant_dir: str, tenant: str, repair: bool, report: CheckReport
    ) -> None:
        """Logs with no record: what a delete that stopped between its two unlinks left."""
        with os.scandir(f"{tenant_dir}/sessions") as entries:
            logs = [
                e.name[:-6]
                for e in entries
                if e.name.endswith(".jsonl") and rules.ID_PATTERN.fullmatch(e.name[:-6])
            ]
        for session_id in logs:
            w = self._where(tenant_dir, tenant, session_id)
            with self._locks.hold(w.stripe, repair):
                if os.path.exists(w.record):
                    continue
                try:
                    lines = _read_file(w.log).count(b"\n")
                except FileNotFoundError:
                    continue
                if repair:
                    self._forget_log(w)
                    os.unlink(w.log)
            report.found("orphan_messages", f"{tenant}/{session_id}", repair, lines)

    def _s_doctor(self) -> DoctorReport:
        sizes: dict[str, int] = {}
        counts = {"tenants": 0, "sessions": 0, "folders": 0, "guards": 0, "quarantined": 0}
        for part in ("tenants", "quarantine"):
            total = 0
            for parent, _, names in os.walk(f"{self.root}/{part}"):
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(f"{parent}/{name}").st_size
                    if part == "quarantine":
                        counts["quarantined"] += 1
                    elif name.endswith(".json"):
                        kind = os.path.basename(parent)
                        if kind in counts:
                            counts[kind] += 1
            sizes[part] = total
        counts["tenants"] = len(self._tenants())
        report = DoctorReport(
            engine=self.name,
            server_version=f"files format {FORMAT}",
            schema_version=FORMAT,
            settings={"fsync": "every write", "locks": "flock"},
            sizes=sizes,
            counts=counts,
        )
        if counts["quarantined"]:
            report.warnings.append(
                f"{counts['quarantined']} damaged files are in {self.root}/quarantine: read "
                "them (`sessionkeeper check` lists them), recover what you can, then move "
                "them away; sessionkeeper never deletes them"
            )
        return report

    async def check(self, tenant: str | None, now: float, repair: bool) -> CheckReport:
        return await self._call(self._s_check, tenant, repair)

    async def doctor(self, now: float) -> DoctorReport:
        return await self._call(self._s_doctor)

    # --- the hooks ---------------------------------------------------------------------

    async def insert_session(self, record: SessionRecord, now: float) -> None:
        if not await self._call(self._s_put, record, [], now, False):
            raise AlreadyExists(f"session {record.id!r} already exists")

    async def get_session(self, tenant: str, session_id: str, now: float) -> SessionRecord | None:
        return await self._read(self._s_get, tenant, session_id, now)

    async def delete_session(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> None:
        await self._call(self._s_delete, tenant, session_id, now, expected_version)

    async def change_session(
        self, tenant: str, session_id: str, change: Change, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]]:
        return await self._call(self._s_change, tenant, session_id, change, now)

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageDraft],
        now: float,
        expected_version: int | None,
    ) -> list[MessageRecord]:
        pool = self._check_usable()
        loop = asyncio.get_running_loop()
        job = _AppendJob(messages, now, expected_version, loop.create_future())
        key = (loop, tenant, session_id)
        waiting = self._appends.get(key)
        if waiting is None:
            self._appends[key] = []  # a batch is in flight; appends meanwhile wait here
            self._start_batch(pool, key, [job])
        else:
            waiting.append(job)
        return await job.future

    def _start_batch(
        self,
        pool: ThreadPoolExecutor,
        key: tuple[asyncio.AbstractEventLoop, str, str],
        jobs: list[_AppendJob],
    ) -> None:
        """Append ``jobs`` on a thread; the results come back in one hop, which also starts
        the batch of the appends that queued meanwhile (group commit)."""
        done = key[0].create_future()  # close() waits for it
        self._pending.add(done)
        done.add_done_callback(self._pending.discard)
        pool.submit(self._append_work, key, jobs, done)

    def _append_work(
        self,
        key: tuple[asyncio.AbstractEventLoop, str, str],
        jobs: list[_AppendJob],
        done: asyncio.Future[None],
    ) -> None:
        loop, tenant, session_id = key
        try:
            results = self._guarded(self._s_append, tenant, session_id, jobs)
        except BaseException as exc:
            results = [(False, exc)] * len(jobs)
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
            loop.call_soon_threadsafe(self._batch_done, key, jobs, results, done)

    def _batch_done(
        self,
        key: tuple[asyncio.AbstractEventLoop, str, str],
        jobs: list[_AppendJob],
        results: list[tuple[bool, Any]],
        done: asyncio.Future[None],
    ) -> None:
        for job, (ok, value) in zip(jobs, results, strict=True):
            _settle(job.future, ok, value)
        queued = self._appends.pop(key, [])
        try:
            if queued:
                pool = self._check_usable()
                self._appends[key] = []
                self._start_batch(pool, key, queued)
        except BackendUnavailable as exc:
            self._appends.pop(key, None)
            for job in queued:
                _settle(job.future, False, exc)
        finally:
            done.set_result(None)  # after the next batch is under way: close() sees it

    async def read_messages(
        self, tenant: str, session_id: str, now: float, after_seq: int, limit: int
    ) -> list[MessageRecord] | None:
        return await self._read(self._s_read, tenant, session_id, now, after_seq, limit)

    async def last_messages(
        self, tenant: str, session_id: str, now: float, limit: int
    ) -> list[MessageRecord] | None:
        return await self._read(self._s_last, tenant, session_id, now, limit)

    async def pop_message(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, MessageRecord | None]:
        return await self._call(self._s_pop, tenant, session_id, now, expected_version)

    async def clear_messages(
        self, tenant: str, session_id: str, now: float, expected_version: int | None
    ) -> tuple[SessionRecord, int]:
        return await self._call(self._s_clear, tenant, session_id, now, expected_version)

    async def list_sessions(
        self, tenant: str, query: SessionQuery, now: float
    ) -> list[SessionRecord]:
        return await self._call(self._s_list, tenant, query, now)

    async def count_sessions(self, tenant: str, query: SessionQuery, now: float) -> int:
        return await self._call(self._s_count, tenant, query, now)

    async def stats(self, tenant: str, now: float, since: float, top: int) -> Stats:
        return await self._call(self._s_stats, tenant, now, since, top)

    async def insert_folder(self, record: FolderRecord) -> None:
        await self._call(self._f_put, record, None)

    async def get_folder(self, tenant: str, folder_id: str, now: float) -> FolderRecord | None:
        return await self._call(self._f_get, tenant, folder_id, now)

    async def rename_folder(
        self, tenant: str, folder_id: str, name: str, now: float
    ) -> FolderRecord:
        return await self._call(self._f_rename, tenant, folder_id, name, now)

    async def list_folders(
        self, tenant: str, owner: str | None, owner_set: bool, now: float
    ) -> list[FolderRecord]:
        return await self._call(self._f_list, tenant, owner, owner_set, now)

    async def delete_folder(
        self,
        tenant: str,
        folder_id: str,
        now: float,
        reassign_to: str | None,
        cascade: bool,
    ) -> int:
        return await self._call(self._f_delete, tenant, folder_id, now, reassign_to, cascade)

    async def purge_expired(
        self, tenant: str | None, now: float, limit: int
    ) -> list[tuple[str, str]]:
        return await self._call(self._s_purge, tenant, now, limit)

    async def update_guard(self, tenant: str, key: str, update: GuardUpdate[T], now: float) -> T:
        return await self._call(self._g_update, tenant, key, update, now)

    async def get_guard(self, tenant: str, key: str, now: float) -> str | None:
        return await self._call(self._g_get, tenant, key, now)

    async def list_guards(self, tenant: str, prefix: str, now: float) -> list[GuardRecord]:
        return await self._call(self._g_list, tenant, prefix, now)

    async def list_tenants(self, now: float) -> list[str]:
        return await self._call(self._s_tenants, now)

    async def export_session(
        self, tenant: str, session_id: str, now: float
    ) -> tuple[SessionRecord, list[MessageRecord]] | None:
        return await self._call(self._s_export, tenant, session_id, now)

    async def load_session(
        self, record: SessionRecord, messages: list[MessageRecord], now: float, replace: bool
    ) -> bool:
        return await self._call(self._s_put, record, messages, now, replace)

    async def load_folder(self, record: FolderRecord, replace: bool) -> bool:
        return await self._call(self._f_put, record, replace)

    async def add_daily(self, tenant: str, rows: list[DailyRecord], replace: bool = False) -> None:
        await self._call(self._d_add, tenant, rows, replace)

    async def read_daily(
        self,
        tenant: str,
        first: int,
        last: int,
        owner: str | None,
        owner_set: bool,
        group_by: str = "day",
    ) -> list[DailyRecord]:
        found = await self._call(self._d_read, tenant)
        return [
            row
            for row in found
            if first <= row.day <= last and (not owner_set or row.owner == owner)
        ]

    async def session_owners(self, tenant: str, session_ids: list[str]) -> dict[str, str | None]:
        return await self._call(self._s_owners, tenant, session_ids)


# --- reading lines of a committed log --------------------------------------------------


def _seq_at(fd: int, start: int, end: int) -> int:
    match = _SEQ.match(os.pread(fd, min(32, end - start), start))
    if match is None:
        raise ValueError(f"no message line starts at byte {start}")
    return int(match[1])


def _next_line_start(fd: int, position: int, end: int) -> int:
    """The first line start at or after ``position`` (``end`` if none)."""
    cursor = position - 1
    while cursor < end:
        chunk = os.pread(fd, min(_TAIL_CHUNK, end - cursor), cursor)
        if not chunk:
            return end
        found = chunk.find(b"\n")
        if found >= 0:
            return cursor + found + 1
        cursor += len(chunk)
    return end


def _seek_after(fd: int, end: int, after_seq: int) -> int:
    """A line start at or before the first line with seq > ``after_seq``, bisecting the
    committed log by bytes (its lines are in seq order)."""
    low, high = 0, end
    while high - low > _WINDOW:
        start = _next_line_start(fd, (low + high) // 2, high)
        if start >= high:
            break
        if _seq_at(fd, start, high) > after_seq:
            high = start
        else:
            low = start
    return low


def _lines_from(
    fd: int, session_id: str, start: int, end: int, after_seq: int, limit: int | None
) -> list[MessageRecord]:
    """Messages with seq > ``after_seq`` from byte ``start`` on, up to ``limit``;
    ValueError on a line that is not one of ours."""
    found: list[MessageRecord] = []
    pending = b""
    position = start
    while position < end and (limit is None or len(found) < limit):
        chunk = os.pread(fd, min(_SCAN_CHUNK, end - position), position)
        if not chunk:
            break
        position += len(chunk)
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for raw in lines:
            match = _SEQ.match(raw)
            if match is None:
                raise ValueError("a message line is damaged")
            if int(match[1]) > after_seq:
                found.append(_read_message(session_id, raw))
                if limit is not None and len(found) >= limit:
                    break
    return found


def _line_span(fd: int, end: int) -> bytes:
    """The last line before ``end``, with its newline."""
    size = _TAIL_CHUNK
    while True:
        start = max(0, end - size)
        data = _read_span(fd, start, end)
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0:
            return data[cut + 1 :]
        if start == 0:
            return data
        size *= 2


def _last_lines(fd: int, end: int, limit: int) -> list[bytes]:
    """The last ``limit`` lines before ``end``, oldest first, read from the end."""
    size = _TAIL_CHUNK
    while True:
        start = max(0, end - size)
        raws = _read_span(fd, start, end).split(b"\n")
        raws.pop()  # the committed log ends with a newline
        if start > 0:
            raws.pop(0)  # a line cut by the window
        if len(raws) >= limit or start == 0:
            break
        size *= 4
    return raws[-limit:] if limit > 0 else []
