"""AsyncEngine: drives an ``LLMEngine`` step loop in one background thread and routes outputs to asyncio queues.

The engine is not thread-safe, so exactly one thread (the "engine thread") ever touches it. The event loop talks
to that thread through a command list guarded by a condition variable: ``add`` (answered through an asyncio
future, so validation errors come back to the caller) and ``abort``. Commands are applied between model steps,
so an abort frees the request's KV blocks before the next step runs. After every step the thread hands each
request's ``RequestOutput`` to that request's ``asyncio.Queue`` with one ``call_soon_threadsafe`` per step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from kiln.llm.engine import LLMEngine
from kiln.llm.outputs import RequestOutput
from kiln.llm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or a model step raised); no request can be served."""


@dataclass
class _Add:
    request_id: str
    prompt: Any
    params: SamplingParams
    queue: asyncio.Queue
    future: asyncio.Future
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Thread-owning wrapper: ``await add(...)`` registers a request, outputs arrive on the returned queue.

    Each queue receives ``RequestOutput`` objects in step order; the last one has ``finished=True``. If the
    engine dies, the queue receives an ``EngineDeadError`` instead.
    """

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.5):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.stats: dict = engine.get_stats()   # snapshot after the latest step (read by /metrics)
        self.steps = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; requests still in flight get EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread did not stop within %.0f s", timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None and not self._stopping

    # ------------------------------------------------------------------------------------------ event-loop API
    async def add(self, request_id: str, prompt: Any, params: SamplingParams, queue: asyncio.Queue,
                  arrival_time: float | None = None) -> None:
        """Queue a request in the engine; raises what ``LLMEngine.add_request`` raises (ValueError/TypeError).

        ``queue`` may be shared by several requests (a multi-prompt completion). If the caller is cancelled
        while waiting, the request may still have been added: callers must ``abort`` in a ``finally``.
        """
        if not self.alive:
            raise EngineDeadError(self._dead_reason())
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(_Add(request_id, prompt, params, queue, fut, arrival_time or time.time()))
        await fut

    def abort(self, request_id: str) -> None:
        """Abort (non-blocking): applied before the engine's next step; unknown or finished ids are ignored."""
        self._submit(_Abort(request_id))

    def _submit(self, cmd) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    def _dead_reason(self) -> str:
        if self.error is not None:
            return f"the engine failed: {type(self.error).__name__}: {self.error}"
        return "the engine is not running (server starting up or shutting down)"

    # ------------------------------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not engine.has_unfinished_requests():
                        self._cond.wait(self.idle_wait_s)
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                self._apply(commands)
                if stopping:
                    break
                if not engine.has_unfinished_requests():
                    self.stats = engine.get_stats()
                    continue
                outputs = engine.step()
                self.steps += 1
                self.stats = engine.get_stats()
                self._deliver(outputs)
        except BaseException as exc:  # a failed step: every request in flight must hear about it
            logger.exception("engine step failed; failing all requests in flight")
            self.error = exc
        finally:
            with self._cond:
                leftover, self._commands = self._commands, []
                self._stopping = True
            for cmd in leftover:
                if isinstance(cmd, _Add):
                    cmd.future.get_loop().call_soon_threadsafe(_set_future, cmd.future,
                                                                EngineDeadError(self._dead_reason()))
            for rid in list(engine.requests):
                engine.abort(rid)
            self.stats = engine.get_stats()
            dead = EngineDeadError(self._dead_reason())
            for rid, (loop, queue) in list(self._routes.items()):
                loop.call_soon_threadsafe(queue.put_nowait, dead)
            self._routes.clear()

    def _apply(self, commands) -> None:
        for cmd in commands:
            if isinstance(cmd, _Abort):
                self.engine.abort(cmd.request_id)
                self._routes.pop(cmd.request_id, None)
                continue
            loop = cmd.future.get_loop()
            if cmd.future.cancelled():
                continue  # the caller is gone and will not abort a request it never saw added
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time)
            except Exception as exc:  # validation: hand the error to the caller
                loop.call_soon_threadsafe(_set_future, cmd.future, exc)
                continue
            self._routes[cmd.request_id] = (loop, cmd.queue)
            loop.call_soon_threadsafe(_set_future, cmd.future, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            if out.finished:
                del self._routes[out.request_id]
            by_loop.setdefault(route[0], []).append((route[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: its requests are orphans, free them
                for _, out in items:
                    self.engine.abort(out.request_id)
                    self._routes.pop(out.request_id, None)

    @property
    def num_routes(self) -> int:
        return len(self._routes)


def _set_future(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _put_all(items) -> None:
    for queue, out in items:
        queue.put_nowait(out)
