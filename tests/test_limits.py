from __future__ import annotations

import pytest

from hybrid.errors import UserError
from hybrid.limits import RateLimiter


def test_rate_limit_per_session_and_window():
    limiter = RateLimiter(max_requests=2, window_s=10)
    limiter.check("a", now=0)
    limiter.check("a", now=1)
    with pytest.raises(UserError, match="too many requests.*try again in 9 s"):
        limiter.check("a", now=1)
    limiter.check("b", now=1)  # another session has its own budget
    limiter.check("a", now=10.5)  # the first request left the window


def test_session_table_is_bounded():
    limiter = RateLimiter(max_requests=1, window_s=10, max_sessions=3)
    for name in "abcd":
        limiter.check(name, now=0)
    assert list(limiter._sessions) == ["b", "c", "d"]
