"""The hybrid route: vision tower (images and videos) -> injection -> our ONNX decoder and generation loop.

Never loads the PyTorch language model: only the vision tower, the embedding table and the decoder.
With a `conversation_id`, the request's KV cache is kept after the answer, and the conversation's
next request prefills only the tokens after the longest common prefix (its M-RoPE positions and
DeepStack rows are those of the whole new prompt, so the result equals a fresh prefill's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np

from hybrid.conversation import ConversationStore, ImageRun, Kept, image_runs, reusable_prefix
from hybrid.decoder import KVCache, OnnxDecoder
from hybrid.injection import EmbeddingTable, InjectedInputs, inject
from hybrid.media import MEDIA, Media
from hybrid.metrics import Stopwatch
from hybrid.processor import PreparedInputs, Processor
from hybrid.rope import get_rope_index
from hybrid.routes.common import Emitter, prepare, timed
from hybrid.sampling import sample, sample_against_draft, suppress
from hybrid.speculative import MAX_DRAFT, Acceptance, DraftPolicy, NgramDrafter, PassCosts
from hybrid.types import Chunk, Request, RouteName
from hybrid.vision import VisionFeatures, VisionTower


class HybridRoute:
    name: RouteName = "hybrid"

    def __init__(
        self,
        processor: Processor,
        vision: VisionTower,
        embeddings: EmbeddingTable,
        decoder: OnnxDecoder,
        conversations: ConversationStore,
    ) -> None:
        self.processor = processor
        self.vision = vision
        self.embeddings = embeddings
        self.decoder = decoder
        self.conversations = conversations
        self.pass_costs = PassCosts()  # what verifying drafts costs here, learnt over the answers
        self.acceptance = Acceptance()  # how often this model's drafts are kept, over its answers

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        watch = Stopwatch()
        inputs = prepare(self.processor, request, watch)
        images = image_runs(inputs) if request.conversation_id else ()  # and videos
        kept = self.conversations.take(self.name, request.conversation_id, inputs.input_ids[0], images)
        reused = reusable_prefix(kept, inputs.input_ids[0], images)
        cache = self.cache_for(kept, reused, inputs.num_tokens + request.sampling.max_new_tokens)
        watch.reused_tokens = reused
        logits, rope_delta = self.prefill(cache, inputs, reused, watch)
        emitter = Emitter(self.name, self.processor, request.sampling, watch, cancel)
        token_ids = inputs.input_ids[0].tolist()  # what the cache holds, grown as tokens are fed
        try:
            yield from self.decode(emitter, cache, logits, token_ids, rope_delta)
        finally:
            self.keep(request.conversation_id, cache, token_ids, images)
        yield emitter.final()

    def warm(self, request: Request) -> int:
        """Prefill the prompt up to the end of its last image or video, and keep that cache for the
        conversation's next request, which then prefills only what follows (the question's text):
        a picture is encoded while its question is typed. Returns the tokens prefilled (0 without a
        conversation, an image or a video, or when the kept cache already holds them)."""
        if request.conversation_id is None:
            return 0
        watch = Stopwatch()
        inputs = prepare(self.processor, request, watch)
        end = inputs.media_end()
        if end == 0:
            return 0
        inputs = inputs.head(end)
        ids = inputs.input_ids[0]
        images = image_runs(inputs)
        kept = self.conversations.take(self.name, request.conversation_id, ids, images)
        if kept is not None and _holds(kept, ids, images):
            self.conversations.keep(self.name, request.conversation_id, kept)
            return 0
        reused = reusable_prefix(kept, ids, images)
        cache = self.cache_for(kept, reused, end)
        # if the prefill fails, the conversation's cache is gone: its next request starts afresh
        self.prefill(cache, inputs, reused, watch)
        self.keep(request.conversation_id, cache, ids.tolist(), images)
        return end - reused

    def prefill(self, cache: KVCache, inputs: PreparedInputs, reused: int, watch: Stopwatch) -> tuple[np.ndarray, int]:
        """Encode the images and videos among the prompt's tokens after the first `reused` (those the
        cache holds), inject them and run them; returns the next token's logits `(V,)` and the M-RoPE
        delta that places the tokens generated after the prompt."""
        new = inputs.tail(reused)  # the tokens to prefill, with only the images and videos among them
        features = {kind: timed(watch, "vision", self.encode, new, kind) for kind in MEDIA}
        injected = self.inject(new, features)
        positions, rope_delta = get_rope_index(
            inputs.mm_token_type_ids,
            _numpy(inputs.image_grid_thw),
            self.vision.spatial_merge_size,
            _numpy(inputs.video_grid_thw),
        )  # (3, 1, S): the whole prompt's, since they depend on every image and video before
        logits = timed(
            watch,
            "prefill",
            self.decoder.forward,
            cache,
            injected.inputs_embeds,
            positions[:, :, reused:],
            injected.deepstack_embeds,
        )
        return logits, rope_delta

    def feed(self, cache: KVCache, tokens: list[int], rope_delta: int) -> np.ndarray:
        """Run generated tokens (one, or one and its drafts) in one pass; returns each position's
        next-token logits `(n, V)` (the decoder's buffer, valid until its next pass of n tokens)."""
        weight = self.embeddings.weight
        return self.decoder.run_text(cache, [weight[t] for t in tokens], cache.length + rope_delta)

    def cache_for(self, kept: Kept | None, reused: int, capacity: int) -> KVCache:
        """A cache for `capacity` tokens whose first `reused` are the kept conversation's."""
        if kept is None or reused == 0:
            return self.decoder.new_cache(capacity)
        cache: KVCache = kept.state
        cache.truncate(reused)
        return cache if cache.capacity >= capacity else self.decoder.resized(cache, capacity)

    def keep(
        self, conversation_id: str | None, cache: KVCache, token_ids: list[int], images: tuple[ImageRun, ...]
    ) -> None:
        """Keep the cache for the conversation's next request, trimmed to the tokens it holds."""
        if conversation_id is None:
            return
        if cache.length != len(token_ids):
            raise RuntimeError(f"the KV cache holds {cache.length} tokens, {len(token_ids)} were fed")
        trimmed = self.decoder.resized(cache, cache.length)
        kept = Kept(np.array(token_ids, dtype=np.int64), images, trimmed, trimmed.nbytes)
        self.conversations.keep(self.name, conversation_id, kept)

    def encode(self, inputs: PreparedInputs, kind: Media) -> VisionFeatures | None:
        pixels = inputs.pixels(kind)
        return None if pixels is None else self.vision.encode(pixels, inputs.grid(kind), "+".join(inputs.digests(kind)))

    def inject(self, inputs: PreparedInputs, features: dict[Media, VisionFeatures | None]) -> InjectedInputs:
        token_ids, num_deepstack = self.processor.token_ids, self.decoder.num_deepstack
        return inject(inputs.input_ids, self.embeddings, token_ids, num_deepstack, features)

    def decode(
        self, emitter: Emitter, cache: KVCache, logits: np.ndarray, token_ids: list[int], rope_delta: int
    ) -> Iterator[Chunk]:
        """Sample until the emitter is done; each token fed to the decoder is appended to `token_ids`.

        With speculation, each pass runs the last token and the tokens drafted after it; the drafts
        are kept up to the first that is not the token chosen from the logits before it, which is
        then the next pass's token, and the rejected ones are cut from the cache. A plain step
        allocates no arrays of its own: the decoder's inputs are bound once per pass size and
        rewritten, and the logits are read where the decoder wrote them."""
        picker = _Picker(emitter, self.processor.eos_token_ids, token_ids)
        drafter = NgramDrafter(token_ids) if emitter.sampling.speculative == "ngram" else None
        policy = DraftPolicy(self.pass_costs, self.acceptance)
        watch = emitter.watch
        next_memory = len(token_ids) + MEMORY_EVERY
        token = picker.pick(logits)
        yield emitter.push(token)
        try:
            while not emitter.done:
                if drafter is None:
                    drafts = []
                    rows = self.feed(cache, [token], rope_delta)
                else:
                    drafter.push(token)
                    room = min(emitter.sampling.max_new_tokens - len(emitter.token_ids), cache.capacity - cache.length)
                    draft = drafter.propose(min(MAX_DRAFT, room - 1))
                    drafts = draft.tokens[: policy.choose(draft)]
                    started = time.perf_counter()
                    rows = self.feed(cache, [token, *drafts], rope_delta)
                    self.pass_costs.time(len(drafts) + 1, time.perf_counter() - started)
                token_ids.append(token)
                kept = 0
                for row, guess in zip(rows, drafts):
                    token = picker.pick(row, guess)
                    yield emitter.push(token)
                    if token != guess:
                        break
                    kept += 1
                    if emitter.done:
                        break
                    token_ids.append(guess)
                    drafter.push(guess)
                else:
                    token = picker.pick(rows[len(drafts)])
                    yield emitter.push(token)
                if drafts:
                    policy.observe(draft.match, len(drafts), kept)
                    watch.draft_tokens += len(drafts)
                    watch.accepted_tokens += kept
                cache.truncate(len(token_ids))  # drafts after the kept ones leave the cache
                if len(token_ids) >= next_memory:
                    watch.sample_memory()
                    next_memory += MEMORY_EVERY
        finally:  # the stream may be closed at any token: the cache holds what `token_ids` says
            cache.truncate(len(token_ids))


class _Picker:
    """Chooses each generated token from its logits as the sampling settings say: the repetition
    penalty over the ids seen so far (materialised only when there is a penalty), EOS suppressed
    before `min_new_tokens`, one RNG for the whole answer."""

    def __init__(self, emitter: Emitter, eos: tuple[int, ...], prompt_ids: list[int]) -> None:
        self.emitter = emitter
        self.sampling = emitter.sampling
        self.eos = eos
        self.rng = np.random.default_rng(self.sampling.seed)
        self.penalised = self.sampling.repetition_penalty != 1.0
        self.seen = set(prompt_ids) if self.penalised else set()

    def pick(self, logits: np.ndarray, draft: int | None = None) -> int:
        """The next token from `logits` `(V,)`; with `draft`, speculative sampling against it."""
        if len(self.emitter.token_ids) < self.sampling.min_new_tokens:
            logits = suppress(logits, self.eos)
        seen = np.fromiter(self.seen, dtype=np.int64, count=len(self.seen)) if self.penalised else _NO_IDS
        if draft is None:
            token = sample(logits, self.sampling, seen, self.rng)
        else:
            token = sample_against_draft(logits, self.sampling, seen, self.rng, draft)
        if self.penalised:
            self.seen.add(token)
        return token


MEMORY_EVERY = 32  # decode steps between two reads of the resident memory (the final timings read it too)
_NO_IDS = np.zeros(0, dtype=np.int64)


def _holds(kept: Kept, token_ids: np.ndarray, images: tuple[ImageRun, ...]) -> bool:
    """Whether `kept` holds all of `token_ids` `(S,)` and the same images and videos at their places."""
    n = len(token_ids)
    return (
        len(kept.token_ids) >= n and bool((kept.token_ids[:n] == token_ids).all()) and set(images) <= set(kept.images)
    )


def _numpy(grid_thw) -> np.ndarray | None:
    return None if grid_thw is None else grid_thw.numpy()
