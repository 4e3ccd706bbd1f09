"""Micro-batching across conversations: collect, bucket by length, run, isolate failures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emotion.errors import EmotionError, InferenceFailed, Overloaded, TimedOut

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


class MicroBatcher:
    """Runs ``run_batch`` on one worker thread over batches of concurrently submitted items.

    A batch closes when it holds ``max_batch_size`` items or when its oldest item has
    waited ``max_wait_ms``. Items are sorted by ``size`` and split so that no batch pads
    an item to more than twice its size and no batch exceeds ``max_batch_cost`` once
    padded. If ``run_batch`` raises, the batch is halved and retried, so one bad item (or
    an out-of-memory batch) fails alone. A full queue answers ``Overloaded`` at once.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        size: Callable[[Any], float] = lambda _item: 1.0,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
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
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the engine is shutting down"))
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: Any, *, timeout_s: float = 30.0) -> Any:
        self.start()
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(item, self._size(item), future, now, now + timeout_s)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Overloaded(f"emotion engine is overloaded: {self._queue.maxsize} clips already waiting") from None
        return await future

    async def _loop(self) -> None:
        while True:
            first = await self._queue.get()
            group = [first]
            cost = first.size
            # The wait is counted from the oldest item's arrival: items that queued while the
            # previous batch ran have waited already and go at once.
            close_at = first.enqueued + self.max_wait_s
            while len(group) < self.max_batch_size and cost < self.max_batch_cost:
                if not self._queue.empty():
                    group.append(self._queue.get_nowait())
                    cost += group[-1].size
                    continue
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    group.append(await asyncio.wait_for(self._queue.get(), remaining))
                    cost += group[-1].size
                except TimeoutError:
                    break
            for batch in self._buckets(group):
                await self._run(batch)

    def _buckets(self, group: list[_Pending]) -> list[list[_Pending]]:
        now = time.monotonic()
        live = []
        for p in group:
            if p.future.done():
                continue
            if now > p.deadline:
                p.future.set_exception(TimedOut("the clip waited too long for inference"))
            else:
                live.append(p)
        live.sort(key=lambda p: p.size, reverse=True)
        batches: list[list[_Pending]] = []
        for p in live:
            current = batches[-1] if batches else None
            if (
                current is not None
                and len(current) < self.max_batch_size
                and p.size * 2 >= current[0].size
                and (len(current) + 1) * current[0].size <= self.max_batch_cost
            ):
                current.append(p)
            else:
                batches.append([p])
        return batches

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._worker, self._run_batch, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc if isinstance(exc, EmotionError) else _wrap(exc))
                return
            self.stats.splits += 1
            log.warning("batch of %d failed (%s); retrying in halves", len(batch), exc)
            half = len(batch) // 2
            await self._run(batch[:half])
            await self._run(batch[half:])
            return
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        for p, result in zip(batch, results):
            if not p.future.done():
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)


def _wrap(exc: Exception) -> EmotionError:
    wrapped = InferenceFailed(f"inference failed: {type(exc).__name__}: {str(exc)[:200]}")
    wrapped.__cause__ = exc
    return wrapped
