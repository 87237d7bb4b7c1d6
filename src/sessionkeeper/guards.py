"""Guards over an engine: rate limits, failed-login lockouts and token and cost budgets.

Each guard is a small counter stored in the same engine as the sessions, under a key of
its own (``rate:``, ``login:``, ``budget:``) in the tenant, and changed by the engine's
``update_guard`` hook, which runs one of the pure rules of ``rules`` atomically. The store
calls these functions; an app reaches them through the store's methods.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from . import rules
from .engines.base import Engine
from .errors import BudgetExceeded, InvalidInput
from .models import BudgetUsage, LoginStatus, MessageDraft, RateLimitResult
from .settings import Settings

__all__ = [
    "Reservation",
    "budget_usage",
    "check_name",
    "hit",
    "list_logins",
    "login_failed",
    "login_status",
    "login_succeeded",
    "refund",
    "reserve",
    "set_budget",
    "unlock",
]

RATE = "rate:"
LOGIN = "login:"
BUDGET = "budget:"
_MAX_NAME = 256


def check_name(value: object, field: str) -> str:
    """A rate-limit key, client address or account name: 1 to 256 printable characters."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, not {type(value).__name__}")
    if not value or len(value) > _MAX_NAME:
        raise InvalidInput(field, f"must be 1 to {_MAX_NAME} characters long")
    if not value.isprintable():
        raise InvalidInput(field, "must not hold control characters")
    return value


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


# --- rate limits -----------------------------------------------------------------------


async def hit(
    engine: Engine,
    tenant: str,
    settings: Settings,
    key: str,
    limit: int,
    window: float,
    cost: int,
    now: float,
) -> RateLimitResult:
    """Count a hit of weight ``cost`` on ``key``: at most ``limit`` per ``window`` s."""
    check_name(key, "key")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput("limit", "must be a positive integer")
    if limit > settings.max_rate_limit:
        raise InvalidInput("limit", f"must be at most {settings.max_rate_limit} (max_rate_limit)")
    if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
        raise InvalidInput("window", "must be a positive number of seconds")
    if window > 366 * 86_400:
        raise InvalidInput("window", "must be at most a year")
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= limit:
        raise InvalidInput("cost", f"must be an integer from 1 to the limit ({limit})")
    allowed, count, retry_after, reset_after = await engine.rate_hit(
        tenant, RATE + key, limit, float(window), cost, now
    )
    return RateLimitResult(
        key=key,
        allowed=allowed,
        limit=limit,
        remaining=max(limit - count, 0),
        retry_after=retry_after,
        reset_after=reset_after,
    )


# --- failed logins ---------------------------------------------------------------------


def _whos(ip: str | None, account: str | None) -> list[str]:
    whos = []
    if ip is not None:
        whos.append("ip:" + check_name(ip, "ip"))
    if account is not None:
        whos.append("account:" + check_name(account, "account"))
    if not whos:
        raise InvalidInput("ip", "give a client ip, an account, or both")
    return whos


def _status(who: str, value: str | None, settings: Settings, now: float) -> LoginStatus:
    record = rules.login_record(value)
    locked_until = record["locked_until"]
    locked = locked_until is not None and locked_until > now
    window = settings.login_window
    return LoginStatus(
        who=who,
        failures=record["failures"],
        recent_failures=sum(1 for t in record["recent"] if t > now - window),
        locked=locked,
        retry_after=locked_until - now if locked else 0.0,
        lockouts=record["lockouts"],
        last_failure=_utc(record["last_failure"]),
    )


def _worst(statuses: list[LoginStatus]) -> LoginStatus:
    return max(statuses, key=lambda s: (s.locked, s.retry_after, s.recent_failures))


