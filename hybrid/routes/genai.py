"""The GenAI route: text-only conversations through onnxruntime-genai's own C++ generation loop.

Model and tokenizer are loaded once. Without a `conversation_id` each request gets a fresh
`GeneratorParams`/`Generator`, released when the request ends (also when it is cancelled). With
one, a greedy request keeps its generator for the conversation's next request, which rewinds it
(`rewind_to`) to the longest common prefix and appends only the new tokens. A generator's search
options (sampling, seed, min/max length) are fixed when it is made, so only greedy requests without
`min_new_tokens` reuse: a sampled follow-up would draw from the old generator's random state, not
from its own seed. Prompt ids come from the same HF processor as the other routes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrid.config import SamplingConfig
from hybrid.conversation import ConversationStore, Kept, reusable_prefix
from hybrid.errors import BundleError, RouteError
from hybrid.layout import GENAI_CONFIG
from hybrid.metrics import Stopwatch
from hybrid.processor import Processor
from hybrid.routes.common import Emitter, prepare
from hybrid.threads import intra_op_threads
from hybrid.types import Chunk, Request, RouteName

KV_BYTES = 4  # GenAI's CPU builds keep keys and values in fp32, INT4 weights included
FOLLOW_UP_ROOM = 256  # tokens beyond twice a conversation's request, for the next question


@dataclass(frozen=True)
class _Generator:
    """A generator and what it was made for: its KV buffer holds `max_length` tokens."""

    generator: Any
    max_length: int
    repetition_penalty: float


class GenAIRoute:
    name: RouteName = "genai"

    def __init__(
        self, folder: str | Path, processor: Processor, conversations: ConversationStore, threads: int = 0
    ) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise BundleError("the GenAI route needs onnxruntime-genai: pip install onnxruntime-genai") from exc
        self.og = og
        self.processor = processor
        self.conversations = conversations
        try:
            config = og.Config(str(folder))
            # GenAI's default threading runs about 2x slower on a 2-core machine
            overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": intra_op_threads(threads)}}}}
            config.overlay(json.dumps(overlay))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
            model = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]
        except Exception as exc:  # GenAI raises RuntimeError/OSError subclasses for a bad folder
            raise BundleError(f"cannot load the GenAI model from {folder}: {exc}") from exc
        self.vocab_size = model["vocab_size"]
        self.context_length = int(model["context_length"])
        decoder = model["decoder"]
        per_layer = decoder["num_key_value_heads"] * decoder["head_size"] * KV_BYTES
        self.kv_bytes_per_token = 2 * decoder["num_hidden_layers"] * per_layer  # keys and values

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        if request.has_images or request.has_videos:
            raise RouteError("the GenAI route serves text only: this conversation has an image or a video")
        watch = Stopwatch()
        inputs = prepare(self.processor, request, watch)
        prompt_ids = inputs.input_ids[0]
        emitter = Emitter(self.name, self.processor, request.sampling, watch, cancel)
        kept = self.conversations.take(self.name, request.conversation_id, prompt_ids)
        made, reused = self._generator(request, kept, prompt_ids)
        watch.reused_tokens = reused
        generator = made.generator
        try:
            start = time.perf_counter()
            generator.append_tokens(prompt_ids[reused:].tolist())
            watch.add("prefill", time.perf_counter() - start)
            while not emitter.done:
                if generator.is_done():  # GenAI stopped on an EOS id of its own config
                    emitter.finish("eos")
                    break
                generator.generate_next_token()
                yield emitter.push(int(generator.get_next_tokens()[0]))
        finally:
            self._keep(request, made, bool(emitter.token_ids))
            del generator, made  # a generator not kept frees its KV cache now, not at the next collection
        yield emitter.final()

    def _generator(self, request: Request, kept: Kept | None, prompt_ids: np.ndarray) -> tuple[_Generator, int]:
        """The kept generator rewound to the reusable prefix if it can serve this request, else a new one."""
        needed = len(prompt_ids) + request.sampling.max_new_tokens
        if kept is not None and _reusable(request.sampling):
            old: _Generator = kept.state
            reused = reusable_prefix(kept, prompt_ids, ())
            if reused and old.max_length >= needed and old.repetition_penalty == request.sampling.repetition_penalty:
                old.generator.rewind_to(reused)
                return old, reused
        max_length = needed
        if request.conversation_id is not None and _reusable(request.sampling):
            # its KV buffer cannot grow: room for the answer and a follow-up question, doubling as it grows
            max_length = min(self.context_length, 2 * needed + FOLLOW_UP_ROOM)
        params = self._params(request, len(prompt_ids), max_length)
        return _Generator(self.og.Generator(self.model, params), max_length, request.sampling.repetition_penalty), 0

    def _keep(self, request: Request, made: _Generator, generated: bool) -> None:
        """Keep a reusable generator for the conversation: all its tokens but the last generated one
        have keys and values in its cache."""
        if request.conversation_id is None or not _reusable(request.sampling):
            return
        sequence = np.asarray(made.generator.get_sequence(0), dtype=np.int64)
        held = sequence[:-1] if generated else sequence
        kept = Kept(held, (), made, made.max_length * self.kv_bytes_per_token)
        self.conversations.keep(self.name, request.conversation_id, kept)

    def _params(self, request: Request, prompt_tokens: int, max_length: int):
        s = request.sampling
        params = self.og.GeneratorParams(self.model)
        options = dict(
            max_length=max_length,
            min_length=prompt_tokens + s.min_new_tokens,
            do_sample=not s.greedy,
            repetition_penalty=s.repetition_penalty,
            random_seed=s.seed,
        )
        if not s.greedy:
            options.update(temperature=s.temperature, top_k=s.top_k or self.vocab_size, top_p=s.top_p)
        params.set_search_options(**options)
        return params


def _reusable(sampling: SamplingConfig) -> bool:
    """Greedy without a minimum length: the only search options a continued generator gets right."""
    return sampling.greedy and sampling.min_new_tokens == 0
