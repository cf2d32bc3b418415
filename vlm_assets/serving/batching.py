"""Adaptive batching inside one process: requests that arrive while the encoder is busy wait together and go through
it as one batch when it frees up. An idle encoder takes a lone request at once (no timer to wait out), and under load
batches grow to whatever arrived, up to `max_batch_size`: the batch size follows the load."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np


class MicroBatcher:
    def __init__(self, run: Callable[[list], np.ndarray], max_batch_size: int = 32,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run = run  # items -> (n, ...) array, called in a worker thread, one batch at a time
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self._queue: list[tuple[object, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    def enqueue(self, item) -> asyncio.Future:
        """A future for the row of `run([... item ...])`; the encoder starts on it at the caller's next await, so
        the caller can do other work meanwhile."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return future

    async def submit(self, item) -> np.ndarray:
        """The row of `run([... item ...])` for this item."""
        return await self.enqueue(item)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self.max_batch_size], self._queue[self.max_batch_size:]
            try:
                rows = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as error:  # noqa: BLE001  every waiting request hears about it, the next batch runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for (_, future), row in zip(batch, rows):
                if not future.done():
                    future.set_result(row)
