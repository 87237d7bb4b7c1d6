"""The append/read benchmark: sessionkeeper's engines beside a raw sqlite3 baseline.

The workload: ``--sessions`` sessions of ``--messages`` messages each, appended one call
per message from ``--concurrency`` asyncio tasks (each task takes the next session and
appends its messages in order, as a chat does); then every session's full history and
its last 10 messages, read from the same number of tasks (``--read-rounds`` passes over all
sessions, so the read phases are long enough to time).

The baseline is the simplest thing one would write with the standard library: one
``sqlite3`` connection (WAL, ``synchronous=NORMAL``) on ONE executor thread reached through
``loop.run_in_executor``, one transaction per insert, ``seq`` passed by the caller, plain
tuples back from reads. The machine running this is shared and noisy, so sessionkeeper's
figures are also given as ratios against the baseline measured in the same run; the
targets are on those ratios (and on the memory engine's absolute append rate). CPU time
per operation (the whole process, every thread) is printed too: a busy machine sways it
far less than wall time.

Run it with ``python -m bench.append_read`` (``--help`` lists the options); progress goes
to stderr, results to stdout (``--json`` for a machine-readable document).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sessionkeeper import SessionStore, open_store

ENGINES = ("raw", "sqlite", "memory")
LABELS = {"raw": "raw sqlite3", "sqlite": "sqlite://", "memory": "memory://"}
LAST_N = 10
MAX_MESSAGES = 1000  # one read_messages call (max_page_size) must return a whole history

# (name, engine, what, operator, threshold): ratios are sessionkeeper / raw sqlite3.
TargetRule = tuple[str, str, str, str, float]
TARGETS: tuple[TargetRule, ...] = (
    ("sqlite appends vs raw", "sqlite", "append_ratio", ">=", 2.0),
    ("sqlite last-10 reads vs raw", "sqlite", "last_ratio", ">=", 0.8),
    ("memory appends per second", "memory", "append", ">=", 100_000.0),
)

_FILLER = (
    "Could you summarise the draft so far and suggest two clearer headings for the "
    "section on onboarding? Keep the tone friendly and the answer under 120 words."
)


# --- resources -------------------------------------------------------------------------


@dataclass(slots=True)
class Resources:
    """What the process holds at one moment: open descriptors, threads, resident memory."""

    at: str
    fds: int
    threads: int
    rss_mb: float


def resources(at: str) -> Resources:
    return Resources(at, _open_fds(), threading.active_count(), _rss_mb())


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself holds
    except OSError:
        return -1


def _rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


# --- targets: the same workload through sessionkeeper and through raw sqlite3 ----------


class Target(Protocol):
    """One thing to measure; reads return the seqs they got, so the run can check them."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, session_id: str) -> None: ...

    async def append(self, session_id: str, seq: int, role: str, content: str) -> None: ...

    async def read_all(self, session_id: str, limit: int) -> list[int]: ...

    async def read_last(self, session_id: str, n: int) -> list[int]: ...


class StoreTarget:
    """sessionkeeper's public async API over the engine a URL names."""

    def __init__(self, url: str) -> None:
        self._store: SessionStore = open_store(url)

    async def open(self) -> None:
        await self._store.open()

    async def close(self) -> None:
        await self._store.close()

    async def create(self, session_id: str) -> None:
        await self._store.create_session(session_id=session_id)

    async def append(self, session_id: str, seq: int, role: str, content: str) -> None:
        await self._store.append_message(session_id, role, content)

    async def read_all(self, session_id: str, limit: int) -> list[int]:
        return [m.seq for m in await self._store.read_messages(session_id, limit=limit)]

    async def read_last(self, session_id: str, n: int) -> list[int]:
        return [m.seq for m in await self._store.last_messages(session_id, n=n)]


_RAW_SCHEMA = """CREATE TABLE messages (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID"""
_RAW_INSERT = "INSERT INTO messages VALUES (?, ?, ?, ?, 0, 0, 0.0, '{}', ?)"
_RAW_COLUMNS = "seq, role, content, input_tokens, output_tokens, cost, metadata, created_at"
_RAW_ALL = f"SELECT {_RAW_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq LIMIT ?"
_RAW_LAST = (
    f"SELECT * FROM (SELECT {_RAW_COLUMNS} FROM messages WHERE session_id = ? "
    "ORDER BY seq DESC LIMIT ?) ORDER BY seq"
)


