"""The ONNX text decoder in onnxruntime: a KV cache per request, `forward` for prefill and each step.

The session is created once; a `KVCache` is created per request and dropped with it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hybrid.errors import BundleError

log = logging.getLogger(__name__)


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


@dataclass
class KVCache:
    """Per-layer keys and values `(1, kv_heads, length, head_dim)`, as the last forward returned them."""

    arrays: list[np.ndarray]
    length: int = 0
    feeds: dict[str, np.ndarray] = field(default_factory=dict)


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
        self.output_names = [o.name for o in self.session.get_outputs()]

    def new_cache(self) -> KVCache:
        empty = np.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=np.float32)
        return KVCache(arrays=[empty] * (2 * self.num_layers))

    def forward(
        self,
        cache: KVCache,
        inputs_embeds: np.ndarray,  # (1, S, H)
        position_ids: np.ndarray,  # (3, 1, S)
        deepstack_embeds: np.ndarray,  # (D, 1, S, H)
    ) -> np.ndarray:
        """Run S new tokens after the cached ones; returns the last position's logits `(V,)`."""
        seq = inputs_embeds.shape[1]
        feeds = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": np.ones((1, cache.length + seq), dtype=np.int64),
            "position_ids": position_ids,
            "deepstack_embeds": deepstack_embeds,
        }
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = cache.arrays[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache.arrays[2 * i + 1]
        logits, *presents = self.session.run(self.output_names, feeds)
        cache.arrays = presents
        cache.length += seq
        return logits[0, -1]
