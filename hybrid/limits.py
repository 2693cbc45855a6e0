"""Rate limiting for a public demo: each key (a client address) at most `max_requests` per `window_s` seconds."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

from hybrid.errors import Busy


class RateLimiter:
    def __init__(self, max_requests: int = 10, window_s: float = 60.0, max_sessions: int = 10_000) -> None:
        if max_requests < 1 or window_s <= 0:
            raise ValueError("max_requests must be >= 1 and window_s > 0")
        self.max_requests = max_requests
        self.window_s = window_s
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, session: str, now: float | None = None) -> None:
        """Record one request of `session`, or raise `Busy` if it is over its budget."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stamps = self._sessions.setdefault(session, deque())
            self._sessions.move_to_end(session)
            while stamps and now - stamps[0] >= self.window_s:
                stamps.popleft()
            if len(stamps) >= self.max_requests:
                wait = self.window_s - (now - stamps[0])
                raise Busy(
                    f"too many requests: {self.max_requests} per {self.window_s:.0f} s; try again in {wait:.0f} s", wait
                )
            stamps.append(now)
            while len(self._sessions) > self.max_sessions:  # forget the least recent sessions
                self._sessions.popitem(last=False)