class RawTarget:
    """The baseline: one sqlite3 connection on one executor thread, autocommit inserts.

    Content is stored as JSON text, as sessionkeeper stores it, so both files hold the
    same bytes; reads return plain tuples.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-raw-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the raw baseline is not open")
        return self._conn

    def _open_sync(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None)  # autocommit: 1 txn/insert
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(_RAW_SCHEMA)
        self._conn = conn

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _insert(self, params: tuple[Any, ...]) -> None:
        self._connection().execute(_RAW_INSERT, params)

    def _select(self, sql: str, session_id: str, limit: int) -> list[tuple[Any, ...]]:
        return self._connection().execute(sql, (session_id, limit)).fetchall()

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def close(self) -> None:
        await self._run(self._close_sync)
        self._pool.shutdown(wait=True)

    async def create(self, session_id: str) -> None:
        return None  # the baseline keeps no session rows: seq comes from the caller

    async def append(self, session_id: str, seq: int, role: str, content: str) -> None:
        await self._run(self._insert, (session_id, seq, role, json.dumps(content), time.time()))

    async def read_all(self, session_id: str, limit: int) -> list[int]:
        rows: list[tuple[Any, ...]] = await self._run(self._select, _RAW_ALL, session_id, limit)
        return [row[0] for row in rows]

    async def read_last(self, session_id: str, n: int) -> list[int]:
        rows: list[tuple[Any, ...]] = await self._run(self._select, _RAW_LAST, session_id, n)
        return [row[0] for row in rows]


# --- running phases --------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    """Operations done, the wall time they took, and the CPU time of the whole process
    (every thread) meanwhile: CPU per operation is far less swayed by a busy machine."""

    ops: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_seconds / self.ops


@dataclass(slots=True)
class EngineRun:
    """One engine's figures at one scale."""

    engine: str
    sessions: int
    phases: dict[str, Phase] = field(default_factory=dict)
    resources: list[Resources] = field(default_factory=list)


