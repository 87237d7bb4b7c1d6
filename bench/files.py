"""The files benchmark: sessionkeeper's ``file://`` engine beside raw JSONL files.

The workload is ``bench.append_read``'s (sessions of messages appended one call each from
``--concurrency`` tasks, then full and last-10 reads), run two ways:

- ``raw-jsonl``: what one writes by hand with the standard library: one JSONL file per
  session; an append opens it for appending, writes one line, fsyncs and closes it; a full
  read parses the whole file; a last-10 read parses the last 10 lines, read from the end.
  Blocking calls go through ``asyncio.to_thread`` (the default executor, as many threads
  as the engine's own pool), JSON through the standard library's ``json``.
- ``files``: sessionkeeper over ``file:///<fresh folder>``, which also keeps each session's
  record (aggregates, seq, version), checks the session is live and numbers the message.

Both fsync every append before it returns. The ratios compare the engine with the baseline
measured in the same invocation; the targets are on those.

Run it with ``python -m bench.files`` (``--help`` lists the options); progress goes to
stderr, results to stdout (``--json`` for a machine-readable document).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.append_read import (
    EngineRun,
    StoreTarget,
    Target,
    TargetRule,
    growth,
    growth_lines,
    measure_target,
    resource_lines,
    run_scales,
    table_lines,
    target_lines,
    workload_parser,
)

ENGINES = ("raw-jsonl", "files")
LABELS = {"raw-jsonl": "raw jsonl", "files": "file://"}
BASELINES = dict.fromkeys(ENGINES, "raw-jsonl")
SESSIONLESS = {"raw-jsonl"}  # it keeps no session record: its create phase does nothing
TARGETS: tuple[TargetRule, ...] = (
    ("files appends vs raw jsonl", "files", "append_ratio", ">=", 0.8),
    ("files last-10 vs raw jsonl", "files", "last_ratio", ">=", 0.8),
)
_TAIL_CHUNK = 4096


def _append_line(path: Path, line: bytes) -> None:
    with open(path, "ab") as log:
        log.write(line)
        log.flush()
        os.fsync(log.fileno())


def _read_all(path: Path, limit: int) -> list[int]:
    with open(path, "rb") as log:
        lines = log.read().splitlines()
    return [json.loads(line)["seq"] for line in lines[:limit]]


def _read_last(path: Path, n: int) -> list[int]:
    """The last ``n`` lines, read backwards from the end in chunks."""
    with open(path, "rb") as log:
        end = log.seek(0, os.SEEK_END)
        size = _TAIL_CHUNK
        while True:
            start = max(0, end - size)
            log.seek(start)
            lines = log.read(end - start).splitlines()
            if start > 0:
                lines = lines[1:]  # cut by the window
            if len(lines) >= n or start == 0:
                break
            size *= 4
    return [json.loads(line)["seq"] for line in lines[-n:]]


class RawJsonlTarget:
    """The baseline: one JSONL file per session, open-append-write-fsync-close per line."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def _path(self, session_id: str) -> Path:
        return self._folder / f"{session_id}.jsonl"

    async def open(self) -> None:
        self._folder.mkdir()

    async def close(self) -> None:
        return None

    async def create(self, session_id: str) -> None:
        return None

    async def append(self, session_id: str, seq: int, role: str, content: str) -> None:
        line = json.dumps({"seq": seq, "role": role, "content": content, "at": time.time()})
        await asyncio.to_thread(_append_line, self._path(session_id), f"{line}\n".encode())

    async def read_all(self, session_id: str, limit: int) -> list[int]:
        return await asyncio.to_thread(_read_all, self._path(session_id), limit)

    async def read_last(self, session_id: str, n: int) -> list[int]:
        return await asyncio.to_thread(_read_last, self._path(session_id), n)


def measure(engine: str, folder: Path, sessions: int, args: Any, run: int) -> EngineRun:
    """One engine at one scale in a fresh folder, removed afterwards."""
    where = folder / f"{engine}-{sessions}-{run}"
    target: Target = (
        RawJsonlTarget(where) if engine == "raw-jsonl" else StoreTarget(f"file://{where}")
    )
    try:
        return measure_target(
            engine,
            target,
            sessions,
            args.messages,
            args.concurrency,
            args.read_rounds,
            label=LABELS[engine],
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)


def render(report: dict[str, Any], runs: dict[int, dict[str, EngineRun]]) -> str:
    config, env = report["config"], report["environment"]
    lines = [
        f"files benchmark: {config['messages']} messages per session, one append_message "
        f"call each, {config['concurrency']} tasks, best of {config['repeat']}, "
        f"{config['read_rounds']} read passes, every append fsynced",
        f"python {env['python']}, {env['cpus']} CPUs, {env['platform']}",
        f"folder {env['folder']} on {env['filesystem']}",
    ]
    for scale in report["scales"]:
        n = scale["sessions"]
        reads = n * config["read_rounds"]
        lines.append("")
        lines.append(
            f"== {n} sessions: {n * config['messages']:,} appends, {reads:,} full reads "
            f"(limit {max(100, config['messages'])}), {reads:,} last-10 reads"
        )
        lines += table_lines(scale["engines"], LABELS, "ratio vs raw jsonl")
        lines += target_lines(scale["targets"])
    lines.append("")
    lines += resource_lines(runs, LABELS)
    lines += growth_lines(report["growth"], LABELS)
    return "\n".join(lines)


def _filesystem(folder: Path) -> str:
    """The type of the file system holding ``folder`` (from /proc/mounts), if known."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                mounted_on = fields[1] if len(fields) > 2 else ""
                if str(folder).startswith(mounted_on) and len(mounted_on) > len(best):
                    best, kind = mounted_on, fields[2]
    except OSError:
        pass
    return kind


def main(argv: Sequence[str] | None = None) -> int:
    parser = workload_parser(
        "python -m bench.files",
        "Append and read throughput of sessionkeeper's file:// engine beside raw JSONL files.",
        ENGINES,
        "raw-jsonl is the baseline the ratios need",
        sessions=(500,),
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to make the temporary folder (default: the system's temporary folder); "
        "the file system decides what an fsync costs",
    )
    args = parser.parse_args(argv)
    scales: list[int] = sorted(set(args.sessions))
    folder = Path(tempfile.mkdtemp(prefix="sessionkeeper-bench-files-", dir=args.dir))
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
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "folder": str(folder),
            "filesystem": _filesystem(folder),
        },
    }
    runs_made = 0

    def measure_one(engine: str, n: int) -> EngineRun:
        nonlocal runs_made
        runs_made += 1
        return measure(engine, folder, n, args, runs_made)

    try:
        report["scales"], runs = run_scales(
            scales,
            args.engines,
            args.repeat,
            measure_one,
            baselines=BASELINES,
            sessionless=SESSIONLESS,
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
