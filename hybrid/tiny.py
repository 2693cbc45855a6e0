"""Builds small Qwen3-VL checkpoints from a config, with random weights, entirely offline.

`build_checkpoint` writes a normal checkpoint folder (config, safetensors, generation config,
tokenizer, processor) that `AutoProcessor`, `Qwen3VLForConditionalGeneration.from_pretrained` and our
export load like any downloaded one. Tests, the benchmark presets and the demo model all use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Qwen's special tokens, in the order the real tokenizer assigns them after its byte-level vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A subset of the Qwen3-VL chat template: system/user/assistant turns whose content is a string or a
# list of {"type": "image"} / {"type": "video"} / {"type": "text"} items. Real checkpoints bring their
# own template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

DEFAULT_CORPUS = (
    "What is in this picture? Describe the image in one sentence.",
    "A red circle in the top left corner on a white background.",
    "Hello! I am a small vision-language model. What is 3 plus 4? It is 7.",
    "The quick brown fox jumps over the lazy dog, 0123456789 times.",
    "Ünïcödé, emoji 🙂 and CJK 漢字 must round-trip through the byte-level tokenizer.",
)


@dataclass(frozen=True)
class TinySpec:
    """Shapes of a small Qwen3-VL. `vocab_size=None` means the tokenizer's size."""

    hidden_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    mrope_section: tuple[int, int, int] = (4, 2, 2)
    rope_theta: float = 5_000_000.0
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    vision_depth: int = 3
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    patch_size: int = 16
    num_position_embeddings: int = 16
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    min_pixels: int = 32 * 32
    max_pixels: int = 128 * 128
    # the video processor's sampling and size (pixels over all frames); None: transformers' defaults
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    initializer_range: float = 0.3
    max_position_embeddings: int = 4096
    bpe_vocab_size: int = 600
    corpus: tuple[str, ...] = field(default=DEFAULT_CORPUS)

    def __post_init__(self) -> None:
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if any(i >= self.vision_depth for i in self.deepstack_visual_indexes):
            raise ValueError("deepstack_visual_indexes must be vision layer indexes")


def build_tokenizer(corpus: Iterable[str], bpe_vocab_size: int):
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on `corpus`, plus Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.model_max_length = 32768
    return tokenizer


def build_processor(tokenizer, spec: TinySpec):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=spec.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    own = dict(fps=spec.video_fps, max_frames=spec.video_max_frames)
    if spec.video_min_pixels is not None or spec.video_max_pixels is not None:
        defaults = Qwen3VLVideoProcessor.size
        own["size"] = {
            "shortest_edge": spec.video_min_pixels or defaults["shortest_edge"],
            "longest_edge": spec.video_max_pixels or defaults["longest_edge"],
        }
    video_processor = Qwen3VLVideoProcessor(
        patch_size=spec.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        **{key: value for key, value in own.items() if value is not None},
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(spec: TinySpec, tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = spec.vocab_size or len(tokenizer)
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "mrope_section": list(spec.mrope_section),
            "mrope_interleaved": True,
        },
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=spec.hidden_size,
        num_position_embeddings=spec.num_position_embeddings,
        deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
        initializer_range=spec.initializer_range,
    )
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def build_checkpoint(
    out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0, model=None, dtype: str = "float32"
) -> Path:
    """Write a complete Qwen3-VL checkpoint folder; `model` (already trained) replaces random weights.

    Random weights are made and saved in `dtype` (`bfloat16` halves the memory and the files of the
    large presets, as real checkpoints do)."""
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.corpus, spec.bpe_vocab_size)
    processor = build_processor(tokenizer, spec)
    if model is None:
        config = build_config(spec, tokenizer)
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
