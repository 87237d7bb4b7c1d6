"""Webhooks of the HTTP service: change events signed, kept in a durable outbox, sent with
retries and backoff, and kept in a delivery log.

How a delivery travels:

1. A change hook of the store (``created``, ``completed``, ``expired``, ``deleted``; the
   ``webhook_events`` setting) writes a pending delivery to the outbox *before* anything
   is sent: a guard ``webhook-outbox:<id>`` of the reserved tenant ``_server``, in the
   store's own engine. The store fires each event exactly once, in the one process whose
   write made it, so each event makes exactly one delivery.
2. A ``Webhooks`` dispatcher (one per service process) lists the outbox, and claims a due
   delivery by compare-and-set: a lease with its owner token, for longer than a POST may
   take. Two dispatchers never send one delivery at once, and the lease of a dispatcher
   that died runs out, so another sends it.
3. The POST carries the JSON body, ``X-Sessionkeeper-Event``, ``-Delivery`` (the id, for
   de-duplicating), ``-Timestamp`` and ``-Signature: sha256=<hex HMAC-SHA256 of
   "timestamp.body">``. A 2xx answer delivers it; anything else is retried after
   ``webhook_backoff`` seconds, doubled for each failed attempt (with up to 25 % jitter,
   at most an hour), until ``webhook_max_attempts``, and then it has failed. Every attempt
   is recorded: time, status code or error, duration.
4. A delivered or failed delivery moves to the log (``webhook-log:<id>``), which keeps it
   ``webhook_log_days`` after its last change. ``list_deliveries`` reads outbox and log;
   ``redeliver`` puts a finished delivery back in the outbox.

Delivery is at least once: a dispatcher that dies after the receiver answered and before
it recorded the answer leaves the delivery to be sent again when its lease ends. Receivers
that must act once de-duplicate on ``X-Sessionkeeper-Delivery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, cast

import orjson
from pydantic import BaseModel, Field

from ..errors import InvalidInput, NotFound
from ..keys import SERVER_TENANT
from ..models import SessionSummary
from ..settings import Settings
from ..store import HookEvent, SessionEvent, SessionStore

if TYPE_CHECKING:
    import httpx

__all__ = [
    "MAX_BACKOFF",
    "STATUSES",
    "Attempt",
    "Delivery",
    "DeliveryStatus",
    "Webhooks",
    "backoff_delay",
    "list_deliveries",
    "redeliver",
    "sign",
    "verify_signature",
]

_log = logging.getLogger("sessionkeeper.webhooks")

DeliveryStatus = Literal["pending", "delivered", "failed"]
STATUSES: tuple[DeliveryStatus, ...] = ("pending", "delivered", "failed")
#: The longest wait between two attempts, in seconds, whatever ``webhook_backoff`` is.
MAX_BACKOFF = 3600.0

_OUTBOX = "webhook-outbox:"
_LOG = "webhook-log:"
_FINAL = ("delivered", "failed")
_ID = re.compile(r"[0-9a-f]{24}", re.ASCII)
_DAY = 86_400.0
# A lease outlasts the POST (bounded by webhook_timeout) by this margin for the writes
# around it, so it runs out only when its dispatcher has stopped.
_LEASE_MARGIN = 60.0
_MAX_ERROR = 300
_MAX_LISTED = 1000
_MAX_PER_PASS = 1000  # deliveries one pass tries; the next pass starts at once for more

_SUMMARY_FIELDS = set(SessionSummary.model_fields)

Record = dict[str, Any]


# --- signatures ------------------------------------------------------------------------


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def sign(secret: str | bytes, timestamp: int | str, body: str | bytes) -> str:
    """The ``X-Sessionkeeper-Signature`` of ``body`` sent at ``timestamp`` (Unix seconds):
    ``sha256=`` and the hex HMAC-SHA256, keyed with ``secret``, of ``timestamp.body``."""
    message = f"{timestamp}.".encode() + _bytes(body)
    return "sha256=" + hmac.new(_bytes(secret), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str | bytes,
    timestamp: int | str,
    body: str | bytes,
    signature: str,
    tolerance: float = 300.0,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` (the ``X-Sessionkeeper-Signature`` header) signs ``body`` (the
    raw request body, as received) at ``timestamp`` (the ``X-Sessionkeeper-Timestamp``
    header) with ``secret``, and that timestamp is within ``tolerance`` seconds of ``now``
    (default: the system clock), so a recorded request cannot be replayed later.

    The comparison takes the same time however much of the signature is right.
    """
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance:
        return False
    expected = sign(secret, sent, body)
    return hmac.compare_digest(expected.encode(), signature.strip().encode("utf-8", "replace"))


