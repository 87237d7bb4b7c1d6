"""The `sessionkeeper` command line: thin commands over the sync store, shown by rich or as JSON.

Every command opens the store named by ``--url`` (or ``SESSIONKEEPER_URL``) for ``--tenant``
(or ``SESSIONKEEPER_TENANT``), makes one call to the sync twin and prints the result: rich
tables by default, or with ``--json`` only JSON on stdout (the models' ``model_dump``).

Errors print one line, ``error: <what went wrong>``, on stderr, and exit with

- 2 for bad input: ``InvalidInput`` from the store, JSON options that do not parse, bad
  ``SESSIONKEEPER_*`` settings, and usage errors (unknown option, missing argument);
- 1 for every other ``SessionKeeperError``: ``NotFound``, ``AlreadyExists``,
  ``VersionConflict``, ``BackendUnavailable``.

The CLI parses JSON text and nothing more: the store validates every value.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar, cast

import typer
from pydantic import BaseModel, ValidationError
from rich import box
from rich.console import Console, Group, RenderableType
from rich.json import JSON
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as ProgressBar
from rich.table import Table
from rich.text import Text

from . import checks, keys, legacy, maintenance, transfer
from .analytics import Analytics, Grouping
from .errors import InvalidInput, SessionKeeperError
from .models import (
    UNSET,
    BudgetUsage,
    LoginStatus,
    Message,
    Page,
    Session,
    SessionSummary,
    Stats,
    Status,
    Unset,
)
from .settings import DEFAULT_URL, Settings
from .store import OrderBy, open_store
from .sync import SyncSessionStore, open_store_sync
from .transfer import Progress

__all__ = ["EXIT_FAILED", "EXIT_INVALID", "app", "main"]

P = ParamSpec("P")
T = TypeVar("T")

EXIT_FAILED = 1
EXIT_INVALID = 2

app = typer.Typer(
    name="sessionkeeper",
    help="Durable session storage for chat apps and AI agents, from the shell.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


def main() -> None:
    """The ``sessionkeeper`` console script."""
    app()


@dataclass(frozen=True, slots=True)
class _Target:
    """The store the global options name; None means the settings' default."""

    url: str | None
    tenant: str | None


@app.callback()
def _target(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            envvar="SESSIONKEEPER_URL",
            show_default=DEFAULT_URL,
            help="Store URL: sqlite:///path.db, memory:// ...",
        ),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(envvar="SESSIONKEEPER_TENANT", show_default="default", help="Tenant"),
    ] = None,
) -> None:
    ctx.obj = _Target(url, tenant)


@contextmanager
def _store(ctx: typer.Context) -> Iterator[SyncSessionStore]:
    target: _Target = ctx.obj
    with open_store_sync(target.url, tenant=target.tenant) as store:
        yield store


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {' '.join(message.splitlines())}", err=True)
    return typer.Exit(code)


def _command(
    name: str | None = None, group: typer.Typer = app
) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Register a command (in ``group``) whose sessionkeeper errors become one line on
    stderr and an exit code, never a traceback."""

    def register(command: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(command)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                command(*args, **kwargs)
            except InvalidInput as exc:
                raise _fail(str(exc), EXIT_INVALID) from None
            except SessionKeeperError as exc:
                raise _fail(str(exc), EXIT_FAILED) from None
            except ValidationError as exc:  # only Settings() lets one out: a bad env variable
                error = exc.errors()[0]
                setting = "_".join(str(part) for part in error["loc"]).upper()
                raise _fail(f"SESSIONKEEPER_{setting}: {error['msg']}", EXIT_INVALID) from None

        group.command(name)(run)
        return run

    return register


def _parse_json(text: str | None, field: str) -> Any:
    """The JSON value of an option, or None if it was not given; the store checks its shape."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(field, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput(field, "is nested too deeply") from None


# --- output ----------------------------------------------------------------------------


def _emit(value: T, as_json: bool, render: Callable[[T], RenderableType]) -> None:
    """Print ``value`` as JSON only, or as the rich ``render`` of it."""
    if as_json:
        typer.echo(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))
    else:
        # User text is never rich markup or emoji codes; crop=False keeps long cursors whole.
        console = Console(markup=False, emoji=False, highlight=False)
        console.print(render(value), crop=False)


def _jsonable(value: object) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _text(value: object) -> Text:
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, datetime):
        return Text(value.strftime("%Y-%m-%d %H:%M:%SZ"))
    if isinstance(value, float):
        return Text(f"{value:g}")
    if isinstance(value, str):
        return Text(value)
    return Text(json.dumps(value, ensure_ascii=False))


