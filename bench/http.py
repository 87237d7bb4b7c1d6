"""The HTTP benchmark: requests per second over loopback, beside a bare FastAPI route.

Two servers run as processes of their own, each one uvicorn process started the same way
(``uvicorn.run(app, host, port, access_log=False)``, uvicorn's defaults otherwise):

- ``sessionkeeper serve`` over ``--url`` (default: SQLite in a fresh temporary folder),
  with an API key made before it starts;
- ``bare``: a FastAPI app with one route that does nothing (``GET /noop`` -> ``{}``).

One client process (this one) sends requests from ``--concurrency`` keep-alive
connections, with a minimal HTTP/1.1 client on asyncio streams (so the client costs far
less than the servers), in four phases, each bounded by ``--requests`` and ``--seconds``:

1. ``bare``: ``GET /noop`` on the bare app;
2. ``create``: ``POST /v1/sessions`` with ``{"owner": ...}``;
3. ``append``: ``POST /v1/sessions/{id}/messages``, one message, round-robin over the
   sessions created so far;
4. ``read-last-10``: ``GET /v1/sessions/{id}/messages?last=10``, round-robin.

Each phase is cut into ``--rounds`` slices run in turn (bare, create, append, read, bare,
create, ...), so a machine whose load changes during the run weighs on every phase alike.
Every response's status is checked, so a fast error cannot pass for speed. The table
prints requests/s, latency percentiles, the server process's CPU time per request (all
its threads; it moves much less than wall time on a busy machine) and each phase as a
ratio of ``bare``, by rate and by CPU.

Run it as a module (``bench/http.py`` run as a script would hide the standard library's
``http`` package):

    python -m bench.http [--requests 5000] [--seconds 15] [--concurrency 16] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sessionkeeper import Settings, open_store
from sessionkeeper.keys import create_key

SESSIONKEEPER = str(Path(sys.executable).with_name("sessionkeeper"))
BARE = """
import sys, uvicorn
from fastapi import FastAPI
app = FastAPI()

