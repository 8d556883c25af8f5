"""Batches of concurrent stage calls, formed when the stage is free to run them.

A stage replica should run, as its next batch, every call that arrived while its last forward ran: that is the
engine's step loop, fed by concurrent calls. Ray Serve's `@serve.batch` (2.60, `batching.py`) does not: its loop
forms the next batch as soon as the previous one has *started* (the `max_concurrent_batches` semaphore is taken
inside the batch's task), from the calls that arrive within `batch_wait_timeout_s` of that batch's first call, and
queues it behind the running one. Calls that arrive one after another during a long forward then run as batches
of one, one after another. Measured here: five calls 0.2 s apart during a 1 s forward ran as five batches (5 s)
where two (2 s) would do; eight streams on the full-size decoder split into batches of 2, 2 and 4 that never
merged, each round of updates costing three forwards instead of one (BENCHMARKS.md, "Served pipeline").

`StageBatcher` forms each batch when the stage becomes free: every call waiting then, up to `max_batch_size`, and
the callers of the batch just run if they come back within the batch wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class StageBatcher(Generic[Request, Result]):
    """`await batcher.submit(request)` -> its result from `run(batch)`, one batch at a time.

    When the stage is free, the next batch is every call waiting (up to `max_batch_size`; the rest go into the one
    after). A call that finds the stage idle waits up to `wait_s` for others to join it (calls of the same moment,
    e.g. streams whose blocks completed together), less once the batch is full. After a batch, the next one waits
    up to `wait_s` for the callers just answered to come back, less once they all have (or the batch is full). `run` gets the requests in arrival
    order and returns one result per request, in order; its error goes to every caller of the batch. A caller that
    gave up (cancelled) before its batch formed is left out of it."""

    def __init__(
        self, run: Callable[[list[Request]], Awaitable[list[Result]]], max_batch_size: int, wait_s: float
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}; expected at least 1")
        if wait_s < 0:
            raise ValueError(f"wait_s={wait_s}; expected a wait of 0 s or more")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._waiting: deque[tuple[Request, asyncio.Future[Result]]] = deque()
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(self, request: Request) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        self._arrived.set()
        if self._loop_task is None or self._loop_task.done():  # the stage is idle: this call starts its loop
            self._loop_task = asyncio.create_task(self._serve_batches())
        return await future

    async def _serve_batches(self) -> None:
        """Run batches while calls are waiting. The first waits for the calls of its moment (up to a full batch);
        each later one also for the callers the last batch answered, which may come straight back (a stream whose
        next block was encoded during its update): without that wait, streams in step would split into two
        groups that alternate on the stage, the one just answered always missing the batch of the other."""
        enough = self.max_batch_size
        while True:
            await self._wait_for_company(enough)
            batch = self._take()
            if not batch:
                return
            await self._run_batch(batch)
            enough = min(self.max_batch_size, len(self._waiting) + len(batch))

    async def _wait_for_company(self, enough: int) -> None:
        """Up to `wait_s`, or until `enough` calls are waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(self._waiting) < enough and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[tuple[Request, asyncio.Future[Result]]]:
        """The next batch: the waiting calls in arrival order, up to `max_batch_size` of those still waiting."""
        batch: list[tuple[Request, asyncio.Future[Result]]] = []
        while self._waiting and len(batch) < self.max_batch_size:
            request, future = self._waiting.popleft()
            if not future.done():  # a cancelled caller is left out
                batch.append((request, future))
        return batch

    async def _run_batch(self, batch: list[tuple[Request, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([request for request, _ in batch])
            if len(results) != len(batch):
                raise ValueError(f"the stage returned {len(results)} results for a batch of {len(batch)} calls")
        except Exception as error:  # not swallowed: every caller of the batch gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
