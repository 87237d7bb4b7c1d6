"""Rules with no I/O: ids, JSON limits, merge patch, TTL arithmetic, cursors, query matching.

Every engine and the store reuse these, so each rule is written once.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import json
import math
import re
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from .errors import InvalidInput, VersionConflict
from .models import (
    Change,
    MessageDraft,
    MessageRecord,
    OwnerCost,
    OwnerCount,
    SessionQuery,
    SessionRecord,
    Stats,
)

__all__ = [
    "ID_PATTERN",
    "apply_append",
    "apply_change",
    "ascii_lower",
    "budget_excess",
    "budget_record",
    "check_id",
    "check_version",
    "client_ip",
    "decode_cursor",
    "decode_json",
    "encode_cursor",
    "encode_json",
    "initial_expiry",
    "is_after_cursor",
    "is_expired",
    "login_expiry",
    "login_failure",
    "login_record",
    "matches",
    "merge_patch",
    "new_id",
    "number_messages",
    "period_bounds",
    "rate_hit",
    "remove_messages",
    "renewed_expiry",
    "sort_key",
    "stats_of",
]

# Letters, digits and ._:- ; at most 128 characters; no leading dot (so never "." or "..").
ID_PATTERN = re.compile(r"[A-Za-z0-9_:\-][A-Za-z0-9._:\-]{0,127}", re.ASCII)
ID_BYTES = 18  # 144 bits of randomness, 24 URL-safe characters

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what JSON libraries round-trip exactly
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# --- ids -------------------------------------------------------------------------------


def new_id() -> str:
    """A fresh URL-safe id with 144 bits from ``secrets``; it always matches ID_PATTERN."""
    return secrets.token_urlsafe(ID_BYTES)


def check_id(value: object, field: str) -> str:
    """Return ``value`` if it is a valid id, else raise InvalidInput naming ``field``."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, not {type(value).__name__}")
    if ID_PATTERN.fullmatch(value) is None:
        raise InvalidInput(
            field,
            "must be 1-128 characters of letters, digits and ._:- and must not start with a dot",
        )
    return value


def ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only, as SQLite's lower() and LIKE do."""
    return text.translate(_ASCII_LOWER)


# --- JSON values -----------------------------------------------------------------------


