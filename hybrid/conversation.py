"""Kept KV caches of conversations, so that a follow-up prefills only what is new.

After an answer a route keeps its cache (a `Kept`: the token ids whose keys and values it holds,
the images and videos among them, and the route's own state) under the request's `conversation_id`.
The next request of that conversation takes it back and reuses the longest common prefix of token
ids, cut before any image or video that is not the same picture or the same frames. All kept caches
together stay within a byte budget; the least recently used go first.

A conversation id that starts with `POOL` names a pool instead: stateless clients (the OpenAI API's)
send their whole history every time, so each request of the pool takes whichever kept cache of the
pool holds the longest reusable prefix of its prompt, and keeps its own back beside the others.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybrid.media import MEDIA
from hybrid.processor import PreparedInputs

log = logging.getLogger(__name__)

POOL = "pool:"  # the start of a conversation id that names a pool of caches matched by prefix


@dataclass(frozen=True)
class ImageRun:
    """Where one image's `<|image_pad|>` run, or one video (first frame pair's pads to last one's), is in
    a prompt, `[start, end)`, and a digest of its pixels and grid."""

    start: int
    end: int
    digest: str


@dataclass(frozen=True)
class Kept:
    """A route's cache after a request: `state` holds the keys and values of `token_ids`."""

    token_ids: np.ndarray  # (L,) int64
    images: tuple[ImageRun, ...]
    state: Any  # the route's own: a KVCache, a GenAI generator
    nbytes: int


def image_runs(inputs: PreparedInputs) -> tuple[ImageRun, ...]:
    """Where each image and video of the prompt sits, and what it is (equal digests: equal pixels
    and grid), in prompt order."""
    runs = [
        ImageRun(start, end, digest)
        for kind in MEDIA
        for (start, end), digest in zip(inputs.spans(kind), inputs.digests(kind), strict=True)
    ]
    return tuple(sorted(runs, key=lambda run: run.start))


def reusable_prefix(kept: Kept | None, token_ids: np.ndarray, images: tuple[ImageRun, ...]) -> int:
    """How many leading tokens of a new prompt `token_ids` `(S,)` the kept cache already holds.

    The longest common prefix of token ids, leaving at least the last prompt token to prefill (its
    logits give the first new token), and cut before the first image of the new prompt that is not
    the same picture (same pixels and grid: image tokens all share one id, and the grid also sets
    the M-RoPE positions of everything after it) at the same place in the kept one; videos alike."""
    if kept is None:
        return 0
    n = min(len(kept.token_ids), len(token_ids) - 1)
    differ = np.flatnonzero(kept.token_ids[:n] != token_ids[:n])
    prefix = int(differ[0]) if differ.size else n
    before = {run.start: run for run in kept.images}
    for run in images:
        if run.start >= prefix:
            break
        if before.get(run.start) != run or run.end > prefix:
            return run.start
    return prefix


class ConversationStore:
    """Kept caches by (conversation, route), least recently used first, within `budget_mb`.

    A request `take`s its conversation's cache (so no other request can use it meanwhile) and
    `keep`s it back when done; `forget` drops a conversation (Clear, end of a session)."""

    def __init__(self, budget_mb: int) -> None:
        self.budget = budget_mb * 2**20
        self._entries: OrderedDict[tuple[str, str], Kept] = OrderedDict()
        self._lock = threading.Lock()
        self._serial = 0  # names the caches of a pool apart

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(kept.nbytes for kept in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def take(
        self, route: str, conversation_id: str | None, token_ids: np.ndarray, images: tuple[ImageRun, ...] = ()
    ) -> Kept | None:
        """Remove and return the route's kept cache of that conversation (None if there is none); in a
        pool, the one that holds the longest reusable prefix of `token_ids` `(S,)`, if any."""
        if conversation_id is None:
            return None
        with self._lock:
            if not conversation_id.startswith(POOL):
                return self._entries.pop((conversation_id, route), None)
            pooled = [key for key in self._entries if key[1] == route and key[0].startswith(conversation_id + "#")]
            scored = [(reusable_prefix(self._entries[key], token_ids, images), key) for key in pooled]
            best = max(scored, default=(0, None))
            return self._entries.pop(best[1]) if best[0] > 0 else None

    def keep(self, route: str, conversation_id: str, kept: Kept) -> None:
        """Keep `kept` as the conversation's latest (in a pool: beside the others), evicting the
        least recently used until all fit; a cache larger than the whole budget is not kept."""
        if kept.nbytes > self.budget:
            log.debug("not keeping a %.0f MB cache: the budget is %.0f MB", kept.nbytes / 2**20, self.budget / 2**20)
            return
        with self._lock:
            if conversation_id.startswith(POOL):
                self._serial += 1
                conversation_id = f"{conversation_id}#{self._serial}"
            self._entries.pop((conversation_id, route), None)
            total = sum(k.nbytes for k in self._entries.values()) + kept.nbytes
            while total > self.budget:
                (evicted, _), old = self._entries.popitem(last=False)
                total -= old.nbytes
                log.debug("evicted the kept cache of conversation %s (%.0f MB)", evicted, old.nbytes / 2**20)
            self._entries[(conversation_id, route)] = kept

    def forget(self, conversation_id: str) -> int:
        """Drop every route's kept cache of that conversation (or pool); returns how many there were."""
        with self._lock:
            keys = [
                key for key in self._entries if key[0] == conversation_id or key[0].startswith(conversation_id + "#")
            ]
            for key in keys:
                del self._entries[key]
        return len(keys)
