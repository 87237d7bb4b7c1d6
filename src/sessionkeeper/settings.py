"""The one settings object, read from arguments or SESSIONKEEPER_* environment variables."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_URL", "WEBHOOK_EVENTS", "Settings"]

DEFAULT_URL = "sqlite:///sessionkeeper.db"
#: The change-hook events a webhook can be sent for (the store's HOOK_EVENTS).
WEBHOOK_EVENTS = ("created", "completed", "expired", "deleted")


class Settings(BaseSettings):
    """Every knob sessionkeeper has; each is also ``SESSIONKEEPER_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SESSIONKEEPER_", extra="forbid", frozen=True)

    url: str = Field(
        DEFAULT_URL,
        description="Store URL: memory://, sqlite:///path.db, postgresql://..., redis://...",
    )
    tenant: str = Field("default", description="Tenant used when none is given")

    max_state_bytes: int = Field(1_048_576, gt=0, description="Largest state, as UTF-8 JSON")
    max_message_bytes: int = Field(
        262_144, gt=0, description="Largest message (content and metadata), as UTF-8 JSON"
    )
    max_metadata_bytes: int = Field(65_536, gt=0, description="Largest session metadata")
    max_depth: int = Field(32, gt=0, le=200, description="Deepest nesting of any JSON value")
    max_messages_per_append: int = Field(1000, gt=0, description="Most messages in one call")
    max_title_length: int = Field(500, gt=0, description="Longest title, in characters")
    max_page_size: int = Field(1000, gt=0, description="Largest page a listing or read returns")

    default_ttl: float | None = Field(
        None, gt=0, description="Absolute lifetime in seconds of new sessions (None: forever)"
    )
    default_idle_ttl: float | None = Field(
        None, gt=0, description="Idle lifetime in seconds of new sessions (None: no idle expiry)"
    )
    max_ttl: float | None = Field(
        None, gt=0, description="Cap in seconds on any session's lifetime (None: no cap)"
    )
    purge_batch_size: int = Field(500, gt=0, description="Sessions removed per purge batch")

    # --- lifecycle: the sweeper and limits per owner ---

    sweep_interval: float | None = Field(
        60.0,
        ge=0,
        description="Seconds between two passes of the background sweeper the HTTP service "
        "runs (purge expired sessions, apply max_session_age); 0 or None: no sweeper",
    )
    max_sessions_per_owner: int | None = Field(
        None,
        gt=0,
        description="Most live sessions one owner may have; creating one more raises "
        "InvalidInput naming owner (None: no limit)",
    )
    max_session_age: float | None = Field(
        None,
        gt=0,
        description="Seconds after its creation when the sweeper archives a session (or "
        "purges it, see max_session_age_action) (None: no limit)",
    )
    max_session_age_action: Literal["archive", "purge"] = Field(
        "archive",
        description="What the sweeper does with a session older than max_session_age: "
        "archive (status archived, kept) or purge (deleted, firing the expired hook)",
    )

    # --- analytics: daily figures ---

    analytics: bool = Field(
        True,
        description="Count sessions created and completed, messages, tokens and cost per "
        "day and owner as the store writes (store.analytics reads them)",
    )
    analytics_flush_interval: float = Field(
        1.0,
        ge=0,
        description="Seconds a store keeps its counted figures in memory before adding "
        "them to the engine (also at close and before reading figures); 0: at close and "
        "before reading only",
    )

    sqlite_busy_timeout: float = Field(
        30.0, gt=0, description="Seconds a SQLite writer waits for another process's lock"
    )
    sqlite_readers: int = Field(2, gt=0, le=64, description="SQLite reader threads")
    sqlite_synchronous: str = Field(
        "normal",
        pattern="^(normal|full)$",
        description="SQLite synchronous mode: normal (WAL default) or full (fsync every commit)",
    )

    server_timeout: float = Field(
        2.0,
        gt=0,
        description="Seconds before a PostgreSQL or Redis call that gets no answer fails "
        "with BackendUnavailable",
    )
    pool_size: int = Field(
        10, gt=0, le=1000, description="Most connections a PostgreSQL or Redis store opens"
    )

    # --- guards: rate limits, failed logins, budgets ---

    session_message_limit: int | None = Field(
        None, gt=0, description="Messages one session may receive per window (None: no limit)"
    )
    session_message_window: float = Field(
        60.0, gt=0, description="Seconds of the per-session message rate window"
    )
    max_rate_limit: int = Field(
        10_000,
        gt=0,
        description="Largest limit a rate limit may have (its log holds one time per hit)",
    )
    login_max_failures: int = Field(
        5, gt=0, description="Failed logins within the window that lock an IP or an account"
    )
    login_window: float = Field(900.0, gt=0, description="Seconds in which failures are counted")
    login_lockout: float = Field(900.0, gt=0, description="Seconds of the first lockout")
    login_progressive: bool = Field(
        True, description="Double the lockout for each earlier lockout (up to login_max_lockout)"
    )
    login_max_lockout: float = Field(
        86_400.0,
        gt=0,
        description="Longest lockout; also the quiet time after which one is forgotten",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Proxies (addresses or networks) whose X-Forwarded-For names the client",
    )
    budgets: bool = Field(
        False,
        description="Check owner and session budgets on every append (on by itself when a "
        "budget below is set)",
    )
    budget_period: str = Field(
        "monthly",
        pattern="^(none|daily|weekly|monthly)$",
        description="Budget period: none, daily, weekly or monthly (UTC)",
    )
    owner_token_budget: int | None = Field(
        None, gt=0, description="Input plus output tokens an owner may use per period"
    )
    owner_cost_budget: float | None = Field(
        None, gt=0, description="Cost an owner may use per period"
    )
    session_token_budget: int | None = Field(
        None, gt=0, description="Input plus output tokens one session may use per period"
    )
    session_cost_budget: float | None = Field(
        None, gt=0, description="Cost one session may use per period"
    )

    # --- the HTTP service ---

    http_max_body_bytes: int = Field(
        4_194_304, gt=0, description="Largest request body the HTTP service reads, in bytes"
    )
    http_rate_limit: int | None = Field(
        None, gt=0, description="Requests one API key may make per minute (None: no limit)"
    )
    http_require_if_match: bool = Field(
        False, description="Writes to an existing session must send If-Match (else 428)"
    )
    http_auth_cache_seconds: float = Field(
        1.0,
        ge=0,
        description="How long a server trusts a key check or a client's lockout status it "
        "read (0: read both on every request)",
    )
    http_access_log: bool = Field(
        True, description="Log one JSON line per request on stderr (never keys or bodies)"
    )

    # --- the HTTP service's webhooks ---

    webhook_url: str | None = Field(
        None,
        description="http(s) URL the HTTP service POSTs change events to, signed with "
        "webhook_secret (None: no webhooks)",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        validate_default=True,
        description="Key of the HMAC-SHA256 signature of each webhook (required with webhook_url)",
    )
    webhook_events: list[str] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        description="Events sent: any of created, completed, expired, deleted (default: all)",
    )
    webhook_timeout: float = Field(
        10.0, gt=0, le=300, description="Seconds a webhook POST may take before it counts as failed"
    )
    webhook_max_attempts: int = Field(
        8, gt=0, le=100, description="Attempts at one webhook delivery before it is failed"
    )
    webhook_backoff: float = Field(
        30.0,
        gt=0,
        description="Seconds before the second attempt; doubled for each later one, with "
        "jitter, up to an hour",
    )
    webhook_log_days: float = Field(
        7.0,
        gt=0,
        description="Days the webhook delivery log keeps a delivery after its last change",
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, not {value!r}")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        if value is None and info.data.get("webhook_url") is not None:
            raise ValueError("is required with webhook_url: the key receivers verify with")
        return value

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, value: list[str]) -> list[str]:
        for event in value:
            if event not in WEBHOOK_EVENTS:
                raise ValueError(f"must name only {', '.join(WEBHOOK_EVENTS)}, not {event!r}")
        return list(dict.fromkeys(value))

    @property
    def budgets_enforced(self) -> bool:
        """Whether appends check budgets: asked for, or some budget is set."""
        limits = (
            self.owner_token_budget,
            self.owner_cost_budget,
            self.session_token_budget,
            self.session_cost_budget,
        )
        return self.budgets or any(limit is not None for limit in limits)
