"""Writers killed with SIGKILL at random moments lose nothing they acknowledged.

On the files and SQLite engines, through the URLs the README documents: round after round,
a fresh writer process appends messages (calls of one to three) to a few sessions and
prints a line for each call acknowledged, until it is killed with SIGKILL after a random
20-200 ms. After each kill the store opens cleanly and every message is checked: seqs run
1..last_seq with no gap, each message is exactly what its call wrote (no torn content),
each call is there whole or not at all, every acknowledged call is there, the aggregates
match, and (files) no temp file is left.

Writers are forked from one helper process that imported sessionkeeper once, so a round
costs a fork, not an interpreter start. ``SK_CRASH_KILLS`` sets the kills per engine
(default 100; ``SK_CRASH_KILLS=1000`` for the heavier run).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sessionkeeper import Message, SessionStore, open_store

KILLS = int(os.environ.get("SK_CRASH_KILLS", "100"))
SESSIONS = ("alpha", "beta", "gamma")
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


# --- what a writer writes, computed again by the checker -------------------------------


def calls_size(round_no: int, call: int) -> int:
    """How many messages call ``call`` of round ``round_no`` appends (one to three)."""
    return 1 + (round_no * 7 + call) % 3


def target(call: int) -> str:
    return SESSIONS[call % len(SESSIONS)]


def message(round_no: int, call: int, j: int) -> dict[str, Any]:
    """The j-th message of a call: content of 0.1-8 KB, so writes cross pages."""
    pad = (round_no * 7919 + call * 104_729 + j * 15_485_863) % 8000
    return {
        "role": "assistant" if j % 2 else "user",
        "content": {"r": round_no, "c": call, "j": j, "pad": "x" * (100 + pad)},
        "input_tokens": round_no * 1000 + call,
        "output_tokens": j + 1,
        "cost": ((round_no * 31 + call * 7 + j) % 97) / 1000,
        "metadata": {"call": call},
    }


# --- the writer and the helper that forks it -------------------------------------------


async def write_until_killed(url: str, round_no: int) -> None:
    async with open_store(url) as store:
        for call in range(1_000_000):
            drafts = [message(round_no, call, j) for j in range(calls_size(round_no, call))]
            appended = await store.append_messages(target(call), drafts)
            seqs = " ".join(str(m.seq) for m in appended)
            print(f"{round_no} {call} {target(call)} {seqs}", flush=True)


def zygote() -> None:
    """Read ``run URL ROUND ACKS`` and ``reap PID`` lines; fork a writer for each run
    (its stdout to the ACKS file) and answer with its pid; reap and answer with the
    status. Runs in a process of its own, with sessionkeeper imported and no store."""
    for line in sys.stdin:
        command, *args = line.split()
        if command == "run":
            url, round_no, acks = args
            pid = os.fork()
            if pid == 0:  # the writer: its output goes to the ACKS file
                out = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(out, 1)
                os.dup2(out, 2)
                try:
                    asyncio.run(write_until_killed(url, int(round_no)))
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    os._exit(3)
            print(pid, flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            print(status, flush=True)


@pytest.fixture
def writers() -> Iterator[subprocess.Popen[str]]:
    helper = subprocess.Popen(
        [sys.executable, "-c", "from tests.test_crash import zygote; zygote()"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield helper
    assert helper.stdin is not None
    assert helper.stdout is not None
    helper.stdin.close()
    helper.wait(30)
    helper.stdout.close()


def ask(helper: subprocess.Popen[str], line: str) -> str:
    assert helper.stdin is not None
    assert helper.stdout is not None
    helper.stdin.write(line + "\n")
    helper.stdin.flush()
    return helper.stdout.readline().strip()


# --- the checker -----------------------------------------------------------------------


@dataclass
class Seen:
    """What the checker has verified of one session so far."""

    last_seq: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    calls: set[tuple[int, int]] = field(default_factory=set)


async def read_after(store: SessionStore, session_id: str, after: int) -> list[Message]:
    found: list[Message] = []
    while True:
        page = await store.read_messages(session_id, after_seq=after, limit=1000)
        if not page:
            return found
        found += page
        after = page[-1].seq


async def check(
    url: str, seen: dict[str, Seen], acked: list[tuple[int, int, str, list[int]]]
) -> int:
    """Verify what the writers left since the last check; return how many messages."""
    count = 0
    async with open_store(url) as store:
        placed: dict[tuple[str, int], tuple[int, int, int]] = {}
        for session_id in SESSIONS:
            mine = seen[session_id]
            session = await store.get_session(session_id)
            new = await read_after(store, session_id, mine.last_seq)
            assert [m.seq for m in new] == list(range(mine.last_seq + 1, session.last_seq + 1))
            by_call: dict[tuple[int, int], list[Message]] = {}
            for m in new:
                r, c, j = m.content["r"], m.content["c"], m.content["j"]
                expected = message(r, c, j)
                got = {
                    "role": m.role,
                    "content": m.content,
                    "input_tokens": m.input_tokens,
                    "output_tokens": m.output_tokens,
                    "cost": m.cost,
                    "metadata": m.metadata,
                }
                assert got == expected, f"{session_id} seq {m.seq} is not what was written"
                assert target(c) == session_id
                by_call.setdefault((r, c), []).append(m)
                placed[session_id, m.seq] = (r, c, j)
                mine.input_tokens += m.input_tokens
                mine.output_tokens += m.output_tokens
                mine.cost += m.cost
            for (r, c), messages in by_call.items():  # each call whole, in one piece
                assert (r, c) not in mine.calls, f"call {r}/{c} appended twice"
                mine.calls.add((r, c))
                assert [m.content["j"] for m in messages] == list(range(calls_size(r, c)))
                assert [m.seq for m in messages] == list(
                    range(messages[0].seq, messages[0].seq + len(messages))
                )
            mine.last_seq = session.last_seq
            count += len(new)
            assert session.message_count == session.last_seq  # nothing was ever popped
            assert session.input_tokens == mine.input_tokens
            assert session.output_tokens == mine.output_tokens
            assert session.cost == pytest.approx(mine.cost)
        for r, c, session_id, seqs in acked:
            for j, seq in enumerate(seqs):
                assert placed.get((session_id, seq)) == (r, c, j), (
                    f"acknowledged call {r}/{c} is not at {session_id} seq {seq}"
                )
    return count


def acknowledged(path: Path) -> list[tuple[int, int, str, list[int]]]:
    """The calls a writer acknowledged (a last line cut by the kill does not count)."""
    found: list[tuple[int, int, str, list[int]]] = []
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n") or not line[0].isdigit():
            continue
        r, c, session_id, *seqs = line.split()
        found.append((int(r), int(c), session_id, [int(s) for s in seqs]))
    return found


# --- the test --------------------------------------------------------------------------

URLS = {
    "files": "file://{tmp}/store",  # file:///abs/dir, tmp being absolute
    "sqlite": "sqlite:///{tmp}/store.db",  # sqlite:////abs/path.db
}


@pytest.mark.parametrize("engine", list(URLS))
async def test_killed_writers_lose_nothing_acknowledged(
    engine: str, tmp_path: Path, writers: subprocess.Popen[str]
) -> None:
    url = URLS[engine].format(tmp=tmp_path)
    assert url.startswith(("file:///", "sqlite:////"))
    async with open_store(url) as store:
        for session_id in SESSIONS:
            await store.create_session(session_id=session_id)
    rng = random.Random(f"{engine}-{KILLS}")
    seen = {session_id: Seen() for session_id in SESSIONS}
    started = time.perf_counter()
    messages = killed = 0
    for round_no in range(1, KILLS + 1):
        acks = tmp_path / f"acks-{round_no}.txt"
        pid = int(ask(writers, f"run {url} {round_no} {acks}"))
        await asyncio.sleep(rng.uniform(0.02, 0.2))
        os.kill(pid, signal.SIGKILL)
        status = int(ask(writers, f"reap {pid}"))
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
        else:
            pytest.fail(f"round {round_no}: the writer ended by itself:\n{acks.read_text()}")
        messages += await check(url, seen, acknowledged(acks))
        if engine == "files":
            assert not list((tmp_path / "store" / "tmp").iterdir()), "a temp file was left"
            assert not list((tmp_path / "store").rglob("*.tmp"))
    # everything once more, from the start
    for session_id in SESSIONS:
        seen[session_id] = Seen()
    assert await check(url, seen, []) == messages
    elapsed = time.perf_counter() - started
    print(f"\n{engine}: {killed} writers killed, {messages} messages checked, {elapsed:.1f} s")
    assert killed == KILLS
    assert messages > KILLS  # the writers did get to write
