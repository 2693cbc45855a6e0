"""The most recently used values by key, bounded in number and in bytes: the caches of processed
pictures and of their vision features, so a conversation's next turn about the same pictures
neither processes nor encodes them again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class Recent(Generic[V]):
    """At most `capacity` values and `max_bytes` of them (`nbytes` tells a value's) in all, the
    least recently used dropped first; a value larger than `max_bytes` is not kept. Thread-safe."""

    def __init__(self, capacity: int, max_bytes: int, nbytes: Callable[[V], int]) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.nbytes = nbytes
        self.entries: OrderedDict[str, V] = OrderedDict()
        self.hits = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self.entries.get(key)
            if value is not None:
                self.entries.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: str, value: V) -> None:
        size = self.nbytes(value)
        with self._lock:
            if size > self.max_bytes:
                return
            old = self.entries.pop(key, None)
            if old is not None:
                self._bytes -= self.nbytes(old)
            self.entries[key] = value
            self._bytes += size
            while len(self.entries) > self.capacity or self._bytes > self.max_bytes:
                _, dropped = self.entries.popitem(last=False)
                self._bytes -= self.nbytes(dropped)