# --- the delivery log, as listed -------------------------------------------------------


class Attempt(BaseModel):
    """One POST of a delivery."""

    at: datetime = Field(description="When it was sent")
    status_code: int | None = Field(description="The receiver's status, None if no answer")
    error: str | None = Field(description="Why it failed without an answer, or None")
    seconds: float = Field(description="How long it took")


class Delivery(BaseModel):
    """One change event to send to the webhook URL, and what became of it."""

    id: str = Field(description="The delivery id, also X-Sessionkeeper-Delivery")
    event: str
    tenant: str
    session_id: str
    status: DeliveryStatus = Field(
        description="pending (to be sent or retried), delivered (a 2xx answer) or failed "
        "(webhook_max_attempts attempts without one)"
    )
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When a pending one is sent next")
    attempts: list[Attempt] = Field(description="Every attempt, oldest first")


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _delivery(record: Record) -> Delivery:
    pending = record["status"] == "pending"
    return Delivery(
        id=record["id"],
        event=record["event"],
        tenant=record["tenant"],
        session_id=record["session_id"],
        status=record["status"],
        created_at=_utc(record["created_at"]),
        next_attempt_at=_utc(record["next_at"]) if pending else None,
        attempts=[
            Attempt(
                at=_utc(a["at"]),
                status_code=a["status_code"],
                error=a["error"],
                seconds=a["seconds"],
            )
            for a in record["attempts"]
        ],
    )


# --- the state of one delivery: pure functions, no I/O ---------------------------------


def backoff_delay(failures: int, base: float, jitter: float = 0.0) -> float:
    """Seconds to wait after the ``failures``-th failed attempt in a row: ``base``, doubled
    for each failure after the first, stretched by up to 25 % with ``jitter`` (0 to 1) so
    that many deliveries failing together do not retry together, at most MAX_BACKOFF."""
    nominal = base * 2.0 ** min(max(failures - 1, 0), 60)
    return min(MAX_BACKOFF, nominal * (1.0 + 0.25 * min(max(jitter, 0.0), 1.0)))


def _new_record(event: SessionEvent, delivery_id: str, now: float) -> Record:
    session = None
    if event.session is not None:  # a Session at run time: leave its state out
        session = event.session.model_dump(mode="json", include=_SUMMARY_FIELDS)
    body = {
        "id": delivery_id,
        "event": event.event,
        "tenant": event.tenant,
        "session_id": event.session_id,
        "at": event.at.isoformat(),
        "session": session,
    }
    return {
        "id": delivery_id,
        "event": event.event,
        "tenant": event.tenant,
        "session_id": event.session_id,
        "created_at": now,
        "body": orjson.dumps(body).decode(),
        "status": "pending",
        "next_at": now,
        "attempts": [],
        "round": 0,  # attempts before this index were made before the last redelivery
        "lease": None,
        "rev": 1,  # +1 on every change, so an older copy never overwrites a newer one
    }


def _claimed(record: Record, owner: str, now: float, lease: float) -> Record | None:
    """``record`` leased to ``owner`` if it is due and nobody holds it, else None."""
    held = record["lease"]
    if record["status"] != "pending" or record["next_at"] > now:
        return None
    if held is not None and held["until"] > now:
        return None
    return {**record, "lease": {"owner": owner, "until": now + lease}, "rev": record["rev"] + 1}


