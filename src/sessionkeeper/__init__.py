"""sessionkeeper: durable, concurrent session storage for chat apps and AI agents."""

from .analytics import Analytics, OwnerPeriod, SeriesPoint
from .clock import Clock, FrozenClock, SystemClock
from .errors import (
    AlreadyExists,
    BackendUnavailable,
    BudgetExceeded,
    InvalidInput,
    LockedOut,
    NotFound,
    RateLimited,
    SessionKeeperError,
    VersionConflict,
)
from .models import (
    UNSET,
    BudgetUsage,
    ChangeResult,
    Folder,
    LoginStatus,
    Message,
    MessageIn,
    OwnerCost,
    OwnerCount,
    Page,
    RateLimitResult,
    Session,
    SessionSummary,
    Stats,
    Status,
)
from .settings import Settings
from .store import Hook, HookEvent, SessionEvent, SessionStore, open_store
from .sync import SyncSessionStore, open_store_sync

__all__ = [
    "UNSET",
    "AlreadyExists",
    "Analytics",
    "BackendUnavailable",
    "BudgetExceeded",
    "BudgetUsage",
    "ChangeResult",
    "Clock",
    "Folder",
    "FrozenClock",
    "Hook",
    "HookEvent",
    "InvalidInput",
    "LockedOut",
    "LoginStatus",
    "Message",
    "MessageIn",
    "NotFound",
    "OwnerCost",
    "OwnerCount",
    "OwnerPeriod",
    "Page",
    "RateLimitResult",
    "RateLimited",
    "SeriesPoint",
    "Session",
    "SessionEvent",
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
