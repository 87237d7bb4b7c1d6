"""Check, repair and doctor over a store: the engine's findings as reports for people and scripts.

The engine finds and fixes damage in its own storage (``Engine.check``) and reads its own
settings (``Engine.doctor``); this module scopes a run to a tenant or to all of them, tells
what is left to fix, and gives a plain verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .models import REPORT_ONLY_KINDS, CheckCount, DoctorReport
from .store import SessionStore

__all__ = ["CheckResult", "DoctorResult", "check", "doctor"]


@dataclass(slots=True)
class CheckResult:
    """What a check found and repaired, by kind of damage.

    ``seq_gaps`` are no damage (pop leaves them); ``quarantined_file`` needs a person.
    ``ok`` means nothing is left to fix: no damage found, or all of it repaired.
    """

    engine: str
    tenant: str | None  # None: every tenant
    repair: bool
    counts: list[CheckCount] = field(default_factory=list)

    @property
    def left(self) -> int:
        """Damage found and not repaired (gaps are not damage)."""
        return sum(c.found - c.repaired for c in self.counts if c.kind != "seq_gaps")

    @property
    def ok(self) -> bool:
        return self.left == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "tenant": self.tenant,
            "repair": self.repair,
            "ok": self.ok,
            "left": self.left,
            "counts": {
                c.kind: {
                    "found": c.found,
                    "repaired": c.repaired,
                    "repairable": c.kind not in REPORT_ONLY_KINDS,
                    "samples": c.samples,
                }
                for c in self.counts
            },
        }


@dataclass(slots=True)
class DoctorResult:
    """The engine's health figures and a verdict: ``ok``, or ``warnings`` that each say
    what to change."""

    report: DoctorReport

    @property
    def verdict(self) -> str:
        return "warnings" if self.report.warnings else "ok"

    @property
    def ok(self) -> bool:
        return not self.report.warnings

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, **asdict(self.report)}


async def check(
    store: SessionStore, *, repair: bool = False, all_tenants: bool = False
) -> CheckResult:
    """Find (and with ``repair`` fix) damage in the store's tenant, or in every tenant.

    Messages that belong to no session carry no tenant on the SQL engines, so only a check
    of every tenant finds them there. Repairs never delete what a session holds: they
    recompute aggregates, take sessions out of folders that are gone and drop index entries
    and messages of sessions that are gone; quarantined files are only listed.
    """
    tenant = None if all_tenants else store.tenant
    report = await store.engine.check(tenant, store.clock.now(), repair)
    return CheckResult(store.engine.name, tenant, repair, list(report.counts.values()))


async def doctor(store: SessionStore) -> DoctorResult:
    """The engine's versions, settings, sizes, counts, missing indexes and a verdict."""
    return DoctorResult(await store.engine.doctor(store.clock.now()))
