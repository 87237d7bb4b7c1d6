"""Admin-only operations over HTTP: check and repair, doctor, and the lifecycle policies
(archive, restore, purge by age), answering the reports the CLI's ``--json`` prints.

Each runs to completion inside its request, a listing page at a time (``batch_size``, at
most ``max_page_size``). Bodies are strict JSON: an unknown field, a value of the wrong
JSON type or a bad duration is a 422 naming the field, and then nothing has changed.

Archive and restore act within this store only. Moving sessions to another store (the
CLI's ``archive --to URL`` and ``restore --from URL``) is not offered here on purpose: a URL
sent by a client would make the server open files, databases and hosts of the client's
choosing (any path it may write, any address it can reach) with the server's rights.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ... import checks, maintenance
from ..auth import AdminStore
from ..http import AUTH, BODY, errors, require_media_type
from ..limits import JSONRoute
from ..problems import ProblemError

__all__ = [
    "ArchiveIn",
    "ArchiveOut",
    "CheckOut",
    "DoctorOut",
    "PurgeIn",
    "PurgeOut",
    "RestoreIn",
    "RestoreOut",
    "router",
]

router = APIRouter(prefix="/v1/admin", route_class=JSONRoute, tags=["operations"])

_JSON = require_media_type("application/json")
_ALL_TENANTS = "Every tenant, not only the key's (or `?tenant=`)"
_DURATION = "How long without activity (`updated_at`): a whole number and a unit, s, m, h, d or w"
_DRY_RUN = "Count and sample what would change; change nothing"
_BATCH = "Sessions listed per page (default purge_batch_size; at most max_page_size)"


async def _no_body(request: Request) -> None:
    """Refuse a body where options are query parameters, rather than ignore it."""
    if await request.body():
        raise ProblemError(
            422, "body: send no body; repair and all_tenants are query parameters", field="body"
        )


# --- bodies ------------------------------------------------------------------------------


class _In(BaseModel):
    # strict: "false" or 0 is not a boolean here, so a typo never turns a dry run real
    model_config = ConfigDict(extra="forbid", strict=True)


class ArchiveIn(_In):
    older_than: str = Field(description=_DURATION, max_length=32, examples=["90d"])
    dry_run: bool = Field(False, description=_DRY_RUN)
    all_tenants: bool = Field(False, description=_ALL_TENANTS)
    batch_size: int | None = Field(None, ge=1, description=_BATCH)


class RestoreIn(_In):
    session_id: str = Field(description="The archived session", min_length=1, max_length=128)
    dry_run: bool = Field(False, description=_DRY_RUN)


class PurgeIn(_In):
    expired: bool = Field(False, description="Sessions whose TTL ran out")
    older_than: str | None = Field(
        None, description=f"{_DURATION}; any status", max_length=32, examples=["365d"]
    )
    dry_run: bool = Field(
        False, description=f"{_DRY_RUN} (expired sessions are not counted in a dry run)"
    )
    all_tenants: bool = Field(False, description=_ALL_TENANTS)
    batch_size: int | None = Field(None, ge=1, description=_BATCH)


# --- reports: the fields of each report's to_dict(), as the CLI prints them ----------------


class CheckCountOut(BaseModel):
    found: int
    repaired: int
    repairable: bool = Field(description="False: only reported (seq gaps, quarantined files)")
    samples: list[str] = Field(description="The first few subjects found")


class CheckOut(BaseModel):
    engine: str
    tenant: str | None = Field(description="The tenant checked; null: every tenant")
    repair: bool
    ok: bool = Field(description="Nothing is left to fix")
    left: int = Field(description="Damage found and not repaired (seq gaps are no damage)")
    counts: dict[str, CheckCountOut] = Field(description="By kind of damage")


class DoctorOut(BaseModel):
    verdict: Literal["ok", "warnings"]
    engine: str
    server_version: str
    schema_version: int | None
    settings: dict[str, str] = Field(description="The engine settings that matter for durability")
    sizes: dict[str, int] = Field(description="Bytes")
    counts: dict[str, int]
    missing_indexes: list[str]
    warnings: list[str] = Field(description="Each says what to change")


class ArchiveOut(BaseModel):
    dry_run: bool
    moved: bool = Field(description="Moved to another store (never over HTTP)")
    older_than: float = Field(description="Seconds")
    cutoff: str = Field(description="Sessions last active before this time (ISO 8601, UTC)")
    tenants: int
    archived: int
    messages: int
    skipped: int = Field(description="Changed, deleted or expired after they were listed")
    failed: int
    errors: list[str]
    sample: list[str] = Field(description="The first few sessions, as tenant/id")
    seconds: float
    ok: bool = Field(description="None failed")


class RestoreOut(BaseModel):
    tenant: str
    session_id: str
    dry_run: bool
    moved: bool
    reactivated: bool = Field(description="Its status was archived and is (or would be) active")
    messages: int
    status: str = Field(description="Its status after the restore")


class PurgeOut(BaseModel):
    dry_run: bool
    expired: int | None = Field(description="Expired sessions purged; null if not asked or dry")
    older_than: float | None = Field(description="Seconds")
    cutoff: str | None
    old: int = Field(description="Sessions purged (or that would be) for their age")
    skipped: int
    failed: int
    errors: list[str]
    sample: list[str]
    seconds: float
    purged: int = Field(description="expired + old")
    ok: bool


# --- routes ------------------------------------------------------------------------------


@router.post(
    "/check",
    response_model=CheckOut,
    dependencies=[Depends(_no_body)],
    responses=errors(*AUTH),
    summary="Find damage in the storage and, with repair, fix it (admin keys)",
)
async def check(
    store: AdminStore,
    repair: Annotated[bool, Query(description="Fix what can be fixed")] = False,
    all_tenants: Annotated[bool, Query(description=_ALL_TENANTS)] = False,
) -> CheckOut:
    """Aggregates that disagree with the messages, messages of no session, sessions in a
    folder that is gone, index entries of no session and quarantined files; seq gaps are
    listed, never renumbered. A repair never deletes what a session holds. Messages of no
    session are found on the SQL engines only by a check of every tenant."""
    result = await checks.check(store, repair=repair, all_tenants=all_tenants)
    return CheckOut.model_validate(result.to_dict())


@router.get(
    "/doctor",
    response_model=DoctorOut,
    responses=errors(*AUTH),
    summary="The engine's versions, durability settings, sizes and counts, and a verdict",
)
async def doctor(store: AdminStore) -> DoctorOut:
    """``verdict`` is ``ok``, or ``warnings`` when ``warnings`` says what to change."""
    return DoctorOut.model_validate((await checks.doctor(store)).to_dict())


@router.post(
    "/archive",
    response_model=ArchiveOut,
    dependencies=[_JSON],
    responses=errors(*AUTH, *BODY),
    summary="Archive the sessions with no activity for older_than (admin keys)",
)
async def archive(store: AdminStore, body: ArchiveIn) -> ArchiveOut:
    """Sets the status of active and completed sessions last changed before the cutoff to
    ``archived`` (a change: new version). Safe to repeat. Moving them to another store
    (``archive --to URL``) is CLI-only: a store URL from a client would have the server
    open paths and hosts of the client's choosing."""
    seconds = maintenance.parse_duration(body.older_than, "older_than")
    report = await maintenance.archive(
        store,
        older_than=seconds,
        dry_run=body.dry_run,
        all_tenants=body.all_tenants,
        batch_size=body.batch_size,
    )
    return ArchiveOut.model_validate(report.to_dict())


