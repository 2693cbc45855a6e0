"""One admission for both faces of the app, the page and the OpenAI-compatible API: one request on
the CPU at a time with a bounded wait, and one rate limit per client address.

The page's own Gradio queue already runs its events one at a time; the CPU gate here is what keeps
an API request and a page request from running together, and what an API request waits on. A
request runs in a thread of its own that holds the gate (`on_cpu`): whatever the client does (goes
away, never reads on), that thread finishes, or stops at its cancel event, and lets the gate go.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from hybrid.errors import Busy
from hybrid.limits import RateLimiter

QUEUE_SIZE = 16  # requests that may wait for the CPU at once; more are refused
WAIT_S = 300.0  # the longest a request waits for the CPU before it is refused
T = TypeVar("T")


class Admission:
    """Admit a client's request (`check`), then hold the CPU while it runs (`cpu`)."""

    def __init__(
        self,
        limiter: RateLimiter | None = None,
        max_waiting: int = QUEUE_SIZE,
        wait_s: float = WAIT_S,
        trust_proxy: bool = False,
    ) -> None:
        self.limiter = limiter
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.trust_proxy = trust_proxy
        self._gate = threading.Lock()
        self._waiting = 0
        self._count = threading.Lock()

    def client(self, host: str | None, headers: Mapping[str, str] | None = None) -> str:
        """The address a request is limited by: the peer's, or (`trust_proxy`, behind a reverse
        proxy) the first address of its X-Forwarded-For header."""
        forwarded = (headers or {}).get("x-forwarded-for", "") if self.trust_proxy else ""
        first = forwarded.split(",")[0].strip()
        return first or host or "unknown"

    def check(self, client: str) -> None:
        """Count one request of `client`; `Busy` when it is over its rate."""
        if self.limiter is not None:
            self.limiter.check(client)

    def refusal(self) -> Busy | None:
        """The error a request would get now because the wait is full, or None."""
        with self._count:
            waiting = self._waiting
        if waiting < self.max_waiting:
            return None
        return Busy(f"the server is busy: {waiting} requests are waiting; try again shortly", 5.0)

    @contextmanager
    def cpu(self) -> Iterator[None]:
        """Hold the CPU for one request, waiting at most `wait_s` behind at most `max_waiting`
        others; `Busy` when the wait is full or too long."""
        with self._count:
            if self._waiting >= self.max_waiting:
                raise Busy(f"the server is busy: {self._waiting} requests are waiting; try again shortly", 5.0)
            self._waiting += 1
        try:
            acquired = self._gate.acquire(timeout=self.wait_s)
        finally:
            with self._count:
                self._waiting -= 1
        if not acquired:
            raise Busy(f"the server is busy: no turn on the CPU within {self.wait_s:.0f} s; try again shortly", 10.0)
        try:
            yield
        finally:
            self._gate.release()

    def on_cpu(self, produce: Callable[[threading.Event], Iterator[T]], cancel: threading.Event) -> Iterator[T]:
        """What `produce(cancel)` yields, produced in a thread of its own that holds the CPU (`cpu`)
        while it runs; its error, if any, is raised here. Closing this iterator sets `cancel`; an
        iterator its caller forgets still ends: the thread finishes alone and lets the CPU go."""
        items: queue.SimpleQueue = queue.SimpleQueue()

        def work() -> None:
            try:
                with self.cpu():
                    for item in produce(cancel):
                        items.put((True, item))
            except BaseException as exc:  # handed to the caller, raised there
                items.put((False, exc))
            else:
                items.put((False, None))

        threading.Thread(target=work, name="cpu-request", daemon=True).start()
        try:
            while True:
                produced, value = items.get()
                if not produced:
                    if value is not None:
                        raise value
                    return
                yield value
        finally:
            cancel.set()
