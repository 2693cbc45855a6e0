"""The Qwen3-VL vision tower's transformer as an ONNX graph, written node by node and weight by weight.

The graph holds what costs time: the patch embedding, the blocks and the patch mergers (the final one
and the DeepStack ones), for ONE image of any size (`N` patches, a multiple of `merge**2`). What
depends on the image grid stays in the caller, computed exactly as transformers does it: the
interpolated position embeddings (added after the patch embedding) and the 2-D rotary angles (a
per-patch cos/sin table that onnxruntime's `RotaryEmbedding` reads with positions `0..N-1`). Attention
never crosses images, so one image per run needs no mask; the caller runs the images one by one.

`int8`: every linear layer but the patch embedding is a `DynamicQuantizeMatMul` with 7-bit weights in
int8, symmetric per output column (`hybrid.export.int8`: no 16-bit saturation on AVX2), and activations quantized per run (what torch's dynamic quantization
does, in onnxruntime's kernels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from hybrid.errors import BundleError
from hybrid.export.graph import GraphWriter, write_graph
from hybrid.export.int4 import CONTRIB
from hybrid.export.int8 import int8_columns
from hybrid.export.tensors import CheckpointTensors, ExternalData

LAYER_NORM_EPS = 1e-6  # transformers' `Qwen3VLVisionBlock` and `Qwen3VLVisionPatchMerger` hard-code it
INPUTS = ("pixel_values", "pos_embeds", "rotary_cos", "rotary_sin")
OUTPUTS = ("image_embeds", "deepstack_embeds")
_GELU = {"gelu_pytorch_tanh": "FastGelu", "gelu": "Gelu"}  # the block MLP's activation in onnxruntime


def export_vision(tensors: CheckpointTensors, prefix: str, config, out_path: Path, int8: bool) -> None:
    """Write `out_path` (the graph) and `out_path.data` (the weights) from the tensors named
    `prefix + <Qwen3VLVisionModel parameter>`; `config` is the `Qwen3VLVisionConfig`."""
    if config.hidden_act not in _GELU:
        raise BundleError(f"the vision export supports {', '.join(_GELU)} activations, got {config.hidden_act!r}")
    write_graph(out_path, lambda data: _Writer(data, tensors, prefix, config, int8).build())


class _Writer(GraphWriter):
    """Builds the graph and writes the weights it references, one tensor at a time."""

    def __init__(self, data: ExternalData, tensors: CheckpointTensors, prefix: str, config, int8: bool) -> None:
        super().__init__(data)
        self.tensors, self.prefix, self.config, self.int8 = tensors, prefix, config, int8
        self.heads = config.num_heads
        self.merged_width = config.hidden_size * config.spatial_merge_size**2

    def build(self) -> onnx.GraphProto:
        c = self.config
        hidden = self._patch_embed()
        positions = self.op("Unsqueeze", self.op("Range", self.const(0), self._count(), self.const(1)), self.const([0]))
        deepstack = []
        for i in range(c.depth):
            hidden = self._block(i, hidden, positions)
            if i in c.deepstack_visual_indexes:
                j = c.deepstack_visual_indexes.index(i)
                deepstack.append(self._merger(f"deepstack_merger_list.{j}.", hidden, postshuffle=True))
        self._merger("merger.", hidden, postshuffle=False, output=OUTPUTS[0])
        if deepstack:
            self.op("Concat", *(self.op("Unsqueeze", d, self.const([0])) for d in deepstack), axis=0, output=OUTPUTS[1])
        return self._graph(bool(deepstack))

    def _graph(self, with_deepstack: bool) -> onnx.GraphProto:
        c = self.config
        patch = c.in_channels * c.temporal_patch_size * c.patch_size**2
        half = c.hidden_size // c.num_heads // 2
        float_ = TensorProto.FLOAT
        inputs = [
            helper.make_tensor_value_info("pixel_values", float_, ["patches", patch]),
            helper.make_tensor_value_info("pos_embeds", float_, ["patches", c.hidden_size]),
            helper.make_tensor_value_info("rotary_cos", float_, ["patches", half]),
            helper.make_tensor_value_info("rotary_sin", float_, ["patches", half]),
        ]
        outputs = [helper.make_tensor_value_info("image_embeds", float_, ["tokens", c.out_hidden_size])]
        if with_deepstack:
            depth = len(c.deepstack_visual_indexes)
            outputs.append(
                helper.make_tensor_value_info("deepstack_embeds", float_, [depth, "tokens", c.out_hidden_size])
            )
        return helper.make_graph(self.nodes, "qwen3_vl_vision_tower", inputs, outputs, self.initializers)

    # --- graph pieces -------------------------------------------------------------------------

    def _patch_embed(self) -> str:
        """`(1, N, H)`: the Conv3d whose kernel equals its stride, as a matmul on the flattened
        patches, plus the position embeddings."""
        weight = self.tensors.read(self.prefix + "patch_embed.proj.weight")
        weight = weight.reshape(weight.shape[0], -1)  # (H, C*T*P*P), the order of a flattened patch
        bias = self.tensors.read(self.prefix + "patch_embed.proj.bias")
        embedded = self._linear("patch_embed", "pixel_values", weight, bias, int8=False)
        return self.op("Unsqueeze", self.op("Add", embedded, "pos_embeds"), self.const([0]))

    def _count(self) -> str:
        """The patch count `N` (a scalar)."""
        return self.op("Squeeze", self.op("Shape", "pixel_values", start=0, end=1), self.const([0]))

    def _block(self, i: int, hidden: str, positions: str) -> str:
        p = f"blocks.{i}."
        x = self._layer_norm(p + "norm1.", hidden)
        qkv = self._linear_from(p + "attn.qkv", x)
        q, k, v = self.op("Split", qkv, axis=-1, outputs=3, num_outputs=3)
        q, k = (self._rotate(t, positions) for t in (q, k))
        attn = self.op("MultiHeadAttention", q, k, v, domain=CONTRIB, num_heads=self.heads)
        hidden = self.op("Add", hidden, self._linear_from(p + "attn.proj", attn))
        x = self._layer_norm(p + "norm2.", hidden)
        act = _GELU[self.config.hidden_act]
        up = self.op(act, self._linear_from(p + "mlp.linear_fc1", x), domain=CONTRIB)
        return self.op("Add", hidden, self._linear_from(p + "mlp.linear_fc2", up))

    def _rotate(self, x: str, positions: str) -> str:
        """Qwen3-VL's vision rotary (`rotate_half` over the whole head) on `(1, N, heads * d)`."""
        return self.op(
            "RotaryEmbedding",
            x,
            positions,
            "rotary_cos",
            "rotary_sin",
            domain=CONTRIB,
            interleaved=0,
            num_heads=self.heads,
        )

    def _merger(self, p: str, hidden: str, postshuffle: bool, output: str | None = None) -> str:
        """`(N / merge**2, out)`: groups of `merge**2` neighbouring patches (adjacent rows, as the
        processor orders them) normed, concatenated and projected."""
        shape = self.const([-1, self.merged_width])
        if postshuffle:
            x = self._layer_norm(p + "norm.", self.op("Reshape", hidden, shape))
        else:
            x = self.op("Reshape", self._layer_norm(p + "norm.", hidden), shape)
        x = self.op("Gelu", self._linear_from(p + "linear_fc1", x), domain=CONTRIB)  # nn.GELU(): the erf form
        return self._linear_from(p + "linear_fc2", x, output=output)

    def _layer_norm(self, p: str, x: str) -> str:
        weight = self.initializer(p + "weight", self.tensors.read(self.prefix + p + "weight"))
        bias = self.initializer(p + "bias", self.tensors.read(self.prefix + p + "bias"))
        return self.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=LAYER_NORM_EPS)

    def _linear_from(self, name: str, x: str, output: str | None = None) -> str:
        weight = self.tensors.read(self.prefix + name + ".weight")
        bias = self.tensors.read(self.prefix + name + ".bias")
        return self._linear(name, x, weight, bias, self.int8, output)

    def _linear(
        self, name: str, x: str, weight: np.ndarray, bias: np.ndarray, int8: bool, output: str | None = None
    ) -> str:
        """`x @ weight.T + bias` for an `nn.Linear` weight `(N, K)`."""
        bias_name = self.initializer(name + ".bias", bias)
        if not int8:
            product = self.op("MatMul", x, self.initializer(name + ".weight", np.ascontiguousarray(weight.T)))
            return self.op("Add", product, bias_name, output=output)
        quantized, scale = int8_columns(weight)
        weight_name = self.initializer(name + ".weight", np.ascontiguousarray(quantized))
        scale_name = self.initializer(name + ".scale", scale)
        return self.op(
            "DynamicQuantizeMatMul", x, weight_name, scale_name, "", bias_name, domain=CONTRIB, output=output
        )
