"""The errors sessionkeeper raises: one small tree with one root.

    SessionKeeperError
    ├── NotFound             no such session, message or folder (or it has expired)
    ├── AlreadyExists        the id or the folder name is taken
    ├── VersionConflict      expected_version is stale; nothing was changed
    ├── InvalidInput         bad input, naming the field and the reason; nothing was changed
    └── BackendUnavailable   the storage engine failed or cannot be reached

Driver errors are wrapped in BackendUnavailable (``raise ... from exc``), never swallowed.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "BackendUnavailable",
    "InvalidInput",
    "NotFound",
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


class BackendUnavailable(SessionKeeperError):
    """The storage engine failed, is closed, or cannot be reached."""