def _check_tree(value: Any, field: str, max_depth: int) -> None:
    """Check that ``value`` is plain JSON no deeper than ``max_depth``, without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                raise InvalidInput(field, f"nests deeper than the limit of {max_depth}")
            for key, child in node.items():
                if not isinstance(key, str):
                    raise InvalidInput(field, f"object keys must be strings, not {key!r}")
                if isinstance(child, dict | list | tuple):
                    stack.append((child, depth + 1))
                else:
                    _check_scalar(child, field)
        elif isinstance(node, list | tuple):
            if depth > max_depth:
                raise InvalidInput(field, f"nests deeper than the limit of {max_depth}")
            for child in node:
                if isinstance(child, dict | list | tuple):
                    stack.append((child, depth + 1))
                else:
                    _check_scalar(child, field)
        else:
            _check_scalar(node, field)


def _check_scalar(value: Any, field: str) -> None:
    if value is None or isinstance(value, str | bool):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidInput(field, "integers must fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(field, "numbers must be finite (no NaN or Infinity)")
        return
    raise InvalidInput(field, f"{type(value).__name__} is not a JSON value")


def encode_json(value: Any, field: str, max_bytes: int, max_depth: int) -> str:
    """Serialise a JSON value compactly after checking its types, depth and size."""
    if not isinstance(value, str):
        if isinstance(value, dict) and not value:
            return "{}"
        _check_tree(value, field, max_depth)
    try:
        data = orjson.dumps(value)
    except TypeError:  # the tree is checked, so only a string can fail: a lone surrogate
        raise InvalidInput(field, "strings must be valid Unicode (no lone surrogates)") from None
    if len(data) > max_bytes:
        raise InvalidInput(field, f"is {len(data)} bytes as JSON, over the limit of {max_bytes}")
    return data.decode()


def decode_json(text: str) -> Any:
    """Parse JSON text that ``encode_json`` made (or an engine stored)."""
    return orjson.loads(text)


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON Merge Patch to ``target`` and return the result.

    ``target`` is not modified. A null in the patch removes a member; an object merges
    recursively; anything else replaces.
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- TTL -------------------------------------------------------------------------------


def initial_expiry(
    now: float, ttl: float | None, idle_ttl: float | None, max_ttl: float | None
) -> tuple[float | None, float | None]:
    """Return ``(expires_at, deadline)`` for a session created at ``now``.

    ``deadline`` is the absolute end (``ttl``, capped by ``max_ttl``); idle expiry starts
    at ``now + idle_ttl`` and is renewed on access, never past the deadline.
    """
    deadline = None if ttl is None else now + ttl
    if max_ttl is not None:
        deadline = now + max_ttl if deadline is None else min(deadline, now + max_ttl)
    return renewed_expiry(None if idle_ttl else deadline, idle_ttl, deadline, now), deadline


def renewed_expiry(
    expires_at: float | None, idle_ttl: float | None, deadline: float | None, now: float
) -> float | None:
    """The expiry after an access at ``now``: idle sessions move forward, others stay."""
    if idle_ttl is None:
        return expires_at
    renewed = now + idle_ttl
    if expires_at is not None and expires_at > renewed:
        renewed = expires_at
    if deadline is not None and deadline < renewed:
        renewed = deadline
    return renewed


def is_expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and expires_at <= now


# --- changes ---------------------------------------------------------------------------


def apply_change(
    record: SessionRecord, change: Change, now: float
) -> tuple[SessionRecord, list[MessageRecord]]:
    """Compute a session after ``change`` at ``now``, and the messages it appends.

    Raises VersionConflict on a stale ``expected_version`` and InvalidInput when a merge
    patch leaves state over the limits. ``record`` must carry its state when the change
    patches it. The input record is not modified.
    """
    check_version(record, change.expected_version)
    new, appended = apply_append(record, change.messages, now)
    for name, value in change.fields.items():
        setattr(new, name, value)
    if change.state is not None:
        new.state = change.state
    elif change.has_state_patch:
        current = decode_json(record.state) if record.state is not None else {}
        merged = merge_patch(current, change.state_patch)
        new.state = encode_json(merged, "state", change.max_state_bytes, change.max_depth)
    return new, appended


def check_version(record: SessionRecord, expected_version: int | None) -> None:
    if expected_version is not None and expected_version != record.version:
        raise VersionConflict(record.id, expected_version, record.version)


def number_messages(
    session_id: str, last_seq: int, drafts: list[MessageDraft], now: float
) -> list[MessageRecord]:
    """The drafts as stored messages, numbered after ``last_seq`` with no gap."""
    return [
        MessageRecord(
            session_id,
            last_seq + offset,
            draft.role,
            draft.content,
            draft.input_tokens,
            draft.output_tokens,
            draft.cost,
            draft.metadata,
            now,
        )
        for offset, draft in enumerate(drafts, 1)
    ]


def apply_append(
    record: SessionRecord, drafts: list[MessageDraft], now: float
) -> tuple[SessionRecord, list[MessageRecord]]:
    """A copy of the session after ``drafts`` were appended at ``now`` (a change even with
    no drafts: new version, ``updated_at`` and idle expiry), and the numbered messages."""
    new = record.copy()
    appended = number_messages(record.id, record.last_seq, drafts, now)
    for draft in drafts:
        new.input_tokens += draft.input_tokens
        new.output_tokens += draft.output_tokens
        new.cost += draft.cost
    new.message_count += len(appended)
    new.last_seq += len(appended)
    new.version += 1
    new.updated_at = now
    new.expires_at = renewed_expiry(record.expires_at, record.idle_ttl, record.deadline, now)
    return new, appended


def remove_messages(
    record: SessionRecord,
    count: int,
    input_tokens: int,
    output_tokens: int,
    cost: float,
    now: float,
) -> SessionRecord:
    """A session after ``count`` messages with these token and cost sums were removed."""
    new = record.copy()
    new.message_count -= count
    if new.message_count <= 0:
        new.message_count = new.input_tokens = new.output_tokens = 0
        new.cost = 0.0
    else:
        new.input_tokens -= input_tokens
        new.output_tokens -= output_tokens
        new.cost = max(new.cost - cost, 0.0)
    new.version += 1
    new.updated_at = now
    new.expires_at = renewed_expiry(record.expires_at, record.idle_ttl, record.deadline, now)
    return new


# --- listings --------------------------------------------------------------------------


def encode_cursor(query: SessionQuery, record: SessionRecord) -> str:
    """An opaque cursor that resumes a listing just after ``record``."""
    key = record.created_at if query.order_by == "created_at" else record.updated_at
    raw = json.dumps([query.order_by, query.descending, key, record.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, order_by: str, descending: bool) -> tuple[float, str]:
    """Return the ``(key, id)`` a cursor resumes after; InvalidInput if it is not ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        made_for, made_desc, key, last_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidInput("cursor", "is not a cursor this store made") from exc
    if made_for != order_by or made_desc != descending:
        raise InvalidInput("cursor", "was made for another ordering of the listing")
    if not isinstance(key, int | float) or not isinstance(last_id, str):
        raise InvalidInput("cursor", "is not a cursor this store made")
    return float(key), last_id


