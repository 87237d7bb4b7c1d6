"""Calls that arrive within one event-loop turn, run together: the batching the server
engines share (PostgreSQL sends a turn's appends as one statement, Redis as one script).

No driver is imported here; each engine gives the function that runs a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["MAX_JOBS", "MAX_SIZE", "Turns", "Waiting"]

# The most jobs, and messages, one batch carries: a batch must stay well within the
# server timeout.
MAX_JOBS = 64
MAX_SIZE = 2000


class Waiting:
    """A call waiting for its batch: ``future`` gets its result, or its error."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def settle(self, result: object) -> None:
        if not self.future.done():  # its caller may have been cancelled
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Sized(Protocol):
    @property
    def size(self) -> int:
        """How many messages the job writes or reads at most."""
        ...


J = TypeVar("J", bound=_Sized)


class Turns(Generic[J]):
    """Jobs that arrive within one event-loop turn, handed to ``run`` together.

    The first job of a turn starts a task; its first step runs in the next turn, after
    every task woken in this one has queued its job, and runs what it finds as one batch,
    then whatever arrived meanwhile, until nothing waits. At most ``limit`` such tasks run
    at once; jobs beyond that wait for a task to finish its batch. ``run`` settles or fails
    every job it is given, and never raises.
    """

    __slots__ = ("_limit", "_pending", "_run", "_runners", "_tasks")

    def __init__(self, run: Callable[[list[J]], Awaitable[None]], limit: int) -> None:
        self._run = run
        self._limit = limit
        self._pending: list[J] = []
        self._runners = 0
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references

    def add(self, job: J) -> None:
        self._pending.append(job)
        if len(self._pending) == 1 and self._runners < self._limit:
            self._runners += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[J]:
        """The next batch: the oldest waiting jobs, within MAX_JOBS and MAX_SIZE."""
        pending = self._pending
        end, size = 0, 0
        while end < len(pending) and end < MAX_JOBS:
            size += pending[end].size
            if end and size > MAX_SIZE:
                break
            end += 1
        jobs = pending[:end]
        del pending[:end]
        return jobs

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._run(self._take())
        finally:
            self._runners -= 1
