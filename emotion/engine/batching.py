"""Micro-batching across conversations: collect, pack into batches, run, isolate failures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emotion.errors import EmotionError, InferenceFailed, Overloaded, TimedOut, first_line

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    item: Any
    size: float
    future: asyncio.Future
    enqueued: float
    deadline: float


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    splits: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.sizes[size] = self.sizes.get(size, 0) + 1

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


def plan_batches(sizes: Sequence[float], *, max_batch_size: int, max_cost: float = float("inf")) -> list[list[int]]:
    """Group item indices in their order, each into the first batch with room for it (at
    most ``max_batch_size`` items costing at most ``max_cost`` together), so the first
    batch holds the first item. Batches are packed, not padded: an item costs its own
    size whatever its neighbours. The micro-batcher and the synchronous path both batch
    with this."""
    batches: list[list[int]] = []
    costs: list[float] = []
    for i, size in enumerate(sizes):
        for b, batch in enumerate(batches):
            if len(batch) < max_batch_size and costs[b] + size <= max_cost:
                batch.append(i)
                costs[b] += size
                break
        else:
            batches.append([i])
            costs.append(size)
    return batches


def run_isolated(run_batch: Callable[[list[Any]], Sequence[Any]], items: list[Any], stats: BatchStats | None = None) -> list[Any]:
    """Run one batch; if it raises, halve and retry down to the single item, so one bad
    item (or a batch too large for the GPU) fails alone. Returns a result or an
    ``EmotionError`` per item, in order."""
    try:
        results = list(run_batch(items))
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
    except Exception as exc:
        if len(items) == 1:
            return [exc if isinstance(exc, EmotionError) else _wrap(exc)]
        if stats is not None:
            stats.splits += 1
        log.warning("batch of %d failed (%s); retrying in halves", len(items), first_line(exc))
        half = len(items) // 2
        return run_isolated(run_batch, items[:half], stats) + run_isolated(run_batch, items[half:], stats)
    if stats is not None:
        stats.record(len(items))
    return results


class MicroBatcher:
    """Runs ``run_batch`` on one worker thread over batches of concurrently submitted items.

    While a batch runs, new items wait and join the next plan; an idle batcher waits at
    most ``max_wait_ms`` from the first item's arrival for a fuller batch. Items are
    grouped by ``plan_batches`` and run by ``run_isolated``, so one bad item (or an
    out-of-memory batch) fails alone. A full queue answers ``Overloaded`` at once.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        size: Callable[[Any], float] = lambda _item: 1.0,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 512,
        max_batch_cost: float = float("inf"),
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._size = size
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_batch_cost = max_batch_cost
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="emotion-infer")
        self._task: asyncio.Task | None = None
        # Off the queue, not yet answered: waiting to be planned, and in the batch running.
        self._pool: list[_Pending] = []
        self._running: list[_Pending] = []
        # How many waiting items one plan looks at: room to fill a batch around long turns.
        self._plan_window = 4 * max_batch_size
        self._idle_since = 0.0  # when the last batch ended
        self._on_batch = on_batch
        self.stats = BatchStats()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="emotion-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self._queue.empty():
            self._pool.append(self._queue.get_nowait())
        for pending in self._pool + self._running:
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the engine is shutting down"))
        self._pool.clear()
        self._running = []
        self._worker.shutdown(wait=False, cancel_futures=True)

    def submit(self, item: Any, *, timeout_s: float = 30.0) -> asyncio.Future:
        """Queue ``item``; its future has the result. A future, not a coroutine: awaited
        as it is, or with ``wait_for`` or ``gather``, it costs no task of its own."""
        self.start()
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, self._size(item), future, now, now + timeout_s))
        except asyncio.QueueFull:
            raise Overloaded(f"emotion engine is overloaded: {self._queue.maxsize} clips already waiting") from None
        return future

    async def _loop(self) -> None:
        # Continuous batching: after each batch, everything waiting (what was left and what
        # arrived while the batch ran) is planned afresh, and the batch holding the oldest
        # item runs next, so no length starves. Only an idle engine waits for company.
        pool = self._pool
        while True:
            if not pool:
                pool.append(await self._queue.get())
                if pool[0].enqueued >= self._idle_since:  # it did not queue behind a batch
                    await self._gather_while_idle(pool)
            while not self._queue.empty() and len(pool) < self._plan_window:
                pool.append(self._queue.get_nowait())
            pool[:] = self._live(pool)
            if not pool:
                continue
            # The pool is in arrival order, so the first batch holds the oldest item.
            chosen = set(plan_batches([p.size for p in pool], max_batch_size=self.max_batch_size, max_cost=self.max_batch_cost)[0])
            self._running = [p for i, p in enumerate(pool) if i in chosen]
            pool[:] = [p for i, p in enumerate(pool) if i not in chosen]
            await self._run(self._running)
            self._running = []
            self._idle_since = time.monotonic()

    async def _gather_while_idle(self, pool: list[_Pending]) -> None:
        # The wait is counted from the oldest item's arrival, and ends early once a batch is full.
        close_at = pool[0].enqueued + self.max_wait_s
        cost = pool[0].size
        while len(pool) < self.max_batch_size and cost < self.max_batch_cost:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return
            try:
                pool.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                return
            cost += pool[-1].size

    @staticmethod
    def _live(group: list[_Pending]) -> list[_Pending]:
        now = time.monotonic()
        live = []
        for p in group:
            if p.future.done():
                continue
            if now > p.deadline:
                p.future.set_exception(TimedOut("the clip waited too long for inference"))
            else:
                live.append(p)
        return live

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        results = await loop.run_in_executor(self._worker, run_isolated, self._run_batch, [p.item for p in batch], self.stats)
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        for p, result in zip(batch, results):
            if not p.future.done():
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)


def _wrap(exc: Exception) -> EmotionError:
    wrapped = InferenceFailed(f"inference failed: {type(exc).__name__}: {first_line(exc)}")
    wrapped.__cause__ = exc
    return wrapped