def matches(record: SessionRecord, query: SessionQuery, now: float) -> bool:
    """Whether ``record`` is live and passes every filter of ``query`` (ignoring position)."""
    if is_expired(record.expires_at, now):
        return False
    if query.owner_set and record.owner != query.owner:
        return False
    if query.folder_set and record.folder != query.folder:
        return False
    if query.status is not None and record.status != query.status:
        return False
    if query.created_since is not None and record.created_at < query.created_since:
        return False
    if query.created_before is not None and record.created_at >= query.created_before:
        return False
    if query.updated_since is not None and record.updated_at < query.updated_since:
        return False
    if query.updated_before is not None and record.updated_at >= query.updated_before:
        return False
    return query.title_contains is None or query.title_contains in ascii_lower(record.title)


def stats_of(records: list[SessionRecord], since: float, top: int) -> Stats:
    """Figures over live ``records`` (for engines that cannot aggregate in storage)."""
    statuses = Counter(r.status for r in records)
    owners = Counter(r.owner for r in records)
    ranked = sorted(owners.items(), key=lambda item: (-item[1], item[0] or ""))
    costs: dict[str | None, float] = {}
    for r in records:
        costs[r.owner] = costs.get(r.owner, 0.0) + r.cost
    by_cost = sorted(costs.items(), key=lambda item: (-item[1], item[0] or ""))
    total = len(records)
    return Stats(
        total=total,
        active=statuses["active"],
        completed=statuses["completed"],
        archived=statuses["archived"],
        recently_active=sum(1 for r in records if r.updated_at >= since),
        completion_rate=statuses["completed"] / total if total else 0.0,
        messages=sum(r.message_count for r in records),
        input_tokens=sum(r.input_tokens for r in records),
        output_tokens=sum(r.output_tokens for r in records),
        cost=sum(r.cost for r in records),
        top_owners=[OwnerCount(owner=o, sessions=n) for o, n in ranked[:top]],
        top_owners_by_cost=[OwnerCost(owner=o, cost=c) for o, c in by_cost[:top]],
    )


def sort_key(record: SessionRecord, query: SessionQuery) -> tuple[float, str]:
    key = record.created_at if query.order_by == "created_at" else record.updated_at
    return key, record.id


def is_after_cursor(record: SessionRecord, query: SessionQuery) -> bool:
    """Whether ``record`` comes after the cursor position of ``query``."""
    if query.after_key is None or query.after_id is None:
        return True
    position = (query.after_key, query.after_id)
    if query.descending:
        return sort_key(record, query) < position
    return sort_key(record, query) > position


# --- guards: rate windows, login lockouts, budget periods -------------------------------
# Each guard keeps its counter as a small JSON value under one key; the functions below
# compute the next value from the stored one, and engines run them atomically.

# A refused hit always waits a little: rounding can put the oldest hit's exit at "now".
_MIN_RETRY = 1e-6


def rate_hit(
    value: str | None, limit: int, window: float, cost: int, now: float
) -> tuple[list[float], bool, float]:
    """A hit of weight ``cost`` on an exact sliding-window log.

    ``value`` holds the times of the hits admitted in the last ``window`` seconds (at most
    ``limit`` of them). The hit is admitted when those plus ``cost`` stay within ``limit``;
    then it is logged ``cost`` times at ``now``. Returns the new log (oldest first), whether
    the hit was admitted and, if not, the seconds until it would be.
    """
    hits = [t for t in _times(value) if t > now - window]
    if len(hits) + cost <= limit:
        for _ in range(cost):
            bisect.insort(hits, now)
        return hits, True, 0.0
    # Admitted once enough of the oldest hits have left the window.
    must_leave = len(hits) + cost - limit
    return hits, False, max(hits[must_leave - 1] + window - now, _MIN_RETRY)


def _times(value: str | None) -> list[float]:
    if value is None:
        return []
    times = orjson.loads(value)
    return sorted(float(t) for t in times)