def _table(*columns: str) -> Table:
    """A table whose columns named with a leading ``=`` never wrap (ids, times)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in columns:
        table.add_column(column.lstrip("="), no_wrap=column.startswith("="))
    return table


def _fields(rows: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, value if isinstance(value, JSON | Table) else _text(value))
    return grid


def _session_panel(session: Session) -> Panel:
    s = session
    rows: list[tuple[str, Any]] = [
        ("tenant", s.tenant),
        ("owner", s.owner),
        ("folder", s.folder),
        ("title", s.title),
        ("status", s.status),
        ("step", s.step),
        ("version", s.version),
        ("created", s.created_at),
        ("updated", s.updated_at),
        ("expires", s.expires_at or "never"),
        ("idle ttl", None if s.idle_ttl is None else f"{s.idle_ttl:g} s"),
        ("messages", f"{s.message_count} (last seq {s.last_seq})"),
        ("tokens", f"{s.input_tokens} in, {s.output_tokens} out"),
        ("cost", s.cost),
        ("metadata", JSON.from_data(s.metadata)),
        ("state", JSON.from_data(s.state)),
    ]
    return Panel(_fields(rows), title=Text(f"session {s.id}"), title_align="left")


def _messages_table(messages: list[Message]) -> Table:
    table = _table("=seq", "role", "content", "=tokens in/out", "=cost", "=created")
    for m in messages:
        tokens = f"{m.input_tokens}/{m.output_tokens}"
        table.add_row(*map(_text, (m.seq, m.role, m.content, tokens, m.cost, m.created_at)))
    return table


def _page_view(page: Page[SessionSummary]) -> RenderableType:
    # folder and step fit no terminal next to these; show and --json have them
    table = _table("=id", "owner", "title", "=status", "=msgs", "=updated")
    for s in page.items:
        fields = (s.id, s.owner, s.title, s.status, s.message_count, s.updated_at)
        table.add_row(*map(_text, fields))
    if page.next_cursor is None:
        return table
    return Group(table, Text(f"next cursor: {page.next_cursor}", no_wrap=True, overflow="ignore"))


def _stats_panel(stats: Stats) -> Panel:
    owners = Table("owner", "sessions", box=None, padding=(0, 2, 0, 0))
    for entry in stats.top_owners:
        owners.add_row(_text(entry.owner), _text(entry.sessions))
    costly = Table("owner", "cost", box=None, padding=(0, 2, 0, 0))
    for spent in stats.top_owners_by_cost:
        costly.add_row(_text(spent.owner), f"{spent.cost:g}")
    rows: list[tuple[str, Any]] = [
        ("total", stats.total),
        ("active", stats.active),
        ("completed", stats.completed),
        ("archived", stats.archived),
        (f"updated in last {stats.active_hours:g} h", stats.recently_active),
        ("completion rate", f"{stats.completion_rate:.1%}"),
        ("messages", stats.messages),
        ("tokens", f"{stats.input_tokens} in, {stats.output_tokens} out"),
        ("cost", stats.cost),
        ("top owners", owners if stats.top_owners else None),
        ("top owners by cost", costly if stats.top_owners_by_cost else None),
    ]
    return Panel(_fields(rows), title="stats", title_align="left")


# --- commands --------------------------------------------------------------------------


@_command()
def create(
    ctx: typer.Context,
    session_id: Annotated[
        str | None, typer.Option("--id", show_default="generated", help="Session id")
    ] = None,
    owner: Annotated[str | None, typer.Option(help="User or company id")] = None,
    folder: Annotated[str | None, typer.Option(help="Folder id")] = None,
    title: Annotated[str, typer.Option()] = "",
    status: Annotated[str, typer.Option(help="active, completed or archived")] = "active",
    step: Annotated[str | None, typer.Option(help="The app's current step")] = None,
    state: Annotated[str | None, typer.Option(help="State, a JSON object")] = None,
    metadata: Annotated[str | None, typer.Option(help="Metadata, a JSON object")] = None,
    ttl: Annotated[float | None, typer.Option(metavar="SECONDS", help="Lifetime")] = None,
    idle_ttl: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Idle lifetime, renewed on access")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a session and print it."""
    state_value = _parse_json(state, "state")
    metadata_value = _parse_json(metadata, "metadata")
    with _store(ctx) as store:
        session = store.create_session(
            session_id=session_id,
            owner=owner,
            folder=folder,
            title=title,
            status=cast(Status, status),
            step=step,
            state=state_value,
            metadata=metadata_value,
            ttl=ttl,
            idle_ttl=idle_ttl,
        )
    _emit(session, as_json, _session_panel)


@_command()
def show(ctx: typer.Context, session_id: str, as_json: JsonFlag = False) -> None:
    """Show a session with its state and aggregates."""
    with _store(ctx) as store:
        session = store.get_session(session_id)
    _emit(session, as_json, _session_panel)


