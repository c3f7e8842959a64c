"""Dynamic batching for one replica (asyncio, no Ray): requests queue while a batch computes, and the
next batch takes up to `max_size` of them, so batches grow with the load; one batch at a time.

Not `serve.batch`: it forms the next batch while the current one computes (a few rows, waiting for the
compute), so with the compute off the event loop batches stayed at ~4 rows under a load of 16
(bench/serve_health.py); and it splits every batch by multiplexed model id, so adapters of one base
never shared a forward pass."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable


class Batcher:
    def __init__(self, handle: Callable[[list], Awaitable[list]], max_size: int, wait_s: float):
        self.handle, self.max_size, self.wait_s = handle, max_size, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.sizes: list[int] = []  # batch sizes, for stats

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work(), context=contextvars.Context())  # not this request's
        return await future

    async def _next(self) -> list:
        batch = [await self.queue.get()]
        if self.queue.qsize() < self.max_size - 1:
            await asyncio.sleep(self.wait_s)  # let a burst arrive
        while len(batch) < self.max_size and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return [(item, future) for item, future in batch if not future.done()]  # done: the caller went away

    async def _work(self) -> None:
        while True:
            batch = await self._next()
            if not batch:
                continue
            self.sizes.append(len(batch))
            try:
                results = await self.handle([item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 — every caller of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
