"""Export of the Qwen3-VL text decoder to ONNX, with embeddings in and DeepStack features as an input.

The graph runs the HF text layers' own weights in an explicit loop: RMS-normed q/k, interleaved
M-RoPE from 3-D `position_ids`, grouped-query attention over `past ++ new` keys, and after layer
`i < D` the DeepStack map `i` is added (it is zero outside image rows, so adding it everywhere is
the same as the masked add in transformers). Only the last position's logits are computed.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 18


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


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

    def forward(self, inputs_embeds, attention_mask, position_ids, deepstack_embeds, *past):
        hidden = inputs_embeds  # (B, S, H)
        cos, sin = self.rotary_emb(hidden, position_ids)  # (B, S, head_dim)
        mask = self._causal_mask(attention_mask, hidden.shape[1], hidden.dtype)  # (B, 1, S, T)
        presents = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            attn, key, value = self._attention(
                layer.self_attn, layer.input_layernorm(hidden), cos, sin, mask, past[2 * i], past[2 * i + 1]
            )
            hidden = residual + attn
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if i < deepstack_embeds.shape[0]:
                hidden = hidden + deepstack_embeds[i]
            presents += [key, value]
        logits = self.lm_head(self.norm(hidden[:, -1:, :]))  # (B, 1, V)
        return (logits, *presents)

    def _attention(self, attn, x, cos, sin, mask, past_key, past_value):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        batch, seq, _ = x.shape
        shape = (batch, seq, -1, self.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)  # (B, nh, S, d)
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)  # (B, kv, S, d)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        key = torch.cat([past_key, k], dim=2)  # (B, kv, T, d)
        value = torch.cat([past_value, v], dim=2)
        # query head h reads kv head h // groups: group the queries instead of repeating the cache,
        # which would copy every layer's whole past on every step
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups, seq, self.head_dim)  # (B, kv, G, S, d)
        scores = torch.matmul(q, key.unsqueeze(2).transpose(3, 4)) * (self.head_dim**-0.5) + mask.unsqueeze(2)
        probs = torch.softmax(scores, dim=-1)  # (B, kv, G, S, T)
        out = torch.matmul(probs, value.unsqueeze(2))  # (B, kv, G, S, d)
        out = out.reshape(batch, self.num_heads, seq, self.head_dim).transpose(1, 2).reshape(batch, seq, -1)
        return attn.o_proj(out), key, value

    @staticmethod
    def _causal_mask(attention_mask, seq: int, dtype) -> torch.Tensor:
        total = attention_mask.shape[1]
        key_pos = torch.arange(total, device=attention_mask.device)
        query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def export_decoder(model, out_path: Path) -> None:
    """Trace `DecoderForExport` with a non-empty past and dynamic batch/sequence/past axes."""
    cfg = model.config.text_config
    num_layers = cfg.num_hidden_layers
    num_deepstack = len(model.config.vision_config.deepstack_visual_indexes)
    module = DecoderForExport(model).eval()
    batch, seq, past = 1, 3, 2
    example = (
        torch.randn(batch, seq, cfg.hidden_size),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).view(1, 1, -1).expand(3, batch, -1).contiguous(),
        torch.zeros(num_deepstack, batch, seq, cfg.hidden_size),
        *[torch.zeros(batch, cfg.num_key_value_heads, past, cfg.head_dim) for _ in range(2 * num_layers)],
    )
    input_names, output_names = decoder_io_names(num_layers)
    dynamic_axes = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {1: "batch", 2: "sequence"},
        "deepstack_embeds": {1: "batch", 2: "sequence"},
        "logits": {0: "batch"},
    }
    for name in input_names[4:]:
        dynamic_axes[name] = {0: "batch", 2: "past_sequence"}
    for name in output_names[1:]:
        dynamic_axes[name] = {0: "batch", 2: "total_sequence"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp, torch.no_grad():
        # over 2 GB the exporter writes one file per tensor: trace into a scratch folder, then
        # save one graph file and one weights file
        traced = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            example,
            str(traced),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
        save_with_external_data(onnx.load(str(traced)), out_path)


def save_with_external_data(proto, path: Path) -> None:
    """`path` holds the graph, `path.data` every weight: no 2 GB protobuf limit, one file to map."""
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    onnx.save_model(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=path.name + ".data", size_threshold=1024,
    )  # fmt: skip
    for written in path.parent.glob(path.name + "*"):
        written.chmod(0o644)