def _attempted(
    record: Record, attempt: Record, owner: str, settings: Settings, jitter: float
) -> Record:
    """``record`` after ``attempt``: delivered on a 2xx, else retried later or failed."""
    attempts = [*record["attempts"], attempt]
    changed = {**record, "attempts": attempts, "rev": record["rev"] + 1}
    held = record["lease"]
    if held is not None and held["owner"] == owner:
        changed["lease"] = None
    code = attempt["status_code"]
    if code is not None and 200 <= code < 300:
        changed["status"] = "delivered"
    elif record["status"] == "pending" and changed["lease"] is None:
        # (a dispatcher whose lease ran out records its attempt, and leaves the decision
        # to the one that holds the delivery now)
        failures = len(attempts) - record["round"]
        if failures >= settings.webhook_max_attempts:
            changed["status"] = "failed"
        else:
            delay = backoff_delay(failures, settings.webhook_backoff, jitter)
            changed["next_at"] = attempt["at"] + attempt["seconds"] + delay
    return changed


def _requeue_finished(now: float) -> Callable[[Record], Record | None]:
    def requeue(record: Record) -> Record | None:
        return None if record["status"] == "pending" else _requeued(record, now)

    return requeue


def _requeued(record: Record, now: float) -> Record:
    return {
        **record,
        "status": "pending",
        "next_at": now,
        "round": len(record["attempts"]),
        "lease": None,
        "rev": record["rev"] + 1,
    }


# --- storage: guards of the _server tenant ---------------------------------------------


def _text(record: Record) -> str:
    return orjson.dumps(record).decode()


def _expiry(settings: Settings, now: float) -> float:
    return now + settings.webhook_log_days * _DAY


async def _read(store: SessionStore, key: str, now: float) -> Record | None:
    value = await store.engine.get_guard(SERVER_TENANT, key, now)
    return None if value is None else dict(orjson.loads(value))


async def _insert(store: SessionStore, record: Record, now: float) -> bool:
    """Put ``record`` in the outbox unless a delivery of its id is there already."""
    text = _text(record)
    expires = _expiry(store.settings, now)

    def insert(value: str | None) -> tuple[str | None, float | None, bool]:
        return (value, expires, False) if value is not None else (text, expires, True)

    return await store.engine.update_guard(SERVER_TENANT, _OUTBOX + record["id"], insert, now)


async def _change(
    store: SessionStore, delivery_id: str, change: Callable[[Record], Record | None], now: float
) -> Record | None:
    """Apply ``change`` to the outbox entry atomically; returns the changed record, or None
    (no entry, or ``change`` declined) leaving it as it was."""
    expires = _expiry(store.settings, now)

    def update(value: str | None) -> tuple[str | None, float | None, Record | None]:
        if value is None:
            return None, None, None
        changed = change(orjson.loads(value))
        if changed is None:
            return value, expires, None
        return _text(changed), expires, changed

    return await store.engine.update_guard(SERVER_TENANT, _OUTBOX + delivery_id, update, now)


async def _archive(store: SessionStore, record: Record, now: float) -> None:
    """Move a delivered or failed delivery from the outbox to the log (idempotent: an older
    copy never overwrites a newer one, and an entry requeued meanwhile stays queued)."""
    text = _text(record)
    expires = _expiry(store.settings, now)
    rev = record["rev"]

    def keep_newest(value: str | None) -> tuple[str | None, float | None, None]:
        if value is not None and orjson.loads(value)["rev"] >= rev:
            return value, expires, None
        return text, expires, None

    def drop_if_unchanged(value: str | None) -> tuple[str | None, float | None, None]:
        if value is None or orjson.loads(value)["rev"] == rev:
            return None, None, None
        return value, expires, None

    engine = store.engine
    delivery_id = record["id"]
    await engine.update_guard(SERVER_TENANT, _LOG + delivery_id, keep_newest, now)
    await engine.update_guard(SERVER_TENANT, _OUTBOX + delivery_id, drop_if_unchanged, now)


