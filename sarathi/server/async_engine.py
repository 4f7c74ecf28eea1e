"""Drive one ``LLMEngine`` from a background thread for an asyncio server.

The engine is not thread-safe, so only the engine thread touches it: handlers post "add" and "abort"
commands to an inbox that the thread drains before every step, which is also how new requests join the
running batch at the next step (continuous batching). Outputs travel back to each request's
``RequestStream`` with ``loop.call_soon_threadsafe``; a stream keeps only the newest unread output of
each request, and aborts its requests when a streaming client stops reading (``StreamBacklog``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sarathi.engine import LLMEngine, RequestGroup
from sarathi.outputs import RequestOutput
from sarathi.server.metrics import ServerMetrics

logger = logging.getLogger("sarathi.server")


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class EngineStoppedError(RuntimeError):
    """The server is shutting down (or its engine thread is gone) and accepts no new requests."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request (the request was aborted)."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (e.g. at shutdown) before it finished."""


class EngineUnavailableError(RequestAbortedError):
    """The executor failed for good (e.g. a pipeline rank died): no request can run any more (503)."""


@dataclass
class _Tracked:
    group: RequestGroup
    stream: RequestStream
    num_tokens: int = 0
    last_output_time: float | None = None
    seen_first_token: bool = False


@dataclass
class _Inbox:
    items: deque[tuple[str, Any]] = field(default_factory=deque)
    wake: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, payload: Any) -> None:
        self.items.append((kind, payload))
        self.wake.set()


@dataclass(frozen=True)
class StreamBacklog:
    """When a streaming client counts as gone although still connected: it has left more than
    ``max_outputs`` outputs per request group unread (its socket buffers are full, so the SSE writer is
    blocked and stops pulling) and has read nothing for ``stall_s`` seconds. Its request is then aborted,
    so a client that does not read cannot keep spending the engine's compute."""

    max_outputs: int = 128
    stall_s: float = 5.0


class RequestStream:
    """Outputs of the request groups of one HTTP request; ``close()`` aborts the rest.

    ``RequestOutput``s are cumulative, so an unread output is replaced by its successor: a slow reader
    holds one pending output per group, not one per step. With a ``StreamBacklog`` a reader that stops
    pulling gets its requests aborted (see ``StreamBacklog``).
    """

    def __init__(self, owner: AsyncLLMEngine, request_ids: list[str],
                 backlog: StreamBacklog | None = None) -> None:
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._pending: dict[str, RequestOutput] = {}  # newest unread output of each group
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.request_ids = list(request_ids)
        self._unfinished = set(request_ids)  # as the reader has seen them
        self._running = set(request_ids)  # as the engine has delivered them
        self._closed = False
        self._backlog = backlog
        self._unread = 0
        self._last_read = time.monotonic()
        self.slow_reader = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        """On the event loop."""
        if self._closed:  # aborted or abandoned: nobody will read this
            return
        if isinstance(item, BaseException):
            self._error = self._error or item
        else:
            self._pending[item.request_id] = item
            self._unread += 1
            if item.finished:
                self._running.discard(item.request_id)
        self._ready.set()
        self._check_backlog()

    def _check_backlog(self) -> None:
        b = self._backlog
        if (b is None or not self._running or self._error is not None
                or self._unread <= b.max_outputs * len(self.request_ids)):
            return
        stalled = time.monotonic() - self._last_read
        if stalled < b.stall_s:
            return
        self.slow_reader, self._closed = True, True
        self._pending.clear()
        self._error = RequestAbortedError("aborted: the client stopped reading this stream")
        self._ready.set()
        self._owner.abort_slow_reader(sorted(self._running), self._unread, stalled)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while self._unfinished:
                if self._pending:
                    self._unread, self._last_read = 0, time.monotonic()
                    item = self._pending.pop(next(iter(self._pending)))
                    if item.finished:
                        self._unfinished.discard(item.request_id)
                    yield item
                elif self._error is not None:
                    raise self._error
                else:
                    self._ready.clear()
                    await self._ready.wait()
        finally:
            self.close()

    def close(self) -> None:
        """Abort whatever has not finished (idempotent, callable from any thread)."""
        if not self._closed:
            self._closed = True
            if self._unfinished:
                self._owner.abort(sorted(self._unfinished))

    def __del__(self) -> None:  # safety net for a stream that was never iterated
        self.close()


