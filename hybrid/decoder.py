"""The ONNX text decoder in onnxruntime: a KV cache per request, `forward` for prefill and each step.

The session is created once; a `KVCache` is created per request, and either dropped with it or
kept for the conversation's next request (see `hybrid.conversation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hybrid.errors import BundleError
from hybrid.threads import session_options


@dataclass
class StepInputs:
    """The one-token inputs of a decode step, bound once and rewritten in place each step."""

    embeds: np.ndarray  # (1, 1, H)
    positions: np.ndarray  # (3, 1, 1)
    values: dict[str, ort.OrtValue]  # the step's input name -> a value sharing the array's memory


@dataclass
class KVCache:
    """One request's keys and values: a buffer `(1, kv_heads, capacity, head_dim)` per layer and
    kind, bound once as both past and present, so the decoder writes each step's keys in place.

    The logits are written into `logits` (bound once); a decode step's inputs live in `step`, and
    `mask` is a row of ones whose first `length + new` entries are the attention mask."""

    buffers: list[np.ndarray]
    binding: ort.IOBinding
    logits: np.ndarray  # (1, 1, V)
    mask: np.ndarray  # (1, capacity)
    step: StepInputs
    length: int = 0
    step_bound: bool = False  # whether the binding holds `step`'s inputs (a prefill rebinds them)

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[2])

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens: the decoder reads only `attention_mask`'s length of the
        buffer and writes new tokens after it, so what lies beyond is simply overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length


class OnnxDecoder:
    def __init__(self, path: str | Path, threads: int = 0) -> None:
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"cannot load the ONNX decoder {path}: {exc}") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        past = inputs["past_key_values.0.key"].shape
        self.num_kv_heads, self.head_dim = int(past[1]), int(past[3])
        ds = inputs["deepstack_embeds"].shape
        self.num_deepstack, self.hidden_size = int(ds[0]), int(ds[3])
        vocab = self.session.get_outputs()[0].shape[-1]
        if not isinstance(vocab, int):
            raise BundleError(f"the ONNX decoder {path} does not state its vocabulary size; export it again")
        self.vocab_size = vocab

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for up to `capacity` tokens (prompt and generated)."""
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        buffers = [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]
        binding = self.session.io_binding()
        logits = np.zeros((1, 1, self.vocab_size), dtype=np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        for i, buffer in enumerate(buffers):
            layer, kind = divmod(i, 2)
            name = ("key", "value")[kind]
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the buffer's memory
            binding.bind_ortvalue_input(f"past_key_values.{layer}.{name}", value)
            binding.bind_ortvalue_output(f"present.{layer}.{name}", value)
        step = StepInputs(
            embeds=np.zeros((1, 1, self.hidden_size), dtype=np.float32),
            positions=np.zeros((3, 1, 1), dtype=np.int64),
            values={},
        )
        no_deepstack = np.zeros((self.num_deepstack, 1, 1, self.hidden_size), dtype=np.float32)
        for name, array in (
            ("inputs_embeds", step.embeds),
            ("position_ids", step.positions),
            ("deepstack_embeds", no_deepstack),
        ):
            step.values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        mask = np.ones((1, capacity), dtype=np.int64)
        return KVCache(buffers=buffers, binding=binding, logits=logits, mask=mask, step=step)

    def resized(self, cache: KVCache, capacity: int) -> KVCache:
        """A new cache of `capacity` tokens holding a copy of `cache`'s tokens."""
        if cache.length > capacity:
            raise ValueError(f"{cache.length} cached tokens do not fit in {capacity}")
        resized = self.new_cache(capacity)
        for source, target in zip(cache.buffers, resized.buffers):
            target[:, :, : cache.length] = source[:, :, : cache.length]
        resized.length = cache.length
        return resized

    def forward(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,  # (1, S, H)
        position_ids: np.ndarray,  # (3, 1, S)
        deepstack_embeds: np.ndarray,  # (D, 1, S, H)
    ) -> np.ndarray:
        """Run S new tokens after the cached ones (a prefill); returns a copy of the last position's
        logits `(V,)`."""
        seq = inputs_embeds.shape[1]
        self._check_room(cache, seq)
        binding = cache.binding
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("deepstack_embeds", np.ascontiguousarray(deepstack_embeds, dtype=np.float32))
        cache.step_bound = False
        self._run(cache, seq)
        return cache.logits[0, -1].copy()

    def step(self, cache: KVCache, embedding: np.ndarray, position: int) -> np.ndarray:
        """One decode step: the token's embedding row `(H,)` at M-RoPE position `position` (the
        same on all three axes for text). Allocates nothing; the returned logits `(V,)` are the
        cache's own buffer, valid until its next run."""
        self._check_room(cache, 1)
        step = cache.step
        step.embeds[0, 0] = embedding
        step.positions.fill(position)
        if not cache.step_bound:
            for name, value in step.values.items():
                cache.binding.bind_ortvalue_input(name, value)
            cache.step_bound = True
        self._run(cache, 1)
        return cache.logits[0, -1]

    def _check_room(self, cache: KVCache, seq: int) -> None:
        if cache.length + seq > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} tokens, {cache.length + seq} asked")

    def _run(self, cache: KVCache, seq: int) -> None:
        """Bind the attention mask for `seq` new tokens (a view of the cache's row of ones) and run."""
        cache.binding.bind_cpu_input("attention_mask", cache.mask[:, : cache.length + seq])
        self.session.run_with_iobinding(cache.binding)
        cache.length += seq
