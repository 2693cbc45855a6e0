"""The Qwen3-VL text decoder as an ONNX graph, written node by node and weight by weight.

The graph runs the checkpoint's text layers in an explicit loop: RMS-normed q/k, onnxruntime's fused
`GroupQueryAttention`, and after layer `i < D` the DeepStack map `i` is added (it is zero outside
image rows, so adding it everywhere is the same as the masked add in transformers). Each residual
add is fused into the RMS norm after it (`SkipSimplifiedLayerNormalization`, which also returns the
sum: the residual stream goes on from there), as GenAI's builder does: a few dozen fewer nodes a step,
about 5% of a 2B decode step. Only the last `num_logits` positions' logits are computed: one for a
prefill or a decode step, k + 1 for a pass that verifies k drafted tokens (`hybrid.speculative`).

M-RoPE: the interleaved angles of each new token are computed once from the 3-D `position_ids`, and
`GroupQueryAttention` rotates q and k itself: its cos/sin "cache" is that per-token table (padded to
the total length it checks for) and its rotary positions are `0..S-1`, rows of the table. One fused
kernel per layer instead of a dozen small ops; this assumes batch 1, which is what the routes run.

The KV cache is a fixed-size buffer per layer, `past_key_values.*` `[B, kv_heads, capacity, d]`:
bound as both past and present, `GroupQueryAttention` writes the new keys in place, so no step
copies the cache. `attention_mask` `[B, past + S]` says how much of the buffer is filled.

Nothing is traced: each weight is read from the checkpoint, fused (q/k/v, gate/up), transposed or
quantized to INT4 (`MatMulNBits`, by the `Int4Scheme` asked for) and appended to one external-data file
before the next is read, so the export never holds more than one layer's weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from hybrid.config import Precisions
from hybrid.errors import BundleError
from hybrid.export.graph import GraphWriter, write_graph
from hybrid.export.int4 import CONTRIB, Int4Scheme, int4_arrays, int4_names, matmul_nbits_attributes, quantize_int4
from hybrid.export.tensors import CheckpointTensors, ExternalData
from hybrid.layout import DECODER_NUM_LOGITS

log = logging.getLogger(__name__)

TEXT = "model.language_model."
BLOCK_BYTES = 8 * 2**20  # the most a transposed block of an fp32 weight holds


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The names the streamed graph shares with the traced reference (tests/traced_export.py); the
    streamed one also takes `DECODER_NUM_LOGITS`, last."""
    inputs = ["inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


@dataclass(frozen=True)
class DecoderShapes:
    """What the graph needs from a `Qwen3VLConfig`."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    num_deepstack: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> DecoderShapes:
        text = config.text_config
        rope = text.rope_parameters
        if rope.get("rope_type", "default") != "default" or not rope.get("mrope_interleaved", False):
            raise BundleError(f"the decoder export supports interleaved M-RoPE of type 'default' only, got {rope}")
        if getattr(text, "attention_bias", False):
            raise BundleError("the decoder export does not support attention biases (attention_bias=true)")
        return cls(
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=text.head_dim,
            vocab_size=text.vocab_size,
            rms_norm_eps=text.rms_norm_eps,
            rope_theta=rope["rope_theta"],
            mrope_section=tuple(rope["mrope_section"]),
            num_deepstack=len(config.vision_config.deepstack_visual_indexes),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False) or text.tie_word_embeddings),
        )

    def rope_axes(self) -> np.ndarray:
        """Which position axis (t=0, h=1, w=2) drives each rotary frequency: transformers' interleaving."""
        axes = np.zeros(self.head_dim // 2, dtype=np.int64)
        for axis in (1, 2):
            axes[axis : self.mrope_section[axis] * 3 : 3] = axis
        return axes

    def inv_freq(self) -> np.ndarray:
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
        return (1.0 / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)


def export_decoder(
    tensors: CheckpointTensors,
    config,
    out_path: Path,
    precision: str,
    on_layer: Callable[[int, int], None] = lambda done, total: None,
    int4: Int4Scheme = Int4Scheme(),
) -> None:
    """Write `out_path` (the graph) and `out_path.data` (every weight); `on_layer(done, total)` after
    each layer. With `precision` "int4", the linear layers and the LM head are quantized by `int4`."""
    shapes = DecoderShapes.from_config(config)
    scheme = int4 if Precisions.of(precision).decoder == "int4" else None
    write_graph(out_path, lambda data: _Writer(data, tensors, shapes, scheme).build(on_layer))


class _Writer(GraphWriter):
    """Builds the graph and writes the weights it references, layer by layer."""

    def __init__(
        self, data: ExternalData, tensors: CheckpointTensors, shapes: DecoderShapes, int4: Int4Scheme | None
    ) -> None:
        super().__init__(data)
        self.tensors, self.shapes, self.int4 = tensors, shapes, int4

    def build(self, on_layer: Callable[[int, int], None]) -> onnx.GraphProto:
        s = self.shapes
        residual, branch = "inputs_embeds", None
        seqlens_k, total_length = self._lengths()
        rotary = self._rotary()
        for i in range(s.num_layers):
            residual, branch = self._layer(i, residual, branch, rotary, seqlens_k, total_length)
            on_layer(i + 1, s.num_layers)
        first = self.op("Neg", DECODER_NUM_LOGITS)
        residual, branch = (
            self.op("Slice", x, first, self.const([np.iinfo(np.int64).max]), self.const([1]))
            for x in (residual, branch)
        )  # the last `num_logits` positions only: they alone give logits
        normed, _ = self._add_norm(TEXT + "norm.weight", residual, branch)
        head = TEXT + "embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
        self._linear("lm_head", normed, self.tensors.read(head), output="logits")
        return self._graph()

    def _graph(self) -> onnx.GraphProto:
        s = self.shapes
        float_ = TensorProto.FLOAT
        kv = ["batch", s.num_kv_heads, "capacity", s.head_dim]
        inputs = [
            helper.make_tensor_value_info("inputs_embeds", float_, ["batch", "sequence", s.hidden_size]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [3, "batch", "sequence"]),
            helper.make_tensor_value_info(
                "deepstack_embeds", float_, [s.num_deepstack, "batch", "sequence", s.hidden_size]
            ),
        ]
        outputs = [helper.make_tensor_value_info("logits", float_, ["batch", "num_logits", s.vocab_size])]
        input_names, output_names = decoder_io_names(s.num_layers)
        inputs += [helper.make_tensor_value_info(name, float_, kv) for name in input_names[4:]]
        inputs.append(helper.make_tensor_value_info(DECODER_NUM_LOGITS, TensorProto.INT64, [1]))
        outputs += [helper.make_tensor_value_info(name, float_, kv) for name in output_names[1:]]
        return helper.make_graph(self.nodes, "qwen3_vl_text_decoder", inputs, outputs, self.initializers)

    # --- graph pieces -------------------------------------------------------------------------

    def _lengths(self) -> tuple[str, str]:
        """`seqlens_k` `(B,)` int32: index of the last filled slot; `total_length` scalar int32: past + S."""
        filled = self.op("ReduceSum", "attention_mask", self.const([1]), keepdims=0)
        seqlens_k = self.op("Cast", self.op("Sub", filled, self.const(1)), to=TensorProto.INT32)
        total = self.op("Gather", self.op("Shape", "attention_mask"), self.const(1), axis=0)
        return seqlens_k, self.op("Cast", total, to=TensorProto.INT32)

    def _rotary(self) -> tuple[str, str, str]:
        """cos, sin `(total, d/2)` of the new tokens' interleaved M-RoPE angles (rows past S are zero
        padding), and the rotary positions `(1, S)` that pick their rows, shared by every layer."""
        s = self.shapes
        positions = self.op("Transpose", self.op("Cast", "position_ids", to=TensorProto.FLOAT), perm=[1, 2, 0])
        chosen = self.op("Gather", positions, self.const(s.rope_axes()), axis=2)  # (B, S, d/2)
        angles = self.op("Reshape", self.op("Mul", chosen, self.const(s.inv_freq())), self.const([-1, s.head_dim // 2]))
        new = self.op("Gather", self.op("Shape", "inputs_embeds"), self.const(1), axis=0)
        total = self.op("Gather", self.op("Shape", "attention_mask"), self.const(1), axis=0)
        padding = self.op(
            "Concat",
            self.const([0, 0]),
            self.op("Unsqueeze", self.op("Sub", total, new), self.const([0])),
            self.const([0]),
            axis=0,
        )
        cos, sin = (self.op("Pad", self.op(f, angles), padding) for f in ("Cos", "Sin"))
        rows = self.op("Unsqueeze", self.op("Range", self.const(0), new, self.const(1)), self.const([0]))
        return cos, sin, rows

    def _layer(
        self, i: int, residual: str, branch: str | None, rotary: tuple[str, str, str], seqlens_k: str, total_length: str
    ) -> tuple[str, str]:
        """One decoder layer. The residual stream is carried as `residual` plus the last branch's
        output `branch` (None before the first layer), so that each addition is fused into the norm
        that follows it (`SkipSimplifiedLayerNormalization`); returns the new pair."""
        s = self.shapes
        prefix = f"{TEXT}layers.{i}."
        x, residual = self._add_norm(prefix + "input_layernorm.weight", residual, branch)
        qkv = self._linear(f"layers.{i}.qkv", x, self._fused(prefix + "self_attn.", "q_proj", "k_proj", "v_proj"))
        kv_width = s.num_kv_heads * s.head_dim
        q, k, v = self.op("Split", qkv, self.const([s.num_heads * s.head_dim, kv_width, kv_width]), axis=-1, outputs=3)
        q = self._head_norm(prefix + "self_attn.q_norm.weight", q)
        k = self._head_norm(prefix + "self_attn.k_norm.weight", k)
        # the new keys and values are written straight into the graph's present outputs, so a buffer
        # bound as both past and present is updated in place; q and k are rotated inside
        attn, key, value = self.op(
            "GroupQueryAttention",
            q,
            k,
            v,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            seqlens_k,
            total_length,
            *rotary,
            domain=CONTRIB,
            outputs=3,
            output=[None, f"present.{i}.key", f"present.{i}.value"],
            num_heads=s.num_heads,
            kv_num_heads=s.num_kv_heads,
            scale=float(s.head_dim**-0.5),
            do_rotary=1,
            rotary_interleaved=0,
        )
        o_proj = self.tensors.read(prefix + "self_attn.o_proj.weight")
        attn = self._linear(f"layers.{i}.o_proj", attn, o_proj)
        x, residual = self._add_norm(prefix + "post_attention_layernorm.weight", residual, attn)
        gate_up = self._linear(f"layers.{i}.gate_up", x, self._fused(prefix + "mlp.", "gate_proj", "up_proj"))
        gate, up = self.op("Split", gate_up, axis=-1, outputs=2, num_outputs=2)
        act = self.op("Mul", self.op("Mul", gate, self.op("Sigmoid", gate)), up)  # silu(gate) * up
        down = self._linear(f"layers.{i}.down_proj", act, self.tensors.read(prefix + "mlp.down_proj.weight"))
        if i < s.num_deepstack:
            down = self.op("Add", down, self.op("Gather", "deepstack_embeds", self.const(i), axis=0))
        return residual, down

    def _add_norm(self, weight_name: str, residual: str, branch: str | None) -> tuple[str, str]:
        """`residual + branch` RMS-normed, and that sum (the new residual) in one node; without a
        branch, `residual` normed and itself."""
        if branch is None:
            return self._norm(weight_name, residual), residual
        weight = self.initializer(weight_name, self.tensors.read(weight_name))
        normed, _, _, total = self.op(
            "SkipSimplifiedLayerNormalization",
            residual,
            branch,
            weight,
            domain=CONTRIB,
            outputs=4,
            output=[None, "", "", None],
            epsilon=float(self.shapes.rms_norm_eps),
        )
        return normed, total

    def _norm(self, weight_name: str, x: str) -> str:
        """RMSNorm over the last axis (onnxruntime's `SimplifiedLayerNormalization`)."""
        weight = self.initializer(weight_name, self.tensors.read(weight_name))
        return self.op("SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=float(self.shapes.rms_norm_eps))

    def _head_norm(self, weight_name: str, x: str) -> str:
        """`(B, S, heads * d)` RMS-normed per head, same shape."""
        per_head = self.op("Reshape", x, self.const([0, 0, -1, self.shapes.head_dim]))
        return self.op("Reshape", self._norm(weight_name, per_head), self.const([0, 0, -1]))

    def _fused(self, prefix: str, *names: str) -> np.ndarray:
        """The weights `(N_a + N_b + ..., K)` of several linear layers, one matmul for all."""
        return np.concatenate([self.tensors.read(prefix + name + ".weight") for name in names])

    def _linear(self, name: str, x: str, weight: np.ndarray, output: str | None = None) -> str:
        """`x @ weight.T` for an `nn.Linear` weight `(N, K)`: fp32 `MatMul` or INT4 `MatMulNBits`."""
        n, k = weight.shape
        if self.int4 is None:
            step = max(1, BLOCK_BYTES // (4 * n))  # rows of the transpose per block
            blocks = (weight[:, first : first + step].T for first in range(0, k, step))
            self.initializers.append(self.data.add_blocks(name + ".weight", np.float32, (k, n), blocks))
            return self.op("MatMul", x, name + ".weight", output=output)
        setting = self.int4.head if name == "lm_head" else self.int4.layers
        quantized = quantize_int4(weight, setting)
        self.initializers += [self.data.add(key, array) for key, array in int4_arrays(name + ".weight", quantized)]
        return self.op(
            "MatMulNBits",
            x,
            *int4_names(name + ".weight", setting),
            domain=CONTRIB,
            output=output,
            **matmul_nbits_attributes(setting, k, n),
        )