async def login_failed(
    engine: Engine,
    tenant: str,
    settings: Settings,
    ip: str | None,
    account: str | None,
    now: float,
) -> LoginStatus:
    """Record a failed login of the client ``ip`` and of ``account``; the worse status."""
    statuses = []
    for who in _whos(ip, account):

        def update(value: str | None, who: str = who) -> tuple[str, float, LoginStatus]:
            record = rules.login_failure(
                value,
                now,
                settings.login_max_failures,
                settings.login_window,
                settings.login_lockout,
                settings.login_progressive,
                settings.login_max_lockout,
            )
            text = _dumps(record)
            expires_at = rules.login_expiry(
                record, settings.login_window, settings.login_max_lockout
            )
            return text, expires_at, _status(who, text, settings, now)

        statuses.append(await engine.update_guard(tenant, LOGIN + who, update, now))
    return _worst(statuses)


async def login_succeeded(
    engine: Engine, tenant: str, ip: str | None, account: str | None, now: float
) -> None:
    """A successful login clears the failures of its client ip and its account."""
    await unlock(engine, tenant, ip, account, now)


async def login_status(
    engine: Engine,
    tenant: str,
    settings: Settings,
    ip: str | None,
    account: str | None,
    now: float,
) -> LoginStatus:
    """The worse status of the client ``ip`` and ``account``; a lockout shows as locked."""
    statuses = [
        _status(who, await engine.get_guard(tenant, LOGIN + who, now), settings, now)
        for who in _whos(ip, account)
    ]
    return _worst(statuses)


async def unlock(
    engine: Engine, tenant: str, ip: str | None, account: str | None, now: float
) -> int:
    """Forget the failures and lockouts of ``ip`` and ``account``; how many were kept."""
    removed = 0
    for who in _whos(ip, account):

        def drop(value: str | None) -> tuple[None, None, bool]:
            return None, None, value is not None

        removed += await engine.update_guard(tenant, LOGIN + who, drop, now)
    return removed


async def list_logins(
    engine: Engine, tenant: str, settings: Settings, locked_only: bool, now: float
) -> list[LoginStatus]:
    """Every client and account with failures on record, most recently failing first."""
    statuses = [
        _status(g.key.removeprefix(LOGIN), g.value, settings, now)
        for g in await engine.list_guards(tenant, LOGIN, now)
    ]
    if locked_only:
        statuses = [s for s in statuses if s.locked]
    statuses.sort(key=lambda s: (s.last_failure is None, -(s.last_failure or _EPOCH).timestamp()))
    return statuses


_EPOCH = datetime.fromtimestamp(0, UTC)


# --- budgets ---------------------------------------------------------------------------


def _scope(owner: str | None, session_id: str | None) -> str:
    if session_id is not None:
        return "session:" + session_id
    if owner is None:
        raise InvalidInput("owner", "give an owner or a session id")
    return "owner:" + owner


def _limits(
    scope: str, record: dict[str, Any], settings: Settings
) -> tuple[int | None, float | None, str]:
    own = record.get("limits") or {}
    if scope.startswith("session:"):
        tokens, cost = settings.session_token_budget, settings.session_cost_budget
    else:
        tokens, cost = settings.owner_token_budget, settings.owner_cost_budget
    return (
        own.get("tokens", tokens),
        own.get("cost", cost),
        own.get("period", settings.budget_period),
    )


def _usage(scope: str, record: dict[str, Any], settings: Settings, now: float) -> BudgetUsage:
    token_limit, cost_limit, period = _limits(scope, record, settings)
    start, end = rules.period_bounds(period, now)
    return BudgetUsage(
        scope=scope,
        period=period,
        period_start=_utc(start),
        resets_at=_utc(end),
        input_tokens=record["input_tokens"],
        output_tokens=record["output_tokens"],
        cost=record["cost"],
        token_limit=token_limit,
        cost_limit=cost_limit,
    )


def _budget_expiry(record: dict[str, Any], period: str, now: float) -> float | None:
    """Usage is kept until its period ends; a budget with limits of its own, forever."""
    if record["limits"]:
        return None
    return rules.period_bounds(period, now)[1]


#: A reservation made before an append: the budget key, the period it counted in, and
#: the tokens and cost it added, to take back if the append fails.
Reservation = tuple[str, float | None, int, int, float]


