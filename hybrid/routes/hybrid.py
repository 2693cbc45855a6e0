"""The hybrid route: PyTorch vision tower -> injection -> our ONNX decoder and generation loop.

Never loads the PyTorch language model: only the vision tower, the embedding table and the decoder.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from hybrid.decoder import KVCache, OnnxDecoder
from hybrid.injection import EmbeddingTable, InjectedInputs, inject
from hybrid.metrics import Stopwatch
from hybrid.processor import PreparedInputs, Processor
from hybrid.rope import decode_position, get_rope_index
from hybrid.routes.common import Emitter, prepare, timed
from hybrid.sampling import sample, suppress
from hybrid.types import Chunk, Request
from hybrid.vision import VisionFeatures, VisionTower


class HybridRoute:
    name = "hybrid"

    def __init__(
        self, processor: Processor, vision: VisionTower, embeddings: EmbeddingTable, decoder: OnnxDecoder
    ) -> None:
        self.processor = processor
        self.vision = vision
        self.embeddings = embeddings
        self.decoder = decoder

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        watch = Stopwatch()
        inputs = prepare(self.processor, request, watch)
        features = timed(watch, "vision", self.encode, inputs)
        injected = self.inject(inputs, features)
        positions, rope_delta = get_rope_index(
            inputs.mm_token_type_ids, _grid(inputs), self.vision.spatial_merge_size
        )
        cache = self.decoder.new_cache(inputs.num_tokens + request.sampling.max_new_tokens)
        logits = timed(
            watch, "prefill", self.decoder.forward, cache, injected.inputs_embeds, positions, injected.deepstack_embeds
        )
        emitter = Emitter(self.name, self.processor, request.sampling, watch, cancel)
        yield from self.decode(emitter, cache, logits, inputs.input_ids[0], rope_delta)
        yield emitter.final()

    def encode(self, inputs: PreparedInputs) -> VisionFeatures | None:
        if inputs.pixel_values is None:
            return None
        return self.vision.encode(inputs.pixel_values, inputs.image_grid_thw)

    def inject(self, inputs: PreparedInputs, features: VisionFeatures | None) -> InjectedInputs:
        return inject(
            inputs.input_ids, self.embeddings, self.processor.image_token_id, self.decoder.num_deepstack, features
        )

    def decode(
        self, emitter: Emitter, cache: KVCache, logits: np.ndarray, prompt_ids: np.ndarray, rope_delta: int
    ) -> Iterator[Chunk]:
        sampling = emitter.sampling
        rng = np.random.default_rng(sampling.seed)
        seen = set(prompt_ids.tolist())
        no_deepstack = np.zeros((self.decoder.num_deepstack, 1, 1, self.decoder.hidden_size), dtype=np.float32)
        eos = self.processor.eos_token_ids
        while True:
            if len(emitter.token_ids) < sampling.min_new_tokens:
                logits = suppress(logits, eos)
            token = sample(logits, sampling, np.fromiter(seen, dtype=np.int64), rng)
            yield emitter.push(token)
            if emitter.done:
                return
            seen.add(token)
            embeds = self.embeddings(np.array([[token]], dtype=np.int64))
            logits = self.decoder.forward(cache, embeds, decode_position(cache.length, rope_delta), no_deepstack)
            emitter.watch.sample_memory()


def _grid(inputs: PreparedInputs) -> np.ndarray | None:
    return None if inputs.image_grid_thw is None else inputs.image_grid_thw.numpy()

