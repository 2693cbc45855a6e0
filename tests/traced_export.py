"""The decoder export as it was before it streamed: `torch.onnx` traces the loaded fp32 model, and
onnxruntime's `MatMulNBitsQuantizer` turns its MatMuls into INT4. Kept only as the reference the
streamed export is compared with (tests/test_export_stream.py); it holds the whole model twice.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from hybrid.export.decoder import decoder_io_names
from hybrid.export.int4 import ACCURACY_LEVEL, CONTRIB

OPSET = 18


class _GroupQueryAttention(torch.autograd.Function):
    """onnxruntime's `com.microsoft.GroupQueryAttention` (causal, no rotary: q and k come rotated).

    Only its ONNX form matters: the eager forward exists for tracing and returns the right shapes."""

    @staticmethod
    def forward(ctx, q, k, v, past_key, past_value, seqlens_k, total_length, num_heads, kv_heads, scale):
        return torch.zeros_like(q), past_key.clone(), past_value.clone()

    @staticmethod
    def symbolic(g, q, k, v, past_key, past_value, seqlens_k, total_length, num_heads, kv_heads, scale):
        out, key, value = g.op(
            f"{CONTRIB}::GroupQueryAttention",
            q,
            k,
            v,
            past_key,
            past_value,
            seqlens_k,
            total_length,
            num_heads_i=num_heads,
            kv_num_heads_i=kv_heads,
            scale_f=scale,
            outputs=3,
        )
        # the exporter cannot infer a contrib op's outputs (and warns per layer): they are shaped
        # like the query and the buffers
        for output, like in ((out, q), (key, past_key), (value, past_value)):
            output.setType(like.type())
        return out, key, value


class DecoderForExport(nn.Module):
    """`(inputs_embeds, attention_mask, position_ids, deepstack_embeds, *past)` -> `(logits, *present)`."""

    def __init__(self, model) -> None:
        super().__init__()
        text = model.model.language_model
        self.layers = text.layers
        self.norm = text.norm
        self.rotary_emb = text.rotary_emb
        self.lm_head = model.lm_head
        cfg = text.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # one matmul for q, k and v, one for gate and up: fewer, larger INT4 kernels per step
        self.qkv = nn.ModuleList(
            _fused(a.q_proj, a.k_proj, a.v_proj) for a in (layer.self_attn for layer in self.layers)
        )
        self.gate_up = nn.ModuleList(_fused(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in self.layers)

    def forward(self, inputs_embeds, attention_mask, position_ids, deepstack_embeds, *past):
        hidden = inputs_embeds  # (B, S, H)
        cos, sin = self.rotary_emb(hidden, position_ids)  # (B, S, head_dim)
        seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)  # (B,): last filled slot
        total_length = torch.ones_like(attention_mask[0]).sum().to(torch.int32)  # scalar: past + S, traced as a shape
        presents = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            attn, key, value = self._attention(
                i,
                layer.self_attn,
                layer.input_layernorm(hidden),
                cos,
                sin,
                seqlens_k,
                total_length,
                past[2 * i],
                past[2 * i + 1],
            )
            hidden = residual + attn
            hidden = hidden + self._mlp(i, layer.mlp, layer.post_attention_layernorm(hidden))
            if i < deepstack_embeds.shape[0]:
                hidden = hidden + deepstack_embeds[i]
            presents += [key, value]
        logits = self.lm_head(self.norm(hidden[:, -1:, :]))  # (B, 1, V)
        return (logits, *presents)

    def _mlp(self, i, mlp, x):
        gate, up = self.gate_up[i](x).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def _attention(self, i, attn, x, cos, sin, seqlens_k, total_length, past_key, past_value):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        batch, seq, _ = x.shape
        shape = (batch, seq, -1, self.head_dim)
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv[i](x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = attn.q_norm(q.reshape(shape)).transpose(1, 2)  # (B, nh, S, d)
        k = attn.k_norm(k.reshape(shape)).transpose(1, 2)  # (B, kv, S, d)
        v = v.reshape(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q = q.transpose(1, 2).reshape(batch, seq, -1)  # (B, S, nh * d)
        k = k.transpose(1, 2).reshape(batch, seq, -1)  # (B, S, kv * d)
        v = v.transpose(1, 2).reshape(batch, seq, -1)
        out, key, value = _GroupQueryAttention.apply(
            q,
            k,
            v,
            past_key,
            past_value,
            seqlens_k,
            total_length,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim**-0.5,
        )
        return attn.o_proj(out), key, value


def _fused(*linears: nn.Linear) -> nn.Linear:
    """One `nn.Linear` whose outputs are those of `linears`, side by side."""
    has_bias = [lin.bias is not None for lin in linears]
    width = sum(lin.out_features for lin in linears)
    fused = nn.Linear(linears[0].in_features, width, bias=all(has_bias), device="meta")  # weights set below
    fused.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
    if any(has_bias):
        if not all(has_bias):
            raise ValueError("cannot fuse linear layers where only some have a bias")
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return fused


def export_decoder(model, out_path: Path) -> None:
    """Trace `DecoderForExport` with a non-empty past and dynamic batch/sequence/past axes."""
    cfg = model.config.text_config
    num_layers = cfg.num_hidden_layers
    num_deepstack = len(model.config.vision_config.deepstack_visual_indexes)
    module = DecoderForExport(model).eval()
    batch, seq, past, capacity = 1, 3, 2, 8
    example = (
        torch.randn(batch, seq, cfg.hidden_size),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).view(1, 1, -1).expand(3, batch, -1).contiguous(),
        torch.zeros(num_deepstack, batch, seq, cfg.hidden_size),
        *[torch.zeros(batch, cfg.num_key_value_heads, capacity, cfg.head_dim) for _ in range(2 * num_layers)],
    )
    input_names, output_names = decoder_io_names(num_layers)
    dynamic_axes = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {1: "batch", 2: "sequence"},
        "deepstack_embeds": {1: "batch", 2: "sequence"},
        "logits": {0: "batch"},
    }
    for name in input_names[4:] + output_names[1:]:  # the KV buffers, bound as past and present
        dynamic_axes[name] = {0: "batch", 2: "capacity"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp, torch.no_grad(), warnings.catch_warnings():
        # over 2 GB the exporter writes one file per tensor: trace into a scratch folder, then
        # save one graph file and one weights file
        traced = Path(tmp) / "model.onnx"
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the DeepStack `if`, by design
        torch.onnx.export(
            module,
            example,
            str(traced),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            custom_opsets={CONTRIB: 1},
            dynamo=False,
        )
        save_with_external_data(onnx.load(str(traced)), out_path)


def save_with_external_data(proto, path: Path) -> None:
    """`path` holds the graph, `path.data` every weight: no 2 GB protobuf limit, one file to map."""
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    for written in path.parent.glob(path.name + "*"):
        written.chmod(0o644)


def quantize_int4(path: Path) -> None:
    """onnxruntime's own INT4 pass over a saved graph: block 32, symmetric, our accuracy level."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(path)), block_size=32, is_symmetric=True, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    save_with_external_data(quantizer.model.model, path)