async def reserve(
    engine: Engine,
    tenant: str,
    settings: Settings,
    owner: str | None,
    session_id: str,
    drafts: list[MessageDraft],
    now: float,
) -> list[Reservation]:
    """Count the drafts' tokens and cost against the owner's and the session's budgets,
    atomically per budget. Raises BudgetExceeded (with every reservation taken back) when
    one would be exceeded; returns the reservations for ``refund``."""
    tokens_in = sum(d.input_tokens for d in drafts)
    tokens_out = sum(d.output_tokens for d in drafts)
    cost = sum(d.cost for d in drafts)
    scopes = [_scope(None, session_id)]
    if owner is not None:
        scopes.insert(0, _scope(owner, None))
    taken: list[Reservation] = []
    for scope in scopes:

        def update(
            value: str | None, scope: str = scope
        ) -> tuple[str | None, float | None, tuple[Any, ...]]:
            record = rules.budget_record(value, settings.budget_period, now)
            token_limit, cost_limit, period = _limits(scope, record, settings)
            excess = rules.budget_excess(
                record, token_limit, cost_limit, tokens_in, tokens_out, cost
            )
            if excess is not None:  # write back what was there: nothing changes
                end = rules.period_bounds(period, now)[1]
                return value, _budget_expiry(record, period, now), (*excess, end)
            record["input_tokens"] += tokens_in
            record["output_tokens"] += tokens_out
            record["cost"] += cost
            return _dumps(record), _budget_expiry(record, period, now), (record["start"],)

        outcome = await engine.update_guard(tenant, BUDGET + scope, update, now)
        if len(outcome) > 1:
            await refund(engine, tenant, settings, taken, now)
            what, used, wanted, limit, resets_at = outcome
            raise BudgetExceeded(scope, what, used, wanted, limit, resets_at)
        taken.append((BUDGET + scope, outcome[0], tokens_in, tokens_out, cost))
    return taken


async def refund(
    engine: Engine, tenant: str, settings: Settings, taken: list[Reservation], now: float
) -> None:
    """Take back reservations whose append did not happen (if their period still runs)."""
    for key, start, tokens_in, tokens_out, cost in taken:

        def update(
            value: str | None,
            key: str = key,
            start: float | None = start,
            tokens_in: int = tokens_in,
            tokens_out: int = tokens_out,
            cost: float = cost,
        ) -> tuple[str | None, float | None, None]:
            if value is None:
                return None, None, None
            record = rules.budget_record(value, settings.budget_period, now)
            if record["start"] == start:
                record["input_tokens"] = max(record["input_tokens"] - tokens_in, 0)
                record["output_tokens"] = max(record["output_tokens"] - tokens_out, 0)
                record["cost"] = max(record["cost"] - cost, 0.0)
            _, _, period = _limits(key.removeprefix(BUDGET), record, settings)
            return _dumps(record), _budget_expiry(record, period, now), None

        await engine.update_guard(tenant, key, update, now)


async def set_budget(
    engine: Engine,
    tenant: str,
    settings: Settings,
    owner: str | None,
    session_id: str | None,
    limits: dict[str, Any],
    now: float,
) -> BudgetUsage:
    """Give one owner or session limits of its own (``tokens``, ``cost``, ``period``);
    an empty ``limits`` goes back to the settings' defaults."""
    scope = _scope(owner, session_id)

    def update(value: str | None) -> tuple[str, float | None, BudgetUsage]:
        record = rules.budget_record(value, settings.budget_period, now)
        record["limits"] = limits
        # a new period of its own restarts the count from that period's start
        record = rules.budget_record(_dumps(record), settings.budget_period, now)
        _, _, period = _limits(scope, record, settings)
        usage = _usage(scope, record, settings, now)
        return _dumps(record), _budget_expiry(record, period, now), usage

    usage: BudgetUsage = await engine.update_guard(tenant, BUDGET + scope, update, now)
    return usage


async def budget_usage(
    engine: Engine,
    tenant: str,
    settings: Settings,
    owner: str | None,
    session_id: str | None,
    now: float,
) -> BudgetUsage:
    """What an owner or a session used in the current period, and its limits."""
    scope = _scope(owner, session_id)
    value = await engine.get_guard(tenant, BUDGET + scope, now)
    return _usage(scope, rules.budget_record(value, settings.budget_period, now), settings, now)