class Progress:
    """Counts operations of one phase; at each quarter, notes resources and tells stderr."""

    def __init__(self, label: str, phase: str, total: int, run: EngineRun) -> None:
        self._label = label
        self._phase = phase
        self._total = total
        self._run = run
        self._done = 0
        self._marks = [max(1, total * q // 4) for q in (1, 2, 3, 4)]

    def tick(self) -> None:
        self._done += 1
        if self._marks and self._done >= self._marks[0]:
            self._marks.pop(0)
            percent = round(100 * self._done / self._total)
            snapshot = resources(f"{self._phase} {percent}%")
            self._run.resources.append(snapshot)
            print(
                f"  {self._label:<12} n={self._run.sessions:<6} {self._phase:<8} "
                f"{self._done:>8}/{self._total:<8} fds={snapshot.fds} "
                f"threads={snapshot.threads} rss={snapshot.rss_mb:.1f}MB",
                file=sys.stderr,
                flush=True,
            )


async def _in_tasks(
    ops: int,
    session_ids: Sequence[str],
    concurrency: int,
    work: Callable[[str], Awaitable[None]],
    rounds: int = 1,
) -> Phase:
    """Run ``work`` on every session from ``concurrency`` tasks, ``rounds`` times over.

    Reads take several rounds: they are quick, and a phase of a few milliseconds would
    measure the machine's hiccups rather than the engine.
    """

    async def worker(pending: Iterator[str]) -> None:
        for session_id in pending:  # one shared iterator: each session goes to one task
            await work(session_id)

    cpu, started = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        pending = iter(session_ids)
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker(pending))
    return Phase(ops * rounds, time.perf_counter() - started, time.process_time() - cpu)


def _content(session_id: str, seq: int) -> str:
    return f"message {seq} of {session_id}: {_FILLER}"


async def _measure(
    engine: str,
    target: Target,
    sessions: int,
    messages: int,
    concurrency: int,
    rounds: int,
    label: str,
) -> EngineRun:
    run = EngineRun(engine, sessions)
    ids = [f"bench-{i:07d}" for i in range(sessions)]
    limit = max(100, messages)
    last_n = min(LAST_N, messages)
    want_all = list(range(1, messages + 1))
    want_last = want_all[-last_n:]

    await target.open()
    try:
        run.phases["create"] = await _in_tasks(sessions, ids, concurrency, target.create)

        appends = Progress(label, "append", sessions * messages, run)

        async def append(session_id: str) -> None:
            for seq in range(1, messages + 1):
                role = "user" if seq % 2 else "assistant"
                await target.append(session_id, seq, role, _content(session_id, seq))
                appends.tick()

        run.phases["append"] = await _in_tasks(sessions * messages, ids, concurrency, append)
        _done(run, "append", label)

        async def read_all(session_id: str) -> None:
            got = await target.read_all(session_id, limit)
            if got != want_all:
                raise RuntimeError(f"{label}: {session_id} read back seqs {got}")

        run.phases["full"] = await _in_tasks(sessions, ids, concurrency, read_all, rounds)
        _done(run, "full", label)

        async def read_last(session_id: str) -> None:
            got = await target.read_last(session_id, last_n)
            if got != want_last:
                raise RuntimeError(f"{label}: {session_id} last messages have seqs {got}")

        run.phases["last"] = await _in_tasks(sessions, ids, concurrency, read_last, rounds)
        _done(run, "last", label)
        run.resources.append(resources("reads done"))
    finally:
        await target.close()
    return run


def _done(run: EngineRun, phase: str, label: str) -> None:
    done = run.phases[phase]
    print(
        f"  {label:<12} n={run.sessions:<6} {phase:<8} {done.ops:>8} in {done.seconds:.2f}s",
        file=sys.stderr,
        flush=True,
    )


def measure_target(
    engine: str,
    target: Target,
    sessions: int,
    messages: int,
    concurrency: int,
    rounds: int,
    label: str | None = None,
) -> EngineRun:
    """The workload through one unopened target, on a fresh event loop that opens and
    closes it; ``label`` (default ``LABELS[engine]``) names it in progress lines."""
    gc.collect()
    # "before" and "closed" are taken outside the event loop, so they compare like with
    # like: neither counts the loop's own descriptors or its default executor's threads.
    before = resources("before")
    work = _measure(
        engine, target, sessions, messages, concurrency, rounds, label or LABELS[engine]
    )
    run = asyncio.run(work)
    run.resources.insert(0, before)
    run.resources.append(resources("closed"))
    return run


def measure(
    engine: str, folder: Path, sessions: int, messages: int, concurrency: int, rounds: int
) -> EngineRun:
    """One engine at one scale, on a fresh event loop and (for files) a fresh database."""
    path = folder / f"{engine}-{sessions}.db"
    target: Target
    if engine == "raw":
        target = RawTarget(path)
    elif engine == "sqlite":
        target = StoreTarget(f"sqlite:///{path}")
    else:
        target = StoreTarget("memory://")
    try:
        return measure_target(engine, target, sessions, messages, concurrency, rounds)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


# --- figures, ratios and targets -------------------------------------------------------


def best(runs: Sequence[EngineRun]) -> EngineRun:
    """Each phase at its best over the repeats (noise only ever slows a run down); the
    resources are those of the last run."""
    phases = {
        name: max((run.phases[name] for run in runs), key=lambda phase: phase.per_second)
        for name in runs[0].phases
    }
    return EngineRun(runs[0].engine, runs[0].sessions, phases, runs[-1].resources)


def figures(run: EngineRun, raw: EngineRun | None, creates: bool) -> dict[str, float | None]:
    """Rates, CPU per op and ratios against ``raw``; the create rate only if ``creates``
    (a baseline that keeps no session rows does nothing there)."""
    out: dict[str, float | None] = {
        "create": run.phases["create"].per_second if creates else None,
        "append": run.phases["append"].per_second,
        "full": run.phases["full"].per_second,
        "last": run.phases["last"].per_second,
    }
    for name in ("append", "full", "last"):
        out[f"{name}_cpu_us"] = run.phases[name].cpu_us
    for name in ("append", "full", "last"):
        value = out[name]
        base = None if raw is None else raw.phases[name].per_second
        out[f"{name}_ratio"] = value / base if value is not None and base else None
    return out


def check_targets(
    by_engine: dict[str, dict[str, float | None]], targets: Sequence[TargetRule] = TARGETS
) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for name, engine, what, op, threshold in targets:
        value = by_engine.get(engine, {}).get(what)
        met = None if value is None else value >= threshold
        checks.append(
            {"target": name, "value": value, "op": op, "threshold": threshold, "met": met}
        )
    return checks


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _threshold(check: dict[str, Any]) -> str:
    threshold = check["threshold"]
    if check["target"].endswith("per second"):
        return f"{threshold:,.0f}/s"
    return f"{threshold:.1f}x"


def _value(check: dict[str, Any]) -> str:
    if check["target"].endswith("per second"):
        return _rate(check["value"]) + "/s" if check["value"] is not None else "-"
    return _ratio(check["value"])


def _verdict(met: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: "not run"}[met]


def _series(run: EngineRun, attribute: str) -> str:
    """One resource across a run: before | append quarters | reads done | closed."""
    values = [getattr(r, attribute) for r in run.resources]
    text = [f"{v:.0f}" if isinstance(v, float) else str(v) for v in values]
    if len(text) != 7:
        return " ".join(text)
    return f"{text[0]} | {' '.join(text[1:5])} | {text[5]} | {text[6]}"


def render(report: dict[str, Any], runs: dict[int, dict[str, EngineRun]]) -> str:
    lines: list[str] = []
    config, env = report["config"], report["environment"]
    lines.append(
        f"append/read benchmark: {config['messages']} messages per session, one "
        f"append_message call each, {config['concurrency']} tasks, best of {config['repeat']}, "
        f"{config['read_rounds']} read passes"
    )
    lines.append(
        f"python {env['python']}, sqlite {env['sqlite']}, {env['cpus']} CPUs, {env['platform']}"
    )
    for scale in report["scales"]:
        n = scale["sessions"]
        lines.append("")
        reads = n * config["read_rounds"]
        lines.append(
            f"== {n} sessions: {n * config['messages']:,} appends, {reads:,} full reads "
            f"(limit {max(100, config['messages'])}), {reads:,} last-{LAST_N} reads"
        )
        lines += table_lines(scale["engines"], LABELS, "ratio vs raw sqlite3")
        lines += target_lines(scale["targets"])
    lines.append("")
    lines += resource_lines(runs, LABELS)
    lines += growth_lines(report["growth"], LABELS)
    return "\n".join(lines)


def table_lines(
    by_engine: dict[str, dict[str, float | None]], labels: dict[str, str], versus: str
) -> list[str]:
    """One scale's rates, ratios (titled ``versus``) and CPU per op, one line per engine."""
    lines = [
        f"{'':<12} {'operations per second':^34}   {versus:^23}   {'CPU us per op':^20}",
        f"{'engine':<12} {'append':>10} {'full-read':>12} {'last-10':>10}   "
        f"{'append':>7} {'full':>7} {'last-10':>7}   "
        f"{'append':>6} {'full':>6} {'last':>6}   {'create/s':>9}",
    ]
    for engine, f in by_engine.items():
        lines.append(
            f"{labels[engine]:<12} {_rate(f['append']):>10} {_rate(f['full']):>12} "
            f"{_rate(f['last']):>10}   {_ratio(f['append_ratio']):>7} "
            f"{_ratio(f['full_ratio']):>7} {_ratio(f['last_ratio']):>7}   "
            f"{f['append_cpu_us']:>6.1f} {f['full_cpu_us']:>6.1f} {f['last_cpu_us']:>6.1f}   "
            f"{_rate(f['create']):>9}"
        )
    return lines


def target_lines(checks: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["targets:"]
    for check in checks:
        lines.append(
            f"  {check['target']:<30} {_value(check):>12}  target {check['op']} "
            f"{_threshold(check):<10} {_verdict(check['met'])}"
        )
    return lines


def resource_lines(runs: dict[int, dict[str, EngineRun]], labels: dict[str, str]) -> list[str]:
    lines = [
        "resources: before | append 25% 50% 75% 100% | reads done | closed "
        "(descriptors, threads, RSS MB)"
    ]
    for n, by_engine in runs.items():
        for engine, run in by_engine.items():
            lines.append(f"  {labels[engine]:<12} n={n:<6} fds     {_series(run, 'fds')}")
            lines.append(f"  {'':<12} {'':<8} threads {_series(run, 'threads')}")
            lines.append(f"  {'':<12} {'':<8} RSS MB  {_series(run, 'rss_mb')}")
    return lines


def growth_lines(growth: dict[str, Any], labels: dict[str, str]) -> list[str]:
    if not growth:
        return []
    lines = [
        f"growth from {growth['from']} to {growth['to']} sessions (while open, after the reads):"
    ]
    for engine, g in growth["engines"].items():
        flat = "flat" if g["fds"] == 0 and g["threads"] == 0 else "NOT flat"
        lines.append(
            f"  {labels[engine]:<12} fds {g['fds']:+d}, threads {g['threads']:+d} "
            f"({flat}); RSS {g['rss_mb']:+.1f} MB"
        )
    return lines


def growth(runs: dict[int, dict[str, EngineRun]]) -> dict[str, Any]:
    if len(runs) < 2:
        return {}
    small, large = min(runs), max(runs)
    engines: dict[str, dict[str, float]] = {}
    for engine, run in runs[large].items():
        before = {r.at: r for r in runs[small][engine].resources}["reads done"]
        after = {r.at: r for r in run.resources}["reads done"]
        engines[engine] = {
            "fds": after.fds - before.fds,
            "threads": after.threads - before.threads,
            "rss_mb": round(after.rss_mb - before.rss_mb, 1),
        }
    return {"from": small, "to": large, "engines": engines}


# --- command line ----------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _messages(text: str) -> int:
    value = _positive(text)
    if value > MAX_MESSAGES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_MESSAGES} (one page per read)")
    return value


def engine_list(engines: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names from ``engines``, returned in its order."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(names) - set(engines))
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown engine {', '.join(unknown) or '(none)'}; use {','.join(engines)}"
            )
        return [name for name in engines if name in names]  # baselines first: yardsticks

    return parse


def workload_parser(
    prog: str,
    description: str,
    engines: Sequence[str],
    baselines: str,
    sessions: Sequence[int] = (1000, 4000),
) -> argparse.ArgumentParser:
    """The options of the workload, shared by the benchmarks; ``baselines`` ends the
    --engines help (which of them the ratios need)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--sessions",
        type=_positive,
        nargs="+",
        default=list(sessions),
        help="session counts to run, each a fresh run; the growth between the smallest and "
        "the largest shows whether descriptors and threads stay flat (default: "
        f"{' '.join(map(str, sessions))})",
    )
    parser.add_argument(
        "--messages", type=_messages, default=20, help="messages per session (default: 20)"
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=16, help="concurrent asyncio tasks (default: 16)"
    )
    parser.add_argument(
        "--engines",
        type=engine_list(engines),
        default=list(engines),
        help=f"comma-separated, from {','.join(engines)} (default: all; {baselines})",
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        help="runs of each engine per scale, interleaved; the best is reported (default: 1)",
    )
    parser.add_argument(
        "--read-rounds",
        type=_positive,
        default=5,
        help="passes over every session in each read phase, so the phases last long enough "
        "to time (default: 5)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = workload_parser(
        "python -m bench.append_read",
        "Append and read throughput of sessionkeeper's engines beside raw sqlite3.",
        ENGINES,
        "raw is the baseline the ratios need",
    )
    return parser.parse_args(argv)


def run_scales(
    scales: Sequence[int],
    engines: Sequence[str],
    repeat: int,
    measure_one: Callable[[str, int], EngineRun],
    baselines: dict[str, str],
    sessionless: Collection[str],
    targets: Sequence[TargetRule],
) -> tuple[list[dict[str, Any]], dict[int, dict[str, EngineRun]]]:
    """Each scale: every engine ``repeat`` times, interleaved, then each phase's best with
    ratios against ``baselines[engine]`` and the targets checked. Returns the report's
    scales and the best run of each engine at each scale."""
    scale_reports: list[dict[str, Any]] = []
    runs: dict[int, dict[str, EngineRun]] = {}
    for n in scales:
        tries: dict[str, list[EngineRun]] = {engine: [] for engine in engines}
        for _ in range(repeat):
            for engine in engines:
                tries[engine].append(measure_one(engine, n))
        runs[n] = {engine: best(found) for engine, found in tries.items()}
        by_engine = {
            engine: figures(run, runs[n].get(baselines[engine]), engine not in sessionless)
            for engine, run in runs[n].items()
        }
        scale_reports.append(
            {
                "sessions": n,
                "engines": by_engine,
                "targets": check_targets(by_engine, targets),
                "phases": {
                    engine: {name: asdict(p) for name, p in run.phases.items()}
                    for engine, run in runs[n].items()
                },
                "resources": {
                    engine: [asdict(r) for r in run.resources] for engine, run in runs[n].items()
                },
            }
        )
    return scale_reports, runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scales: list[int] = sorted(set(args.sessions))
    folder = Path(tempfile.mkdtemp(prefix="sessionkeeper-bench-"))
    report: dict[str, Any] = {
        "config": {
            "sessions": scales,
            "messages": args.messages,
            "concurrency": args.concurrency,
            "engines": args.engines,
            "repeat": args.repeat,
            "read_rounds": args.read_rounds,
        },
        "environment": {
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "scales": [],
    }

    def measure_one(engine: str, n: int) -> EngineRun:
        return measure(engine, folder, n, args.messages, args.concurrency, args.read_rounds)

    try:
        report["scales"], runs = run_scales(
            scales,
            args.engines,
            args.repeat,
            measure_one,
            baselines=dict.fromkeys(ENGINES, "raw"),
            sessionless={"raw"},
            targets=TARGETS,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["growth"] = growth(runs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