@_command()
def append(
    ctx: typer.Context,
    session_id: str,
    role: str,
    content: Annotated[str, typer.Argument(help="Message text (or JSON with --json-content)")],
    json_content: Annotated[
        bool, typer.Option("--json-content", help="Parse CONTENT as JSON")
    ] = False,
    input_tokens: Annotated[int, typer.Option()] = 0,
    output_tokens: Annotated[int, typer.Option()] = 0,
    cost: Annotated[float, typer.Option()] = 0.0,
    metadata: Annotated[str | None, typer.Option(help="Metadata, a JSON object")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Append one message to a session and print it with its seq."""
    value = _parse_json(content, "content") if json_content else content
    metadata_value = _parse_json(metadata, "metadata")
    with _store(ctx) as store:
        message = store.append_message(
            session_id,
            role,
            value,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=cost,
            metadata=metadata_value,
        )
    _emit(message, as_json, lambda m: _messages_table([m]))


@_command()
def messages(
    ctx: typer.Context,
    session_id: str,
    after: Annotated[
        int | None,
        typer.Option(
            metavar="SEQ", show_default=False, help="Only messages after this seq (default 0)"
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(show_default=False, help="At most this many messages (default 100)"),
    ] = None,
    last: Annotated[
        int | None, typer.Option(metavar="N", help="The newest N messages instead")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Print a session's messages, oldest first."""
    if last is not None and (after is not None or limit is not None):
        raise InvalidInput("last", "give either --last or --after/--limit, not both")
    with _store(ctx) as store:
        if last is not None:
            found = store.last_messages(session_id, last)
        else:
            found = store.read_messages(
                session_id, after_seq=after or 0, limit=100 if limit is None else limit
            )
    _emit(found, as_json, _messages_table)


@_command("list")
def list_sessions(
    ctx: typer.Context,
    owner: Annotated[str | None, typer.Option()] = None,
    folder: Annotated[str | None, typer.Option(help="Folder id")] = None,
    status: Annotated[str | None, typer.Option(help="active, completed or archived")] = None,
    title: Annotated[str | None, typer.Option(help="Title contains (ASCII case ignored)")] = None,
    order: Annotated[str, typer.Option(help="created_at or updated_at")] = "created_at",
    asc: Annotated[bool, typer.Option("--asc", help="Oldest first")] = False,
    limit: Annotated[int, typer.Option()] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List a page of sessions, newest first, and the cursor of the next page."""
    with _store(ctx) as store:
        page = store.list_sessions(
            owner=UNSET if owner is None else owner,
            folder=UNSET if folder is None else folder,
            status=cast(Status | None, status),
            title_contains=title,
            order_by=cast(OrderBy, order),
            descending=not asc,
            limit=limit,
            cursor=cursor,
        )
    _emit(page, as_json, _page_view)


@_command()
def stats(
    ctx: typer.Context,
    top: Annotated[int, typer.Option(metavar="N", help="How many top owners")] = 5,
    active_hours: Annotated[
        float, typer.Option(metavar="HOURS", help="Count sessions updated within so many hours")
    ] = 24.0,
    as_json: JsonFlag = False,
) -> None:
    """Print totals, recent activity, the completion rate and the top owners."""
    with _store(ctx) as store:
        figures = store.stats(top=top, active_hours=active_hours)
    _emit(figures, as_json, _stats_panel)


def _analytics_view(found: Analytics) -> RenderableType:
    series = _table("=from", "=to", "created", "completed", "messages", "tokens", "cost", "turns")
    for p in [*found.series, found.totals]:
        series.add_row(
            "total" if p is found.totals else p.start.isoformat(),
            "" if p is found.totals else p.end.isoformat(),
            str(p.created),
            str(p.completed),
            str(p.messages),
            f"{p.input_tokens} in, {p.output_tokens} out",
            f"{p.cost:g}",
            f"{p.avg_turns_per_session:.1f}",
        )
    owners = _table("=period", "owner", "created", "messages", "tokens", "cost")
    for o in found.owners:
        owners.add_row(
            o.start.isoformat(),
            _text(o.owner),
            str(o.created),
            str(o.messages),
            str(o.tokens),
            f"{o.cost:g}",
        )
    title = f"{found.start} to {found.end}, by {found.group_by}"
    if found.owner is not None:
        title += f", owner {found.owner}"
    parts: list[RenderableType] = [Text(title, style="bold"), series]
    if found.owners:
        parts += [Text("owners by cost", style="bold"), owners]
    return Group(*parts)


@_command()
def analytics(
    ctx: typer.Context,
    days: Annotated[int, typer.Option(metavar="N", help="How many UTC days, up to --until")] = 30,
    until: Annotated[
        str | None, typer.Option(metavar="YYYY-MM-DD", show_default="today", help="Last day")
    ] = None,
    group_by: Annotated[
        str, typer.Option("--group-by", metavar="day|week|month", help="Period of each row")
    ] = "day",
    owner: Annotated[str | None, typer.Option(help="Only this owner's figures")] = None,
    no_owner: Annotated[
        bool, typer.Option("--no-owner", help="Only the figures of sessions without an owner")
    ] = False,
    top: Annotated[int, typer.Option(metavar="N", help="Owners by cost per period")] = 10,
    as_json: JsonFlag = False,
) -> None:
    """Print sessions created and completed, messages, tokens and cost per period, and the
    owners that cost most in each (history: deleted sessions still count)."""
    if owner is not None and no_owner:
        raise InvalidInput("--no-owner", "give either --owner or --no-owner, not both")
    last: date | None = None
    if until is not None:
        try:
            last = date.fromisoformat(until)
        except ValueError:
            raise InvalidInput("--until", f"must be a date as YYYY-MM-DD, not {until!r}") from None
    who: str | Unset | None = None if no_owner else UNSET if owner is None else owner
    with _store(ctx) as store:
        found = store.analytics(
            days=days, until=last, group_by=cast("Grouping", group_by), owner=who, top=top
        )
    _emit(found, as_json, _analytics_view)


# --- guards: failed logins and budgets ---------------------------------------------------

logins_app = typer.Typer(
    name="logins",
    help="Failed logins and lockouts, per client IP and account.",
    no_args_is_help=True,
)
app.add_typer(logins_app)
IpOption = Annotated[str | None, typer.Option(help="A client IP address")]
AccountOption = Annotated[str | None, typer.Option(help="An account name")]


def _logins_table(found: list[LoginStatus]) -> RenderableType:
    if not found:
        return Text("no failed logins on record")
    table = _table("who", "failures", "in window", "locked for", "lockouts", "last failure")
    for s in found:
        locked = f"{s.retry_after:.0f} s" if s.locked else ""
        last = "" if s.last_failure is None else s.last_failure.isoformat(timespec="seconds")
        table.add_row(s.who, str(s.failures), str(s.recent_failures), locked, str(s.lockouts), last)
    return table


@_command("list", group=logins_app)
def logins_list(
    ctx: typer.Context,
    locked: Annotated[bool, typer.Option("--locked", help="Only those locked out now")] = False,
    as_json: JsonFlag = False,
) -> None:
    """List the clients and accounts with failed logins, latest failure first."""
    with _store(ctx) as store:
        found = store.list_logins(locked_only=locked)
    _emit(found, as_json, _logins_table)


@_command("unlock", group=logins_app)
def logins_unlock(
    ctx: typer.Context,
    ip: IpOption = None,
    account: AccountOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Lift the lockout of a client IP or an account and forget its failures."""
    with _store(ctx) as store:
        cleared = store.unlock_login(ip=ip, account=account)
    _emit({"cleared": cleared}, as_json, lambda _: Text(f"cleared {cleared} login records"))


@_command()
def usage(
    ctx: typer.Context,
    owner: Annotated[str | None, typer.Option(help="An owner")] = None,
    session: Annotated[str | None, typer.Option(help="A session id")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Print the tokens and cost an owner or a session used this budget period."""
    with _store(ctx) as store:
        found = store.budget_usage(owner=owner, session_id=session)

    def view(u: BudgetUsage) -> RenderableType:
        def limit(value: float | None) -> str:
            return "none" if value is None else f"{value:g}"

        start = "" if u.period_start is None else u.period_start.date().isoformat()
        return _fields(
            [
                ("scope", u.scope),
                ("period", f"{u.period} {start}".strip()),
                ("tokens", f"{u.input_tokens + u.output_tokens} of {limit(u.token_limit)}"),
                ("cost", f"{u.cost:g} of {limit(u.cost_limit)}"),
            ]
        )

    _emit(found, as_json, view)


# --- transfer: export, import, migrate, verify, backup ----------------------------------

NoProgress = Annotated[
    bool, typer.Option("--no-progress", help="No progress bar (none is shown off a terminal)")
]
Concurrency = Annotated[int, typer.Option(metavar="N", help="Sessions read and written at once")]


@contextmanager
def _progress(label: str, enabled: bool, unit: str = "sessions") -> Iterator[Progress | None]:
    """A rich progress bar on stderr, when it is a terminal and the output is not JSON."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None
        return
    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    columns = (TextColumn(label), BarColumn(), count, TimeRemainingColumn())
    with ProgressBar(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def tell(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield tell


def _report_view(title: str, data: dict[str, Any]) -> RenderableType:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.append((key, _report_view(key, value)))
        elif isinstance(value, list):
            rows.append((key, "\n".join(map(str, value)) if value else None))
        else:
            rows.append((key.replace("_", " "), value))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, value if isinstance(value, Panel) else _text(value))
    return Panel(grid, title=title, title_align="left")


def _finish(title: str, data: dict[str, Any], as_json: bool, code: int) -> None:
    """Print a report; exit with ``code`` when it is not 0 (after printing it)."""
    _emit(data, as_json, lambda d: _report_view(title, d))
    if code:
        raise typer.Exit(code)


@_command("export")
def export_command(
    url: Annotated[str, typer.Argument(help="Store URL")],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="File to write: .jsonl, .jsonl.gz or .jsonl.zst"),
    ],
    concurrency: Concurrency = transfer.DEFAULT_CONCURRENCY,
    no_progress: NoProgress = False,
    as_json: JsonFlag = False,
) -> None:
    """Export every tenant's folders and live sessions to a JSON Lines file."""

    async def run() -> transfer.ExportReport:
        with _progress("exporting", not (no_progress or as_json)) as tell:
            async with open_store(url) as store:
                return await transfer.export_store(
                    store, output, concurrency=concurrency, progress=tell
                )

    _finish("export", asyncio.run(run()).to_dict(), as_json, 0)


@_command("import")
def import_command(
    url: Annotated[str, typer.Argument(help="Store URL")],
    file: Annotated[Path, typer.Argument(help="An export: .jsonl, .jsonl.gz or .jsonl.zst")],
    on_conflict: Annotated[
        str, typer.Option(help="When an id is taken: skip, overwrite or fail")
    ] = "skip",
    keep_going: Annotated[
        bool, typer.Option("--keep-going", help="Report bad lines and go on")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check and count; write nothing")
    ] = False,
    concurrency: Concurrency = transfer.DEFAULT_CONCURRENCY,
    no_progress: NoProgress = False,
    as_json: JsonFlag = False,
) -> None:
    """Import an export file, each session atomically.

    A bad line stops the import (exit 2) unless --keep-going, which reports it, imports
    the rest and exits 2 at the end.
    """

    async def run() -> transfer.ImportReport:
        with _progress("importing", not (no_progress or as_json), "bytes") as tell:
            async with open_store(url) as store:
                return await transfer.import_file(
                    store,
                    file,
                    on_conflict=cast(transfer.OnConflict, on_conflict),
                    keep_going=keep_going,
                    dry_run=dry_run,
                    concurrency=concurrency,
                    progress=tell,
                )

    report = asyncio.run(run())
    _finish("import", report.to_dict(), as_json, EXIT_INVALID if report.failed else 0)


@_command("migrate")
def migrate_command(
    source: Annotated[str, typer.Argument(metavar="SRC_URL", help="Store to copy from")],
    destination: Annotated[str, typer.Argument(metavar="DST_URL", help="Store to copy to")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would move; write nothing")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Then compare counts and checksums of both sides")
    ] = False,
    concurrency: Concurrency = transfer.DEFAULT_CONCURRENCY,
    no_progress: NoProgress = False,
    as_json: JsonFlag = False,
) -> None:
    """Copy every tenant's folders and live sessions from SRC_URL to DST_URL.

    Safe to run again (also after a crash): nothing is duplicated, sessions changed in
    the source since are replaced, the source is never changed.
    """

    async def run() -> transfer.MigrateReport:
        with _progress("migrating", not (no_progress or as_json)) as tell:
            async with open_store(source) as src, open_store(destination) as dst:
                return await transfer.migrate(
                    src,
                    dst,
                    dry_run=dry_run,
                    verify_after=verify,
                    concurrency=concurrency,
                    progress=tell,
                )

    report = asyncio.run(run())
    _finish("migrate", report.to_dict(), as_json, 0 if report.ok else EXIT_FAILED)


@_command("verify")
def verify_command(
    source: Annotated[str, typer.Argument(metavar="SRC_URL")],
    destination: Annotated[str, typer.Argument(metavar="DST_URL")],
    concurrency: Concurrency = transfer.DEFAULT_CONCURRENCY,
    no_progress: NoProgress = False,
    as_json: JsonFlag = False,
) -> None:
    """Compare two stores: counts and a checksum of every session (exit 1 if they differ)."""

    async def run() -> transfer.VerifyReport:
        with _progress("verifying", not (no_progress or as_json)) as tell:
            async with open_store(source) as src, open_store(destination) as dst:
                return await transfer.verify(src, dst, concurrency=concurrency, progress=tell)

    report = asyncio.run(run())
    _finish("verify", report.to_dict(), as_json, 0 if report.ok else EXIT_FAILED)


@_command("backup")
def backup_command(
    url: Annotated[str, typer.Argument(help="Store URL")],
    dest: Annotated[
        Path,
        typer.Argument(help="A .db file (SQLite stores), or .jsonl, .jsonl.gz, .jsonl.zst"),
    ],
    no_progress: NoProgress = False,
    as_json: JsonFlag = False,
) -> None:
    """Back a whole store up while it is in use.

    A SQLite store to a database file (SQLite's online backup API), any store to an
    export file (.jsonl, .jsonl.gz, .jsonl.zst). Restore with `import`, or by opening the
    copied database.
    """

    async def run() -> transfer.BackupReport:
        with _progress("backing up", not (no_progress or as_json)) as tell:
            async with open_store(url) as store:
                return await transfer.backup(store, dest, progress=tell)

    _finish("backup", asyncio.run(run()).to_dict(), as_json, 0)


@_command("check")
def check_command(
    ctx: typer.Context,
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed")] = False,
    all_tenants: Annotated[
        bool, typer.Option("--all-tenants", help="Check every tenant, not only --tenant")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Find damage and, with --repair, fix it (exit 1 if any is left).

    Aggregates that disagree with the messages, messages of no session, sessions in a
    folder that is gone, index entries of no session (Redis) and quarantined files (files
    engine); seq gaps are listed, never renumbered. A repair never deletes what a session
    holds; quarantined files are only listed.
    """
    target: _Target = ctx.obj

    async def run() -> checks.CheckResult:
        async with open_store(target.url, tenant=target.tenant) as store:
            return await checks.check(store, repair=repair, all_tenants=all_tenants)

    result = asyncio.run(run())
    _emit(result.to_dict(), as_json, _check_view)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def _check_view(data: dict[str, Any]) -> RenderableType:
    table = _table("=damage", "found", "repaired", "examples")
    for kind, count in data["counts"].items():
        repaired = str(count["repaired"]) if count["repairable"] else "never"
        table.add_row(
            kind.replace("_", " "), str(count["found"]), repaired, "\n".join(count["samples"][:5])
        )
    scope = "every tenant" if data["tenant"] is None else f"tenant {data['tenant']}"
    verdict = "nothing left to fix" if data["ok"] else f"{data['left']} left to fix"
    return Group(Text(f"{data['engine']}, {scope}: {verdict}"), table)


@_command("doctor")
def doctor_command(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The engine's version, durability settings, sizes, counts, missing indexes, schema
    version, and a verdict with what to change (exit 1 on warnings)."""
    target: _Target = ctx.obj

    async def run() -> checks.DoctorResult:
        async with open_store(target.url, tenant=target.tenant) as store:
            return await checks.doctor(store)

    result = asyncio.run(run())
    _finish("doctor", result.to_dict(), as_json, 0 if result.ok else EXIT_FAILED)


@_command("import-legacy")
def import_legacy_command(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="Store URL")],
    path: Annotated[
        Path, typer.Argument(help="Folder of session files, or of users.json and user_data/")
    ],
    layout: Annotated[str, typer.Option(help="auto, sessions-folder or users-json")] = "auto",
    field_map: Annotated[
        list[str] | None,
        typer.Option("--map", metavar="OLD=NEW", help="Rename a field before mapping"),
    ] = None,
    on_conflict: Annotated[
        str, typer.Option(help="When an id is taken: skip, overwrite or fail")
    ] = "skip",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read and check; write nothing")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Import hand-rolled JSON session files into the --tenant.

    Reports what was imported, what was skipped and why; exits 2 if anything was skipped.
    """
    mapping = legacy.parse_map(field_map or [])
    target: _Target = ctx.obj

    async def run() -> legacy.LegacyReport:
        async with open_store(url, tenant=target.tenant) as store:
            return await legacy.import_legacy(
                store,
                path,
                layout=cast(legacy.Layout, layout),
                field_map=mapping,
                on_conflict=cast(transfer.OnConflict, on_conflict),
                dry_run=dry_run,
            )

    report = asyncio.run(run())
    _finish("import-legacy", report.to_dict(), as_json, EXIT_INVALID if report.skipped else 0)


# --- lifecycle: archive, restore, purge ------------------------------------------------

AllTenants = Annotated[bool, typer.Option("--all-tenants", help="Every tenant's")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Count and list; change nothing")]
BatchSize = Annotated[
    int | None,
    typer.Option(metavar="N", show_default="purge_batch_size", help="Sessions listed per page"),
]
OlderThan = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        metavar="DURATION",
        help="Last activity longer ago than this: 45s, 30m, 12h, 90d, 2w",
    ),
]


def _older_than(text: str | None) -> float | None:
    return None if text is None else maintenance.parse_duration(text, "--older-than")


def _other_store(target: _Target, url: str | None, option: str) -> None:
    """Refuse an archive URL that names the store itself (moving would delete)."""
    if url is not None and url == (target.url or Settings().url):
        raise InvalidInput(option, "is the store itself: name another store")


@_command("archive")
def archive_command(
    ctx: typer.Context,
    older_than: OlderThan = None,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="URL", help="Move them to this store instead"),
    ] = None,
    dry_run: DryRun = False,
    all_tenants: AllTenants = False,
    batch_size: BatchSize = None,
    no_progress: NoProgress = False,
    as_json: JsonFlag = False,
) -> None:
    """Archive the sessions with no activity for --older-than.

    Their status becomes archived, or with --to they move to that store exactly as they
    are, each deleted here only after its copy landed. Safe to run again, also after a
    crash. `restore` brings one back.
    """
    if older_than is None:
        raise InvalidInput("--older-than", "is required: how long without activity, like 90d")
    seconds = maintenance.parse_duration(older_than, "--older-than")
    target: _Target = ctx.obj
    _other_store(target, to, "--to")

    async def run() -> maintenance.ArchiveReport:
        with _progress("archiving", not (no_progress or as_json)) as tell:
            async with contextlib.AsyncExitStack() as stack:
                store = await stack.enter_async_context(
                    open_store(target.url, tenant=target.tenant)
                )
                archive_store = (
                    None if to is None else await stack.enter_async_context(open_store(to))
                )
                return await maintenance.archive(
                    store,
                    older_than=seconds,
                    to=archive_store,
                    dry_run=dry_run,
                    all_tenants=all_tenants,
                    batch_size=batch_size,
                    progress=tell,
                )

    report = asyncio.run(run())
    _finish("archive", report.to_dict(), as_json, 0 if report.ok else EXIT_FAILED)


@_command("restore")
def restore_command(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(help="The archived session")],
    source: Annotated[
        str | None,
        typer.Option("--from", metavar="URL", help="The store `archive --to` moved it to"),
    ] = None,
    dry_run: DryRun = False,
    as_json: JsonFlag = False,
) -> None:
    """Bring an archived session back, active: from --from URL, or by its status."""
    target: _Target = ctx.obj
    _other_store(target, source, "--from")

    async def run() -> maintenance.RestoreReport:
        async with contextlib.AsyncExitStack() as stack:
            store = await stack.enter_async_context(open_store(target.url, tenant=target.tenant))
            archive_store = (
                None if source is None else await stack.enter_async_context(open_store(source))
            )
            return await maintenance.restore(
                store, session_id, source=archive_store, dry_run=dry_run
            )

    _finish("restore", asyncio.run(run()).to_dict(), as_json, 0)


@_command()
def purge(
    ctx: typer.Context,
    expired: Annotated[
        bool, typer.Option("--expired", help="Sessions whose TTL ran out (without options too)")
    ] = False,
    older_than: OlderThan = None,
    dry_run: DryRun = False,
    all_tenants: AllTenants = False,
    batch_size: BatchSize = None,
    no_progress: NoProgress = False,
    as_json: JsonFlag = False,
) -> None:
    """Delete sessions and their messages: expired ones, or with --older-than those with no
    activity for that long (any status); print how many."""
    seconds = _older_than(older_than)
    target: _Target = ctx.obj
    expired = expired or seconds is None

    async def run() -> tuple[maintenance.PurgeReport, str]:
        with _progress("purging", not (no_progress or as_json)) as tell:
            async with open_store(target.url, tenant=target.tenant) as store:
                report = await maintenance.purge(
                    store,
                    expired=expired,
                    older_than=seconds,
                    dry_run=dry_run,
                    all_tenants=all_tenants,
                    batch_size=batch_size,
                    progress=tell,
                )
                return report, store.tenant

    report, tenant = asyncio.run(run())
    if seconds is None and not dry_run:  # the plain purge of expired sessions, as before
        where = "all tenants" if all_tenants else f"tenant {tenant}"
        text = f"purged {report.purged} expired sessions in {where}"
        _emit({"purged": report.purged}, as_json, lambda _: Text(text))
        return
    _finish("purge", report.to_dict(), as_json, 0 if report.ok else EXIT_FAILED)


# --- the HTTP service: serve, keys -----------------------------------------------------

keys_app = typer.Typer(name="keys", help="API keys of the HTTP service.", no_args_is_help=True)
app.add_typer(keys_app)


def _settings(target: _Target) -> Settings:
    """The settings of the environment, with --url and --tenant if given."""
    given = {"url": target.url, "tenant": target.tenant}
    return Settings().model_copy(update={k: v for k, v in given.items() if v is not None})


@_command("serve")
def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
) -> None:
    """Run the HTTP API over the store (OpenAPI docs at /docs).

    On a new store it first makes an admin key and prints it, this once.
    """
    try:
        import uvicorn

        from .server import create_app, ui
    except ImportError as exc:
        raise _fail(f"{exc.name} is missing: pip install 'sessionkeeper[server]'", 1) from None
    settings = _settings(ctx.obj)

    async def bootstrap() -> str | None:
        async with open_store(settings=settings) as store:
            return await keys.bootstrap_admin(store)

    token = asyncio.run(bootstrap())
    url = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}"
    typer.echo(f"sessionkeeper: serving {settings.url} at {url} (API docs: {url}/docs)")
    typer.echo(f"admin page: {url}/ui")
    if token is not None:
        typer.echo(f"admin key of tenant {settings.tenant!r}, shown this once:\n{token}")
        typer.echo(f'try it: curl -H "Authorization: Bearer {token}" {url}/v1/me')
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = create_app(settings=settings, routers=[ui.router])
    uvicorn.run(app, host=host, port=port, access_log=False)


def _key_table(found: list[keys.ApiKey]) -> Table:
    table = _table("=id", "tenant", "=role", "name", "=created", "=revoked")
    for k in found:
        fields = (k.id, k.tenant, k.role, k.name, k.created_at, k.revoked_at)
        table.add_row(*map(_text, fields))
    return table


@_command("create", group=keys_app)
def keys_create(
    ctx: typer.Context,
    role: Annotated[str, typer.Option(help="tenant (its tenant only) or admin (any)")] = "tenant",
    name: Annotated[str, typer.Option(help="What the key is for")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Make an API key for --tenant and print its token, this once."""
    settings = _settings(ctx.obj)

    async def run() -> tuple[keys.ApiKey, str]:
        async with open_store(settings=settings) as store:
            return await keys.create_key(store, tenant=store.tenant, role=role, name=name)

    key, token = asyncio.run(run())
    data = {**key.model_dump(mode="json"), "token": token}
    shown = f"{key.role} key {key.id} of tenant {key.tenant!r}, shown this once:\n{token}"
    _emit(data, as_json, lambda _: Text(shown))


@_command("list", group=keys_app)
def keys_list(
    ctx: typer.Context,
    all_tenants: Annotated[bool, typer.Option("--all-tenants", help="Every tenant's")] = False,
    as_json: JsonFlag = False,
) -> None:
    """List the API keys of --tenant (revoked ones too), never their secrets."""
    settings = _settings(ctx.obj)

    async def run() -> list[keys.ApiKey]:
        async with open_store(settings=settings) as store:
            return await keys.list_keys(store, tenant=None if all_tenants else store.tenant)

    _emit(asyncio.run(run()), as_json, _key_table)


@_command("revoke", group=keys_app)
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The 16 hex digits after sk_ in the token")],
    as_json: JsonFlag = False,
) -> None:
    """Revoke an API key: it stops working at once, on every server."""
    settings = _settings(ctx.obj)

    async def run() -> keys.ApiKey:
        async with open_store(settings=settings) as store:
            return await keys.revoke_key(store, key_id)

    _emit(asyncio.run(run()), as_json, lambda k: _key_table([k]))


# --- the HTTP service's webhooks -------------------------------------------------------

webhooks_app = typer.Typer(
    name="webhooks", help="The webhook delivery log of the HTTP service.", no_args_is_help=True
)
app.add_typer(webhooks_app)


def _webhooks() -> Any:
    try:
        from .server import webhooks
    except ImportError as exc:
        raise _fail(f"{exc.name} is missing: pip install 'sessionkeeper[server]'", 1) from None
    return webhooks


def _deliveries_table(found: list[Any]) -> Table:
    """Deliveries, a line each (tenant and session are in --json)."""
    table = _table("=id", "=event", "=status", "=tries", "last", "=created")
    for d in found:
        last = d.attempts[-1] if d.attempts else None
        outcome = None if last is None else (last.status_code or last.error)
        fields = (d.id, d.event, d.status, len(d.attempts), outcome, d.created_at)
        table.add_row(*map(_text, fields))
    return table


@_command("deliveries", group=webhooks_app)
def webhooks_deliveries(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="Only pending, delivered or failed ones")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List webhook deliveries, newest first, with every attempt (--json)."""
    webhooks = _webhooks()
    settings = _settings(ctx.obj)

    async def run() -> list[Any]:
        async with open_store(settings=settings) as store:
            found: list[Any] = await webhooks.list_deliveries(store, status=status, limit=limit)
            return found

    _emit(asyncio.run(run()), as_json, _deliveries_table)


@_command("redeliver", group=webhooks_app)
def webhooks_redeliver(
    ctx: typer.Context,
    delivery_id: Annotated[str, typer.Argument(help="The delivery id (24 hex digits)")],
    as_json: JsonFlag = False,
) -> None:
    """Send a delivered or failed delivery again: a running `serve` sends it."""
    webhooks = _webhooks()
    settings = _settings(ctx.obj)

    async def run() -> Any:
        async with open_store(settings=settings) as store:
            return await webhooks.redeliver(store, delivery_id)

    _emit(asyncio.run(run()), as_json, lambda d: _deliveries_table([d]))
