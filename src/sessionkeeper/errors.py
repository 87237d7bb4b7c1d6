"""The errors sessionkeeper raises: one small tree with one root.

    SessionKeeperError
    ├── NotFound             no such session, message or folder (or it has expired)
    ├── AlreadyExists        the id or the folder name is taken
    ├── VersionConflict      expected_version is stale; nothing was changed
    ├── InvalidInput         bad input, naming the field and the reason; nothing was changed
    ├── RateLimited          a rate limit refused the call; ``retry_after`` seconds to wait
    ├── LockedOut            too many failed logins from this client or for this account
    ├── BudgetExceeded       an append would take an owner or a session past its budget
    └── BackendUnavailable   the storage engine failed or cannot be reached

Driver errors are wrapped in BackendUnavailable (``raise ... from exc``), never swallowed.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = [
    "AlreadyExists",
    "BackendUnavailable",
    "BudgetExceeded",
    "InvalidInput",
    "LockedOut",
    "NotFound",
    "RateLimited",
    "SessionKeeperError",
    "VersionConflict",
]


class SessionKeeperError(Exception):
    """Root of every error sessionkeeper raises on purpose."""


class NotFound(SessionKeeperError):
    """The session, folder or message does not exist in this tenant, or has expired."""


class AlreadyExists(SessionKeeperError):
    """A session with this id, or a folder with this name for this owner, already exists."""


class VersionConflict(SessionKeeperError):
    """The change carried a stale ``expected_version``; nothing was changed."""

    def __init__(self, session_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"session {session_id!r} is at version {actual}, not the expected {expected}"
        )
        self.session_id = session_id
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[VersionConflict], tuple[str, int, int]]:
        return (VersionConflict, (self.session_id, self.expected, self.actual))


class InvalidInput(SessionKeeperError, ValueError):
    """Input was rejected before anything was written; ``field`` names what was wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidInput], tuple[str, str]]:
        return (InvalidInput, (self.field, self.reason))


class RateLimited(SessionKeeperError):
    """A rate limit refused the call; nothing was written. Retry after ``retry_after`` s."""

    def __init__(self, key: str, limit: int, window: float, retry_after: float) -> None:
        super().__init__(
            f"rate limit {key!r} allows {limit} per {window:g} s; retry after {retry_after:.3f} s"
        )
        self.key = key
        self.limit = limit
        self.window = window
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[RateLimited], tuple[str, int, float, float]]:
        return (RateLimited, (self.key, self.limit, self.window, self.retry_after))


class LockedOut(SessionKeeperError):
    """Too many failed logins: ``who`` (``ip:...`` or ``account:...``) is locked for
    ``retry_after`` more seconds."""

    def __init__(self, who: str, retry_after: float) -> None:
        super().__init__(
            f"{who} is locked out after failed logins; retry after {retry_after:.0f} s"
        )
        self.who = who
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[LockedOut], tuple[str, float]]:
        return (LockedOut, (self.who, self.retry_after))


class BudgetExceeded(SessionKeeperError):
    """An append would take ``scope`` (``owner:...`` or ``session:...``) past its token or
    cost budget for the current period; nothing was written. ``usage`` and ``limits`` say
    where it stands."""

    def __init__(
        self,
        scope: str,
        what: str,
        used: float,
        wanted: float,
        limit: float,
        resets_at: float | None,
    ) -> None:
        reset = ""
        if resets_at is not None:
            reset = f"; it resets at {datetime.fromtimestamp(resets_at, UTC).isoformat()}"
        super().__init__(
            f"{scope}: {what} used {used:g} of {limit:g} this period; "
            f"{wanted:g} more would exceed the budget{reset}"
        )
        self.scope = scope
        self.what = what
        self.used = used
        self.wanted = wanted
        self.limit = limit
        self.resets_at = resets_at

    def __reduce__(
        self,
    ) -> tuple[type[BudgetExceeded], tuple[str, str, float, float, float, float | None]]:
        args = (self.scope, self.what, self.used, self.wanted, self.limit, self.resets_at)
        return (BudgetExceeded, args)


class BackendUnavailable(SessionKeeperError):
    """The storage engine failed, is closed, or cannot be reached."""
