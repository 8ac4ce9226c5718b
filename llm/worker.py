"""One thread owns the model; callers hand it jobs and read events back.

MLX work must not run on an event loop (it would block every other request), and one
model cannot run two generations at once. So a single worker thread takes jobs from a
queue in order, and each job's events are delivered to the caller's asyncio loop as they
are produced. Cancelling a job (a client that went away) ends its generation at the next
token.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx

from mlx_harmony.llm.messages import Event

_END = object()
T = TypeVar("T")


@dataclass
class Job:
    """Work for the model thread: `run(should_stop)` yields the engine's events (or,
    for work beside the engine on the same thread, whatever its caller reads back)."""

    run: Callable[[Callable[[], bool]], Iterator[Event | Any]]
    cancelled: threading.Event = field(default_factory=threading.Event)


class ModelWorker:
    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Job, asyncio.AbstractEventLoop, asyncio.Queue] | None] = (
            queue.Queue()
        )
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop now: queued jobs are dropped and the running one ends at its next token
        (a server that is told to stop does not first work through its queue)."""
        while True:
            try:
                entry = self._jobs.get_nowait()
            except queue.Empty:
                break
            if entry is not None:
                job, loop, out = entry
                job.cancelled.set()
                _deliver(loop, out, _END)
        if (current := self._current) is not None:
            current.cancelled.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    @property
    def pending(self) -> int:
        return self._jobs.qsize()

    async def submit(self, job: Job) -> AsyncIterator[Event]:
        """Queue `job` and yield its events; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self._jobs.put((job, loop, out))
        try:
            while True:
                item = await out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread, in turn with the queued jobs, and return its
        result (speech models share the thread and the GPU with the chat model)."""

        def run(_: Callable[[], bool]) -> Iterator[T]:
            yield fn()

        async for result in self.submit(Job(run)):
            return result
        raise RuntimeError("the model worker stopped before the call ran")

    def _loop(self) -> None:
        try:
            while (entry := self._jobs.get()) is not None:
                job, loop, out = entry
                if not job.cancelled.is_set():  # a client that left while queued costs nothing
                    self._current = job
                    try:
                        for event in job.run(job.cancelled.is_set):
                            _deliver(loop, out, event)
                    except Exception as exc:  # delivered to the request, which answers 500
                        _deliver(loop, out, exc)
                    finally:
                        self._current = None
                _deliver(loop, out, _END)
        finally:
            # MLX keeps per-thread streams; left to thread-exit destructors they have
            # aborted the process ("terminate called without an active exception").
            mx.clear_streams()


def _deliver(loop: asyncio.AbstractEventLoop, out: asyncio.Queue, item: object) -> None:
    # The caller's loop may have shut down (server stopping): nobody is left to tell.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(out.put_nowait, item)