async def list_deliveries(
    store: SessionStore, *, status: str | None = None, limit: int = 100
) -> list[Delivery]:
    """The deliveries of the log and the outbox, newest first, of ``status`` if given
    (pending, delivered or failed), at most ``limit`` of them."""
    if status is not None and status not in STATUSES:
        raise InvalidInput("status", f"must be one of {', '.join(STATUSES)}, not {status!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_LISTED:
        raise InvalidInput("limit", f"must be a whole number from 1 to {_MAX_LISTED}")
    now = store.clock.now()
    newest: dict[str, Record] = {}
    for prefix in (_LOG, _OUTBOX):  # the outbox last: a requeued one is newer than its log
        for guard in await store.engine.list_guards(SERVER_TENANT, prefix, now):
            record = orjson.loads(guard.value)
            found = newest.get(record["id"])
            if found is None or record["rev"] >= found["rev"]:
                newest[record["id"]] = record
    records = [r for r in newest.values() if status is None or r["status"] == status]
    records.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return [_delivery(r) for r in records[:limit]]


def _delivery_id(delivery_id: object) -> str:
    if not isinstance(delivery_id, str) or _ID.fullmatch(delivery_id) is None:
        raise InvalidInput("delivery_id", "must be the 24 hex digits of a delivery id")
    return delivery_id


async def redeliver(store: SessionStore, delivery_id: str) -> Delivery:
    """Send a delivered or failed delivery again, with the same id and body and a fresh
    count of attempts: it goes back to the outbox, and a running dispatcher sends it.
    Raises NotFound, or InvalidInput if it is still pending."""
    checked = _delivery_id(delivery_id)
    now = store.clock.now()
    for _ in range(3):  # a dispatcher may move it from the outbox to the log meanwhile
        queued = await _read(store, _OUTBOX + checked, now)
        if queued is not None and queued["status"] == "pending":
            raise InvalidInput("delivery_id", f"delivery {checked} is still pending")
        if queued is not None:
            changed = await _change(store, checked, _requeue_finished(now), now)
            if changed is not None:
                return _delivery(changed)
            continue
        logged = await _read(store, _LOG + checked, now)
        if logged is None:
            raise NotFound(f"no delivery {checked!r} (the log keeps webhook_log_days)")
        requeued = _requeued(logged, now)
        if await _insert(store, requeued, now):
            return _delivery(requeued)
    raise InvalidInput("delivery_id", f"delivery {checked} is changing; try again")


# --- the dispatcher --------------------------------------------------------------------


class Webhooks:
    """Sends the change events of ``store`` (and its tenant views) to ``webhook_url``.

    ``install()`` registers the hooks that put each event in the outbox; ``deliver_due()``
    sends what is due now; ``start()`` does both, as a task polling the outbox every
    ``poll_interval`` seconds (at once after an event of this process); ``stop()`` cancels
    it, removes the hooks and closes the HTTP client. Or ``async with Webhooks(store):``.
    Times come from the store's clock; ``jitter`` gives the backoff's random part (0 to 1).
    """

    __slots__ = (
        "_client",
        "_removers",
        "_secret",
        "_store",
        "_task",
        "_wake",
        "concurrency",
        "jitter",
        "owner",
        "poll_interval",
        "settings",
        "url",
    )

    def __init__(
        self,
        store: SessionStore,
        *,
        poll_interval: float = 1.0,
        concurrency: int = 8,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        settings = store.settings
        if settings.webhook_url is None:
            raise InvalidInput("webhook_url", "is not set: there is nowhere to send webhooks")
        if settings.webhook_secret is None:
            raise InvalidInput("webhook_secret", "is required with webhook_url")
        if not poll_interval > 0:
            raise InvalidInput("poll_interval", "must be more than 0 seconds")
        if concurrency < 1:
            raise InvalidInput("concurrency", "must be 1 or more")
        self._store = store
        self._secret = settings.webhook_secret.get_secret_value()
        self.settings = settings
        self.url = settings.webhook_url
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.jitter = jitter
        self.owner = secrets.token_hex(8)  # whose lease a claim is
        self._client: httpx.AsyncClient | None = None
        self._removers: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # made by start(), in the running loop

    # --- events in -----------------------------------------------------------------------

    def install(self) -> None:
        """Register the hooks of the ``webhook_events`` on the store (once)."""
        if not self._removers:
            for event in self.settings.webhook_events:
                hook_event = cast(HookEvent, event)  # Settings checked it is one
                self._removers.append(self._store.on(hook_event, self._hook))

    def uninstall(self) -> None:
        for remove in self._removers:
            remove()
        self._removers.clear()

    async def _hook(self, event: SessionEvent) -> None:
        await self.enqueue(event)

    async def enqueue(self, event: SessionEvent) -> str:
        """Put one delivery of ``event`` in the outbox (the hook); returns its id."""
        now = self._store.clock.now()
        while True:  # 96 random bits: a taken id is next to impossible, but cheap to handle
            record = _new_record(event, secrets.token_hex(12), now)
            if await _insert(self._store, record, now):
                break
        if self._wake is not None:
            self._wake.set()
        return str(record["id"])

    # --- deliveries out --------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Send every delivery that is due and that no dispatcher holds; also move
        finished ones left in the outbox to the log. Returns how many POSTs it made."""
        store = self._store
        now = store.clock.now()
        due: list[str] = []
        for guard in await store.engine.list_guards(SERVER_TENANT, _OUTBOX, now):
            record = orjson.loads(guard.value)
            if record["status"] in _FINAL:
                await _archive(store, record, now)
            elif _claimed(record, self.owner, now, 0.0) is not None:
                due.append(record["id"])
        if not due:
            return 0
        if len(due) > _MAX_PER_PASS:
            due = due[:_MAX_PER_PASS]
            if self._wake is not None:
                self._wake.set()
        gate = asyncio.Semaphore(self.concurrency)

        async def attempt(delivery_id: str) -> bool:
            async with gate:
                return await self._attempt(delivery_id)

        sent = await asyncio.gather(*(attempt(d) for d in due))
        return sum(sent)

    async def _attempt(self, delivery_id: str) -> bool:
        """Claim one delivery and POST it; False if another dispatcher had it first."""
        store = self._store
        lease = self.settings.webhook_timeout + _LEASE_MARGIN
        now = store.clock.now()
        record = await _change(
            store, delivery_id, lambda r: _claimed(r, self.owner, now, lease), now
        )
        if record is None:
            return False
        attempt = await self._post(record)
        jitter = self.jitter()
        after = store.clock.now()
        finished = await _change(
            store,
            delivery_id,
            lambda r: _attempted(r, attempt, self.owner, self.settings, jitter),
            after,
        )
        if finished is not None and finished["status"] in _FINAL:
            await _archive(store, finished, after)
        if finished is not None and finished["status"] == "failed":
            _log.warning(
                "webhook delivery %s of %s failed %d times; `sessionkeeper webhooks "
                "redeliver %s` sends it again",
                delivery_id,
                record["event"],
                len(finished["attempts"]) - finished["round"],
                delivery_id,
            )
        return True

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                timeout=self.settings.webhook_timeout, follow_redirects=False
            )
        return self._client

    async def _post(self, record: Record) -> Record:
        """One POST of ``record``; the attempt as recorded (no exception escapes)."""
        body: str = record["body"]
        at = self._store.clock.now()
        timestamp = int(at)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sessionkeeper-webhooks",
            "X-Sessionkeeper-Event": record["event"],
            "X-Sessionkeeper-Delivery": record["id"],
            "X-Sessionkeeper-Timestamp": str(timestamp),
            "X-Sessionkeeper-Signature": sign(self._secret, timestamp, body),
        }
        started = time.perf_counter()
        code: int | None = None
        error: str | None = None
        timeout = self.settings.webhook_timeout
        try:
            async with asyncio.timeout(timeout):  # httpx's timeout is per phase: cap the sum
                response = await self._http().post(self.url, content=body, headers=headers)
            code = response.status_code
        except TimeoutError:
            error = f"no answer within webhook_timeout ({timeout:g} s)"
        except Exception as exc:  # connection refused, TLS, a bad answer: all recorded
            error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
        seconds = round(time.perf_counter() - started, 6)
        return {"at": at, "status_code": code, "error": error, "seconds": seconds}

    # --- the task -----------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver what is due, then wait for an event or ``poll_interval``, until
        cancelled. A pass that fails (the engine is down) is logged and the next runs."""
        wake = self._wake = self._wake or asyncio.Event()
        while True:
            wake.clear()
            try:
                await self.deliver_due()
            except Exception:
                _log.exception("webhooks: a pass failed; the next runs in %g s", self.poll_interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await wake.wait()

    def start(self) -> None:
        """Install the hooks and run the dispatcher as a task of the running loop."""
        self.install()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self.run(), name="sessionkeeper-webhooks")

    async def stop(self) -> None:
        """Remove the hooks, cancel the task and wait for it, close the HTTP client. A POST
        cut short keeps its lease until it runs out; then another dispatcher sends it."""
        self.uninstall()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        self._wake = None
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

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