@router.post(
    "/restore",
    response_model=RestoreOut,
    dependencies=[_JSON],
    responses=errors(*AUTH, *BODY, 404, 409),
    summary="Bring an archived session back, active (admin keys)",
)
async def restore(store: AdminStore, body: RestoreIn) -> RestoreOut:
    """Sets an archived session of the tenant to ``active``; one that is not archived is
    left as it is. Restoring from another store (``restore --from URL``) is CLI-only, as
    is archiving to one."""
    report = await maintenance.restore(store, body.session_id, dry_run=body.dry_run)
    return RestoreOut.model_validate(report.to_dict())


@router.post(
    "/purge-sessions",
    response_model=PurgeOut,
    dependencies=[_JSON],
    responses=errors(*AUTH, *BODY),
    summary="Delete expired sessions and those with no activity for older_than (admin keys)",
)
async def purge_sessions(store: AdminStore, body: PurgeIn) -> PurgeOut:
    """Give ``expired``, ``older_than`` or both (422 otherwise); ``older_than`` takes
    sessions of any status, with their messages. The lifecycle report of ``sessionkeeper
    purge --json``; ``POST /v1/admin/purge`` stays the plain purge of expired sessions."""
    seconds = (
        None
        if body.older_than is None
        else maintenance.parse_duration(body.older_than, "older_than")
    )
    report = await maintenance.purge(
        store,
        expired=body.expired,
        older_than=seconds,
        dry_run=body.dry_run,
        all_tenants=body.all_tenants,
        batch_size=body.batch_size,
    )
    return PurgeOut.model_validate(report.to_dict())