@app.get("/noop")
async def noop() -> dict[str, str]:
    return {}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Server:
    """A server process on a free loopback port, stopped by ``stop``."""

    def __init__(self, command: list[str], port: int, env: dict[str, str]) -> None:
        self.port = port
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                connection = await Connection.open(self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            status, _ = await connection.request("GET", path)
            connection.close()
            if status == 200:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the server did not start within 30 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Connection:
    """One keep-alive HTTP/1.1 connection; responses must carry Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: bytes = b""
    ) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + headers + b"\r\n" + body)
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Phase:
    """What one phase measured, summed over its rounds."""

    name: str
    requests: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)

    def figures(self, bare: Phase) -> dict[str, Any]:
        latencies = sorted(self.latencies)
        count = len(latencies)
        rate = count / self.seconds
        cpu_us = self.cpu_seconds / count * 1e6
        return {
            "name": self.name,
            "requests": count,
            "seconds": round(self.seconds, 3),
            "rate": round(rate, 1),
            "p50_ms": round(latencies[count // 2] * 1000, 2),
            "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] * 1000, 2),
            "server_cpu_us": round(cpu_us, 1),
            "ratio": round(rate / (len(bare.latencies) / bare.seconds), 3),
            "cpu_ratio": round((bare.cpu_seconds / len(bare.latencies) * 1e6) / cpu_us, 3),
        }


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: makes request ``i``: (method, path, body, expected status)
Make = Callable[[int], tuple[str, str, bytes, int]]


async def run_slice(
    phase: Phase,
    server: Server,
    headers: bytes,
    make: Make,
    numbers: range,
    seconds: float,
    concurrency: int,
) -> dict[int, bytes]:
    """Send requests ``numbers`` (stopping after ``seconds``) from ``concurrency``
    connections; add what was measured to ``phase``; return the bodies by number."""
    connections = [await Connection.open(server.port) for _ in range(concurrency)]
    bodies: dict[int, bytes] = {}
    counter = iter(numbers)
    cpu_before = _cpu_seconds(server.process.pid)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(connection: Connection) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            method, path, body, expected = make(i)
            sent = time.perf_counter()
            status, answer = await connection.request(method, path, body, headers)
            phase.latencies.append(time.perf_counter() - sent)
            if status != expected:
                raise RuntimeError(f"{phase.name}: {method} {path} gave {status}: {answer[:200]!r}")
            bodies[i] = answer

    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    phase.seconds += time.perf_counter() - started
    phase.cpu_seconds += _cpu_seconds(server.process.pid) - cpu_before
    return bodies


async def _make_key(url: str) -> str:
    async with open_store(url, settings=Settings(url=url)) as store:
        return (await create_key(store, tenant="bench"))[1]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="sessionkeeper-bench-http-"))
    url = args.url or f"sqlite:///{folder / 'bench.db'}"
    token = await _make_key(url)
    bare_port, sk_port = _free_port(), _free_port()
    env = {"SESSIONKEEPER_HTTP_ACCESS_LOG": "true" if args.access_log else "false"}
    bare = Server([sys.executable, "-c", BARE, str(bare_port)], bare_port, env)
    served = Server([SESSIONKEEPER, "--url", url, "serve", "--port", str(sk_port)], sk_port, env)
    auth = f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n".encode()
    message = (
        b'{"messages": [{"role": "user", "content": "How far is Lisbon?", "input_tokens": 9}]}'
    )
    ids: list[str] = []

    def created(i: int) -> str:
        return ids[i % len(ids)]

    phases = {name: Phase(name) for name in ("bare", "create", "append", "read-last-10")}
    work: list[tuple[Phase, Server, bytes, Make]] = [
        (phases["bare"], bare, b"", lambda i: ("GET", "/noop", b"", 200)),
        (
            phases["create"],
            served,
            auth,
            lambda i: ("POST", "/v1/sessions", f'{{"owner": "u{i % 100}"}}'.encode(), 201),
        ),
        (
            phases["append"],
            served,
            auth,
            lambda i: ("POST", f"/v1/sessions/{created(i)}/messages", message, 201),
        ),
        (
            phases["read-last-10"],
            served,
            auth,
            lambda i: ("GET", f"/v1/sessions/{created(i)}/messages?last=10", b"", 200),
        ),
    ]
    per_round = max(args.requests // args.rounds, 1)
    try:
        await bare.wait_ready("/noop")
        await served.wait_ready("/healthz")
        for round_ in range(args.rounds):
            numbers = range(round_ * per_round, (round_ + 1) * per_round)
            for phase, server, headers, make in work:
                bodies = await run_slice(
                    phase,
                    server,
                    headers,
                    make,
                    numbers,
                    args.seconds / args.rounds,
                    args.concurrency,
                )
                if phase.name == "create":
                    ids.extend(json.loads(bodies[i])["id"] for i in sorted(bodies))
    finally:
        bare.stop()
        served.stop()
        if args.url is None:
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "url": url if args.url else "sqlite (temporary file)",
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "access_log": args.access_log,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "phases": [p.figures(phases["bare"]) for p in phases.values()],
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"HTTP over loopback: sessionkeeper serve on {result['url']} beside a bare FastAPI "
        f"route; {result['concurrency']} connections, {result['rounds']} rounds, access log "
        f"{'on' if result['access_log'] else 'off'}, Python {result['python']}, "
        f"{result['cpus']} CPUs, load average {result['load_average']:.1f}",
        f"{'phase':<14}{'requests':>9}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'server CPU us/req':>19}{'vs bare: rate':>15}{'CPU':>7}",
    ]
    for p in result["phases"]:
        lines.append(
            f"{p['name']:<14}{p['requests']:>9}{p['rate']:>9,.0f}{p['p50_ms']:>8.2f}"
            f"{p['p99_ms']:>8.2f}{p['server_cpu_us']:>19,.0f}{p['ratio']:>14.2f}x"
            f"{p['cpu_ratio']:>6.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="store URL (default: SQLite in a temporary folder)")
    parser.add_argument("--requests", type=int, default=5000, help="most requests per phase")
    parser.add_argument("--seconds", type=float, default=20.0, help="longest phase, seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--rounds", type=int, default=5, help="slices of each phase, in turn")
    parser.add_argument(
        "--access-log", action="store_true", help="keep the JSON access log on (stderr)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args))
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
