"""Batches of concurrent stage calls, formed when the stage is free to run them.

A stage replica should run, as its next batch, every call that arrived while its last forward ran: that is the
engine's step loop, fed by concurrent calls. Ray Serve's `@serve.batch` (2.60, `batching.py`) does not: its loop
forms the next batch as soon as the previous one has *started* (the `max_concurrent_batches` semaphore is taken
inside the batch's task), from the calls that arrive within `batch_wait_timeout_s` of that batch's first call, and
queues it behind the running one. Calls that arrive one after another during a long forward then run as batches
of one, one after another. Measured here: five calls 0.2 s apart during a 1 s forward ran as five batches (5 s)
where two (2 s) would do; eight streams on the full-size decoder split into batches of 2, 2 and 4 that never
merged, each round of updates costing three forwards instead of one (BENCHMARKS.md, "Served pipeline").

`StageBatcher` forms each batch when the stage becomes free: every call waiting then, up to `max_batch_size`.
After a batch it also waits for those of the batch's callers that come straight back, the ones that came back
within the batch wait after their previous answer (a backlogged stream whose next block is ready). A caller that
does not (a live stream whose next block is seconds of audio away) is not waited for: waiting for it would hold a
free stage idle for the whole batch wait after every batch while other streams' calls queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class StageBatcher(Generic[Request, Result]):
    """`await batcher.submit(request, caller)` -> its result from `run(batch)`, one batch at a time.

    When the stage is free, the next batch is every call waiting (up to `max_batch_size`; the rest go into the one
    after). A call that finds the stage idle waits up to `wait_s` for others to join it (calls of the same moment,
    e.g. streams whose blocks completed together), less once the batch is full. After a batch, the next one waits
    up to `wait_s` for the batch's prompt callers to come back, less once they all have (or the batch is full): a
    caller (a stream) is prompt when its call came within `wait_s` of its previous answer. `run` gets the requests
    in arrival order and returns one result per request, in order; its error goes to every caller of the batch. A
    caller that gave up (cancelled) before its batch formed is left out of it."""

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
        self._waiting: deque[_Call[Request, Result]] = deque()
        self._answered_at: dict[Hashable, float] = {}  # callers answered within the last `wait_s`: when
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(self, request: Request, caller: Hashable | None = None) -> Result:
        """`request`'s result. `caller`: who sends it (a stream), to learn whether it comes straight back; None: an
        anonymous call, never waited for."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        answered_at = self._answered_at.get(caller)
        prompt = answered_at is not None and loop.time() - answered_at <= self.wait_s
        self._waiting.append(_Call(request, future, caller, prompt))
        self._arrived.set()
        if self._loop_task is None or self._loop_task.done():  # the stage is idle: this call starts its loop
            self._loop_task = asyncio.create_task(self._serve_batches())
        return await future

    async def _serve_batches(self) -> None:
        """Run batches while calls are waiting. The first waits for the calls of its moment (up to a full batch);
        each later one also for the last batch's prompt callers, which are likely to come straight back again (a
        stream whose next block was encoded during its update): without that wait, streams in step would split
        into two groups that alternate on the stage, the one just answered always missing the batch of the
        other."""
        loop = asyncio.get_running_loop()
        enough = self.max_batch_size
        while True:
            await self._wait_for_company(enough)
            batch = self._take()
            if not batch:
                return
            await self._run_batch(batch)
            now = loop.time()
            self._answered_at = {c: t for c, t in self._answered_at.items() if now - t <= self.wait_s}
            self._answered_at.update((call.caller, now) for call in batch if call.caller is not None)
            returning = sum(call.prompt for call in batch)
            enough = min(self.max_batch_size, len(self._waiting) + returning)

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

    def _take(self) -> list[_Call[Request, Result]]:
        """The next batch: the waiting calls in arrival order, up to `max_batch_size` of those still waiting."""
        batch: list[_Call[Request, Result]] = []
        while self._waiting and len(batch) < self.max_batch_size:
            call = self._waiting.popleft()
            if not call.future.done():  # a cancelled caller is left out
                batch.append(call)
        return batch

    async def _run_batch(self, batch: list[_Call[Request, Result]]) -> None:
        try:
            results = await self._run([call.request for call in batch])
            if len(results) != len(batch):
                raise ValueError(f"the stage returned {len(results)} results for a batch of {len(batch)} calls")
        except Exception as error:  # not swallowed: every caller of the batch gets it
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(error)
            return
        for call, result in zip(batch, results):
            if not call.future.done():
                call.future.set_result(result)


@dataclass(frozen=True)
class _Call(Generic[Request, Result]):
    request: Request
    future: asyncio.Future[Result]
    caller: Hashable | None
    prompt: bool  # it came within the batch wait of the caller's previous answer
