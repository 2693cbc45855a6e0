"""What every route shares: turning generated token ids into `Chunk`s, with the same stop rules.

A route feeds each new token id to `Emitter.push`; the emitter decides when generation is over
(EOS from the checkpoint, max new tokens, a stop string, or cancellation) and keeps the timings.
"""

from __future__ import annotations

import threading
import time

from hybrid.config import SamplingConfig
from hybrid.media import MEDIA
from hybrid.metrics import Stopwatch
from hybrid.processor import PreparedInputs, Processor
from hybrid.streaming import TextStream
from hybrid.thinking import THINK_CLOSE
from hybrid.types import Chunk, FinishReason, Request, RouteName


def timed(watch: Stopwatch, stage: str, fn, *args):
    """`fn(*args)`, its wall time added to `stage`."""
    start = time.perf_counter()
    result = fn(*args)
    watch.add(stage, time.perf_counter() - start)
    return result


def prepare(processor: Processor, request: Request, watch: Stopwatch) -> PreparedInputs:
    """The request's prompt ids (and pixels, within its image budget), timed as the preprocess stage."""
    inputs = timed(watch, "preprocess", processor.prepare, request.messages, request.max_image_tokens)
    watch.prompt_tokens = inputs.num_tokens
    for kind in MEDIA:
        setattr(watch, kind.tokens, inputs.tokens(kind))
    return inputs


class Emitter:
    def __init__(
        self,
        route: RouteName,
        processor: Processor,
        sampling: SamplingConfig,
        watch: Stopwatch,
        cancel: threading.Event | None = None,
    ) -> None:
        self.route = route
        self.sampling = sampling
        self.eos = set(processor.eos_token_ids)
        self.watch = watch
        self.cancel = cancel
        self.stream = TextStream(processor.decode, sampling.stop)
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._unscanned = 0  # where in the text a `</think>` could still begin

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    @property
    def done(self) -> bool:
        """Whether generation is over: a stop rule ended it, or the request was cancelled."""
        return self.finish_reason is not None or self.cancelled

    def push(self, token_id: int) -> Chunk:
        """Account for one generated token; the returned chunk holds the text it released."""
        self.watch.token()
        self.token_ids.append(token_id)
        text = ""
        if token_id in self.eos:
            self.finish_reason = "eos"
        else:
            text = self.stream.push(token_id)
            if self.stream.stopped:
                self.finish_reason = "stop"
            self._count_thinking()
        if self.finish_reason is None and len(self.token_ids) >= self.sampling.max_new_tokens:
            self.finish_reason = "length"
        return Chunk(route=self.route, text=text, token_ids=(token_id,))

    def _count_thinking(self) -> None:
        """Note how many tokens it took to close the thinking, scanning only the text that is new
        since the last token (a step must not reread the whole answer)."""
        if self.watch.thinking_tokens:
            return
        text = self.stream.text
        if text.find(THINK_CLOSE, self._unscanned) != -1:
            self.watch.thinking_tokens = len(self.token_ids)
        self._unscanned = max(0, len(text) - len(THINK_CLOSE) + 1)

    def finish(self, reason: FinishReason) -> None:
        """End generation for a reason the route saw itself (its runtime stopped on its own)."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def final(self) -> Chunk:
        """The last chunk: any text held back, how generation ended, and the timings."""
        reason = self.finish_reason or ("cancelled" if self.cancelled else None)
        if reason is None:
            raise RuntimeError(f"the {self.route} route ended its loop before generation was over")
        text = "" if reason == "stop" else self.stream.flush()
        return Chunk(route=self.route, text=text, token_ids=(), finish_reason=reason, timings=self.watch.timings())
