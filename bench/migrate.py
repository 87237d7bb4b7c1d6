"""The migrate benchmark: sessions per second and peak memory, SQLite to PostgreSQL.

For each ``--sessions`` count: a fresh SQLite store is filled with that many sessions of
``--messages`` messages each (loaded through the store, not timed), then
``transfer.migrate`` copies it into a PostgreSQL schema of its own, in a child process
that reports its own peak resident memory (``ru_maxrss``), so each size is measured from
a clean process. The destination is counted, then its schema dropped (also on failure).
Memory should stay flat as the count grows: migrate streams a page of ids at a time and
holds at most ``--concurrency`` sessions.

    python -m bench.migrate                        # 10,000 then 40,000 sessions
    python -m bench.migrate --sessions 100000      # the issue's size (a few minutes)
    python -m bench.migrate --json

Progress goes to stderr, results to stdout. "CPU ms/s" is the migrating process's CPU
time per session copied (its event loop and SQLite's threads; PostgreSQL's own CPU is not
in it): it moves far less than the rates when other work shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from sessionkeeper import SessionStore, open_store
from sessionkeeper.models import MessageRecord, SessionRecord
from sessionkeeper.transfer import migrate

DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/test"
CHILD_TIMEOUT = 3600.0
_CONTENT = (
    "Could you summarise the draft so far and suggest two clearer headings for the "
    "section on onboarding? Keep the tone friendly and the answer under 120 words."
)


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return -1.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the source ------------------------------------------------------------------------


def _session(n: int, messages: int, now: float) -> tuple[SessionRecord, list[MessageRecord]]:
    session_id = f"bench-{n:07}"
    created = now - 86_400 + n * 0.001
    records = [
        MessageRecord(
            session_id=session_id,
            seq=seq,
            role="user" if seq % 2 else "assistant",
            content=json.dumps(f"{seq}: {_CONTENT}"),
            input_tokens=30 if seq % 2 else 0,
            output_tokens=0 if seq % 2 else 90,
            cost=0.0 if seq % 2 else 0.0009,
            metadata="{}",
            created_at=created + seq,
        )
        for seq in range(1, messages + 1)
    ]
    record = SessionRecord(
        tenant="default",
        id=session_id,
        owner=f"user-{n % 1000}",
        folder=None,
        title=f"Session {n}",
        status="active",
        step="draft",
        metadata='{"source":"bench"}',
        state=json.dumps({"draft": {"title": "Engineer", "n": n}, "notes": ["a", "b"]}),
        version=messages + 1,
        created_at=created,
        updated_at=created + messages,
        expires_at=None,
        idle_ttl=None,
        deadline=None,
        message_count=messages,
        last_seq=messages,
        input_tokens=sum(m.input_tokens for m in records),
        output_tokens=sum(m.output_tokens for m in records),
        cost=sum(m.cost for m in records),
    )
    return record, records


async def fill(store: SessionStore, sessions: int, messages: int) -> None:
    now = time.time()
    batch = 200  # loads in flight at once: SQLite's writer commits them together
    for start in range(0, sessions, batch):
        await asyncio.gather(
            *(
                store.load_session(*_session(n, messages, now))
                for n in range(start, min(start + batch, sessions))
            )
        )
        if start and start % 10_000 == 0:
            _log(f"  filled {start:,} sessions")


# --- the child: one migration, measured ------------------------------------------------


async def child(source: str, destination: str, concurrency: int) -> dict[str, Any]:
    async with open_store(source) as src, open_store(destination) as dst:
        baseline = _rss_mb()
        samples: list[float] = []

        def progress(done: int, total: int) -> None:
            if done % 2000 == 0:
                samples.append(_rss_mb())

        started, cpu = time.perf_counter(), time.process_time()
        report = await migrate(src, dst, concurrency=concurrency, progress=progress)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "copied": report.copied,
        "messages": report.messages,
        "failed": report.failed,
        "seconds": round(seconds, 2),
        "sessions_per_second": round(report.copied / seconds, 1),
        "messages_per_second": round(report.messages / seconds, 1),
        "cpu_ms_per_session": round(cpu * 1000 / max(report.copied, 1), 3),
        "rss_open_mb": round(baseline, 1),
        "rss_mid_mb": round(samples[len(samples) // 2], 1) if samples else None,
        "rss_peak_mb": round(_peak_rss_mb(), 1),
    }


# --- the parent ------------------------------------------------------------------------


def _schema_url(base: str, schema: str) -> str:
    parts = urlsplit(base)
    return parts._replace(query=f"schema={schema}").geturl()


async def _drop_schema(base: str, schema: str) -> None:
    conn = await asyncpg.connect(urlsplit(base)._replace(query="").geturl())
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _count(url: str) -> int:
    async with open_store(url) as store:
        return await store.count_sessions()


def run_size(args: argparse.Namespace, sessions: int, folder: Path) -> dict[str, Any]:
    source = f"sqlite:///{folder / f'source-{sessions}.db'}"
    schema = f"sk_bench_migrate_{secrets.token_hex(4)}"
    destination = _schema_url(args.postgres, schema)
    _log(f"{sessions:,} sessions x {args.messages} messages: filling SQLite")
    started = time.perf_counter()

    async def prepare() -> None:
        async with open_store(source) as store:
            await fill(store, sessions, args.messages)

    asyncio.run(prepare())
    _log(f"  filled in {time.perf_counter() - started:.1f} s; migrating to {schema}")
    try:
        command = [
            sys.executable, "-m", "bench.migrate", "--child", source, destination,
            "--concurrency", str(args.concurrency),
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"the migration failed:\n{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout)
        result["destination_count"] = asyncio.run(_count(destination))
    finally:
        asyncio.run(_drop_schema(args.postgres, schema))
        os.unlink(folder / f"source-{sessions}.db")
    result["sessions"] = sessions
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        source, destination = args.child
        print(json.dumps(asyncio.run(child(source, destination, args.concurrency))))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="sk-bench-migrate-") as folder:
        for sessions in args.sessions:
            results.append(run_size(args, sessions, Path(folder)))
    ok = all(r["destination_count"] == r["sessions"] == r["copied"] for r in results)
    growth = results[-1]["rss_peak_mb"] - results[0]["rss_peak_mb"]
    if args.json:
        print(json.dumps({"results": results, "peak_rss_growth_mb": growth, "ok": ok}, indent=2))
        return 0 if ok else 1
    print(f"migrate SQLite -> PostgreSQL, {args.messages} messages per session, "
          f"concurrency {args.concurrency}")  # fmt: skip
    print(f"{'sessions':>9} {'sessions/s':>11} {'messages/s':>11} {'seconds':>8} "
          f"{'CPU ms/s':>9} {'RSS open':>9} {'RSS mid':>8} {'RSS peak':>9}")  # fmt: skip
    for r in results:
        print(
            f"{r['sessions']:>9,} {r['sessions_per_second']:>11,.0f} "
            f"{r['messages_per_second']:>11,.0f} {r['seconds']:>8.1f} "
            f"{r['cpu_ms_per_session']:>9.2f} "
            f"{r['rss_open_mb']:>7.1f}MB {r['rss_mid_mb'] or 0:>6.1f}MB {r['rss_peak_mb']:>7.1f}MB"
        )
    verdict = "flat" if growth < 20 else "NOT flat"
    print(f"peak RSS growth from {results[0]['sessions']:,} to {results[-1]['sessions']:,} "
          f"sessions: {growth:+.1f} MB ({verdict}); every session copied: {ok}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
