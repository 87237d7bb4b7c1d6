"""sessionkeeper: durable, concurrent session storage for chat apps and AI agents."""

from .clock import Clock, FrozenClock, SystemClock
from .errors import (
    AlreadyExists,
    BackendUnavailable,
    InvalidInput,
    NotFound,
    SessionKeeperError,
    VersionConflict,
)
from .models import (
    UNSET,
    ChangeResult,
    Folder,
    Message,
    MessageIn,
    OwnerCount,
    Page,
    Session,
    SessionSummary,
    Stats,
    Status,
)
from .settings import Settings
from .store import SessionStore, open_store
from .sync import SyncSessionStore, open_store_sync

__all__ = [
    "UNSET",
    "AlreadyExists",
    "BackendUnavailable",
    "ChangeResult",
    "Clock",
    "Folder",
    "FrozenClock",
    "InvalidInput",
    "Message",
    "MessageIn",
    "NotFound",
    "OwnerCount",
    "Page",
    "Session",
    "SessionKeeperError",
    "SessionStore",
    "SessionSummary",
    "Settings",
    "Stats",
    "Status",
    "SyncSessionStore",
    "SystemClock",
    "VersionConflict",
    "open_store",
    "open_store_sync",
]

__version__ = "0.1.0"
