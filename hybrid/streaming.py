"""Incremental detokenization and stop strings: token ids in, safe text deltas out.

Text is only released once it cannot change: a trailing incomplete UTF-8 sequence (shown by the
tokenizer as U+FFFD) is held back, and so is any tail that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # decoded text so far, possibly cut at a stop string
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final."""
        self.token_ids.append(token_id)
        text = self.decode(self.token_ids)
        if text.endswith(REPLACEMENT):
            return ""
        self.text = text
        for stop in self.stop:
            at = text.find(stop)
            if at != -1:
                self.text = text[:at]
                self.stopped = True
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """Release everything held back (at the end of generation)."""
        if not self.stopped:
            self.text = self.decode(self.token_ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_tail()
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

    def _held_tail(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:n]):
                    best = max(best, n)
                    break
        return best