class AsyncLLMEngine:
    """Owns the engine thread. ``submit`` queues request groups and returns their ``RequestStream``."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics or ServerMetrics(engine.model_name)
        self._inbox = _Inbox()
        self._live: dict[str, _Tracked] = {}
        self._lock = threading.Lock()  # guards _live (read by handlers, written by the engine thread)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.accepting = False
        self.retry_after_s = 1
        self.unavailable: str | None = None  # why the engine can run nothing any more (set once)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop, self.accepting = False, True
        self._thread = threading.Thread(target=self._run, name="sarathi-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._live)

    @property
    def num_waiting(self) -> int:
        """Accepted requests the engine has not scheduled yet."""
        with self._lock:
            return sum(1 for t in self._live.values() if t.group.metrics.first_scheduled_time is None)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``timeout`` s; abort the rest; write
        the engine's trace (``--trace``). The engine itself is not shut down (a caller may reuse it)."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._live and self.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop = True
        self._inbox.wake.set()
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join, 30.0)
        if self.engine.tracer is not None and not self.is_running:  # the engine thread is done with it
            try:
                path = await loop.run_in_executor(None, self.engine.write_trace)
                logger.info("trace written to %s", path)
            except OSError as e:
                logger.error("could not write the trace: %s", e)

    # ---- handler side ------------------------------------------------------------------------
    def submit(self, groups: list[RequestGroup], backlog: StreamBacklog | None = None) -> RequestStream:
        """Queue validated groups (all or none). Raises QueueFullError / EngineStoppedError.
        ``backlog``: abort the groups if their reader stops reading (for streamed responses)."""
        if self.unavailable is not None:
            raise EngineStoppedError(f"the engine is unavailable: {self.unavailable}")
        if not self.accepting or not self.is_running:
            raise EngineStoppedError("the server is shutting down")
        limit = self.max_waiting_requests
        if limit is not None and self.num_waiting + len(groups) > limit:
            self.metrics.record_rejected()
            raise QueueFullError(f"too many waiting requests (limit {limit}); retry later")
        stream = RequestStream(self, [g.request_id for g in groups], backlog)
        with self._lock:
            for g in groups:
                self._live[g.request_id] = _Tracked(g, stream)
        for g in groups:
            self._inbox.post("add", g)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.post("abort", list(request_ids))

    def abort_slow_reader(self, request_ids: list[str], unread: int, stalled_s: float) -> None:
        """A stream's client stopped reading (see ``StreamBacklog``): free its requests' compute and KV."""
        logger.warning("aborting %s: the client left %d outputs unread and read nothing for %.1f s",
                       request_ids, unread, stalled_s)
        self.metrics.record_slow_reader_abort()
        self.abort(request_ids)

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        logger.info("engine loop started")
        while True:
            try:
                self._drain_inbox()
                if self._stop:
                    self._abort_all(RequestAbortedError("the server shut down"), "abort")
                    break
                if self.unavailable is None and eng.executor.failure is not None:
                    self._become_unavailable(eng.executor.failure)
                if not eng.has_unfinished_requests():
                    self._record_state()
                    self._inbox.wake.wait(0.5)
                    self._inbox.wake.clear()
                    continue
                self._step()
            except Exception:  # anything but a failed model step: fail what is in flight, go on
                if eng.executor.failure is not None:  # a dead executor: answered 503 from now on
                    if self.unavailable is None:
                        self._become_unavailable(eng.executor.failure)
                    time.sleep(0.05)  # no hot loop should it repeat
                    continue
                logger.exception("engine loop error; failing all in-flight requests")
                try:
                    self._abort_all(RequestFailedError("internal engine error"), "error")
                except Exception:  # the handler must not kill the loop (e.g. a broken metrics hook)
                    logger.exception("could not fail the in-flight requests cleanly")
                    time.sleep(0.1)  # no hot loop if the failure repeats
        logger.info("engine loop stopped")

    def _become_unavailable(self, reason: str) -> None:
        """The executor failed for good: refuse new requests (503), fail the queued and running ones.
        The loop goes on: plans still in flight are collected (freeing their blocks) and shutdown works."""
        logger.error("the engine can run no more requests: %s", reason)
        self.unavailable, self.accepting = reason, False
        self._abort_all(EngineUnavailableError(f"the engine is unavailable: {reason}"), "error")

    def _drain_inbox(self) -> None:
        while self._inbox.items:
            kind, payload = self._inbox.items.popleft()
            if kind == "add" and self.unavailable is not None:
                t = self._forget(payload.request_id)
                if t is not None:
                    t.stream.put(EngineUnavailableError(f"the engine is unavailable: {self.unavailable}"))
                    self.metrics.record_finished(["error"] * len(t.group.seqs), t.group.metrics, time.time())
            elif kind == "add":
                if payload.request_id in self._live:
                    try:
                        self.engine.add_group(payload)
                    except ValueError as e:
                        t = self._forget(payload.request_id)
                        if t is not None:
                            t.stream.put(RequestFailedError(str(e)))
            else:
                live = [rid for rid in payload if rid in self._live]
                self.engine.abort_request(live)
                now = time.time()
                for rid in live:
                    t = self._forget(rid)
                    if t is not None:
                        self.metrics.record_finished(["abort"] * len(t.group.seqs), t.group.metrics, now)

    def _step(self) -> None:
        eng = self.engine
        steps_before = eng.stats.num_steps
        # A request that fails inside the step comes back finished with ``error`` set; the engine has
        # already freed it, and its batch-mates' outputs are unaffected.
        outputs = eng.step()
        if eng.stats.num_steps != steps_before:
            rec = eng.stats.steps[-1]
            self.metrics.record_step(rec.num_prompt_tokens, rec.num_decode_tokens, rec.num_preempted,
                                     rec.duration, rec.num_recomputed_tokens)
        now = time.time()
        for out in outputs:
            t = self._live.get(out.request_id)
            if t is None:
                continue
            if out.error is not None:
                self._forget(out.request_id)
                t.stream.put(RequestFailedError(f"the engine failed while running this request: "
                                                f"{out.error}"))
                self.metrics.record_finished(["error"] * len(out.outputs), out.metrics, now)
                continue
            self._account(t, out, now)
            t.stream.put(out)
            if out.finished:
                self._forget(out.request_id)
                reasons = [c.finish_reason or "abort" for c in out.outputs]
                self.metrics.record_finished(reasons, out.metrics, now)
        self._record_state()

    def _account(self, t: _Tracked, out: RequestOutput, now: float) -> None:
        m = self.metrics
        n = sum(len(c.token_ids) for c in out.outputs)
        if n > t.num_tokens:
            m.generation_tokens.inc(n - t.num_tokens)
            t.num_tokens = n
            if t.last_output_time is not None:
                m.tbt.observe(now - t.last_output_time)
            t.last_output_time = now
        if not t.seen_first_token and out.metrics and out.metrics.first_token_time is not None:
            t.seen_first_token = True
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.ttft.observe(max(0.0, out.metrics.first_token_time - out.metrics.arrival_time))

    def _forget(self, rid: str) -> _Tracked | None:
        with self._lock:
            return self._live.pop(rid, None)

    def _abort_all(self, error: BaseException, reason: str) -> None:
        with self._lock:
            live, self._live = self._live, {}
        try:
            self.engine.abort_request(list(live))
        except Exception:
            logger.exception("could not abort requests %s", list(live))
        now = time.time()
        for t in live.values():
            t.stream.put(error)
            self.metrics.record_finished([reason] * len(t.group.seqs), t.group.metrics, now)
        self._record_state()

    def _record_state(self) -> None:
        eng = self.engine
        self.metrics.record_state(eng.scheduler.num_running, eng.scheduler.num_waiting, eng.kv.usage,
                                  eng.kv.num_free_blocks, eng.kv.num_query_tokens, eng.kv.num_hit_tokens)
        report = eng.stats.bubbles
        if report is not None:
            self.metrics.record_pipeline(report)
