"""Where a request's events go: delivered from the engine thread without ever blocking it."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from typing import Protocol

from gllm.engine.request import GenerationResult, StreamEvent


class EventSink(Protocol):
    def put(self, event: StreamEvent) -> None:
        """Take one event; called on the engine thread, must return at once."""


class CallbackSink:
    """Events to a front end's callback (`LLMEngine.add_request`)."""

    def __init__(self, on_event: Callable[[StreamEvent], None]) -> None:
        self.put = on_event


class AsyncSink:
    """Hands events to an asyncio loop (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[StreamEvent] = asyncio.Queue()

    def put(self, event: StreamEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass  # the caller's loop is gone; nobody is listening


class RequestHandle:
    """A request seen from plain threads or a game loop: poll without blocking, or wait."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._result: GenerationResult | None = None

    def put(self, event: StreamEvent) -> None:
        self._events.put(event)

    def poll(self) -> list[StreamEvent]:
        """Every event that has arrived since the last poll; never blocks."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            self._note(event)
            events.append(event)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends (discarding any events not yet polled)."""
        while self._result is None:
            try:
                self._note(self._events.get(timeout=timeout))
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s") from None
        return self._result

    @property
    def done(self) -> bool:
        return self._result is not None

    def _note(self, event: StreamEvent) -> None:
        if event.result is not None:
            self._result = event.result