def login_failure(
    value: str | None,
    now: float,
    max_failures: int,
    window: float,
    lockout: float,
    progressive: bool,
    max_lockout: float,
) -> dict[str, Any]:
    """The login record after one more failure at ``now``.

    The record holds ``failures`` (since the last success or unlock), ``recent`` (times of
    failures in the window, at most ``max_failures``), ``locked_until`` and ``lockouts``.
    Reaching ``max_failures`` within ``window`` locks for ``lockout`` seconds, doubled for
    each earlier lockout when ``progressive`` (at most ``max_lockout``); the window starts
    afresh after a lockout. Failures while locked are counted but do not extend the lock.
    """
    record = login_record(value)
    record["failures"] += 1
    record["last_failure"] = now
    locked = record["locked_until"] is not None and record["locked_until"] > now
    if locked:
        return record
    recent = [t for t in record["recent"] if t > now - window]
    recent.append(now)
    if len(recent) >= max_failures:
        record["lockouts"] += 1
        duration = lockout * 2 ** (record["lockouts"] - 1) if progressive else lockout
        record["locked_until"] = now + min(duration, max(max_lockout, lockout))
        recent = []
    record["recent"] = recent[-max_failures:]
    return record


def login_record(value: str | None) -> dict[str, Any]:
    """A stored login record, or a fresh one."""
    if value is None:
        return {
            "failures": 0,
            "recent": [],
            "locked_until": None,
            "lockouts": 0,
            "last_failure": None,
        }
    record: dict[str, Any] = orjson.loads(value)
    return record


def login_expiry(record: dict[str, Any], window: float, forget_after: float) -> float:
    """When a login record may be forgotten: ``forget_after`` seconds after its last
    failure's window and its lockout are both over (so lockouts keep growing meanwhile)."""
    ends: list[float] = [float(record["last_failure"]) + window]
    if record["locked_until"] is not None:
        ends.append(float(record["locked_until"]))
    return max(ends) + forget_after


def period_bounds(period: str, now: float) -> tuple[float | None, float | None]:
    """The start and end (Unix seconds, UTC) of the budget period holding ``now``:
    days start at midnight, weeks on Monday, months on the 1st; ``none`` never ends."""
    if period == "none":
        return None, None
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        start = day
        end = start + timedelta(days=1)
    elif period == "weekly":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == "monthly":
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    else:
        raise InvalidInput("period", f"must be one of none, daily, weekly, monthly, not {period!r}")
    return start.timestamp(), end.timestamp()


def budget_record(value: str | None, period: str, now: float) -> dict[str, Any]:
    """The stored budget record with its usage reset if its period is over.

    It holds ``start`` (of the period its usage counts), ``input_tokens``,
    ``output_tokens``, ``cost``, and ``limits`` set for this owner or session alone
    (``tokens``, ``cost``, ``period``), which outlive every period."""
    record: dict[str, Any] = {} if value is None else orjson.loads(value)
    limits = record.get("limits") or {}
    start, _ = period_bounds(limits.get("period", period), now)
    if value is None or record.get("start") != start:
        record.update(start=start, input_tokens=0, output_tokens=0, cost=0.0)
    record["limits"] = limits
    return record


def budget_excess(
    record: dict[str, Any],
    token_limit: int | None,
    cost_limit: float | None,
    input_tokens: int,
    output_tokens: int,
    cost: float,
) -> tuple[str, float, float, float] | None:
    """What an append of these figures would exceed: ``(what, used, wanted, limit)``, or
    None when it fits. Tokens count input plus output."""
    used_tokens = record["input_tokens"] + record["output_tokens"]
    wanted_tokens = input_tokens + output_tokens
    if token_limit is not None and used_tokens + wanted_tokens > token_limit:
        return "tokens", used_tokens, wanted_tokens, token_limit
    if cost_limit is not None and record["cost"] + cost > cost_limit + 1e-12:
        return "cost", record["cost"], cost, cost_limit
    return None


def client_ip(peer: str | None, forwarded_for: str | None, trusted_proxies: list[str]) -> str:
    """The client's address: ``peer``, unless ``peer`` is a trusted proxy, when the
    nearest untrusted address in ``X-Forwarded-For`` (read right to left) is taken.

    ``trusted_proxies`` holds addresses or networks (``10.0.0.0/8``). A forged header from
    an untrusted peer is ignored."""
    if peer is None:
        return "unknown"
    networks = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    if not forwarded_for or not trusted(peer):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled header: fall back to the proxy, never to junk
    return hops[0] if hops else peer
