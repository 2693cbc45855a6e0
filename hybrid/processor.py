"""The checkpoint's own HF processor, wrapped: a conversation in, model inputs out.

`Processor.prepare` renders the messages with the checkpoint's chat template and runs the real
`Qwen3VLProcessor` on the text and images. Token ids (image pad, EOS) come from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hybrid.config import DEFAULT_MAX_IMAGE_TOKENS
from hybrid.errors import BundleError, UserError
from hybrid.images import to_rgb
from hybrid.thinking import opens_thinking
from hybrid.types import Message

# Private-use characters mark where message texts go in the rendered template.
_SENTINEL_OPEN, _SENTINEL_CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_SENTINEL_OPEN}(\\d+){_SENTINEL_CLOSE}")


def pixel_digest(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> str:
    """A digest of images' patches and grids: equal digests, equal pictures for the model."""
    digest = hashlib.sha256(pixel_values.numpy().tobytes())
    digest.update(image_grid_thw.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class PreparedInputs:
    """Everything the routes need for one prompt; tensors keep transformers' names and shapes."""

    input_ids: np.ndarray  # (1, S) int64
    mm_token_type_ids: np.ndarray  # (1, S) int64: 0 text, 1 image
    pixel_values: torch.Tensor | None  # (patches, C * T * P * P)
    image_grid_thw: torch.Tensor | None  # (images, 3)
    image_tokens: tuple[int, ...] = ()  # <|image_pad|> tokens of each image, in prompt order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def image_spans(self) -> list[tuple[int, int]]:
        """`[start, end)` of each image's `<|image_pad|>` run in the prompt, in prompt order."""
        is_image = np.concatenate([[0], self.mm_token_type_ids[0], [0]])
        edges = np.flatnonzero(np.diff(is_image))
        return list(zip(edges[::2].tolist(), edges[1::2].tolist()))

    def image_pixels(self, index: int) -> torch.Tensor:
        """The `pixel_values` rows of image `index` `(patches_i, C * T * P * P)`."""
        sizes = self.image_grid_thw.prod(-1).tolist()
        start = sum(sizes[:index])
        return self.pixel_values[start : start + sizes[index]]

    def tail(self, start: int) -> "PreparedInputs":
        """The prompt from token `start` on, with only the images inside it; `start` must not cut
        an image."""
        spans = self.image_spans()
        if any(s < start < e for s, e in spans):
            raise ValueError(f"token {start} is inside an image")
        first = sum(1 for _, e in spans if e <= start)
        pixel_values = image_grid_thw = None
        if first < len(spans):
            offset = int(self.image_grid_thw[:first].prod(-1).sum())
            pixel_values, image_grid_thw = self.pixel_values[offset:], self.image_grid_thw[first:]
        return replace(
            self,
            input_ids=self.input_ids[:, start:],
            mm_token_type_ids=self.mm_token_type_ids[:, start:],
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_tokens=self.image_tokens[first:],
        )


class Processor:
    """Chat template + tokenizer + image processor of one checkpoint."""

    def __init__(self, path: str | Path, max_context: int) -> None:
        from transformers import AutoProcessor

        try:
            self.hf = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot load the processor from {path}: {exc}") from exc
        self.tokenizer = self.hf.tokenizer
        self.image_token_id: int = int(self.hf.image_token_id)
        self.eos_token_ids: tuple[int, ...] = _eos_ids(Path(path), self.tokenizer)
        self.max_context = max_context
        self.opens_thinking = opens_thinking(self.render((Message("user", "?"),)))  # a Thinking template

    def render(self, messages: tuple[Message, ...]) -> str:
        """The chat-templated prompt text, ending with the assistant's turn opener."""
        conversation = [_to_hf_message(m) for m in messages]
        return self.hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def prepare(
        self, messages: tuple[Message, ...], max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS
    ) -> PreparedInputs:
        """Tokenize the conversation. Message texts are always plain text: a `<|im_end|>` or
        `<|image_pad|>` typed by a user becomes ordinary characters, never a control token.
        Each image is scaled (aspect kept) to at most `max_image_tokens` image tokens, and never
        beyond the checkpoint's own limit."""
        images = [to_rgb(img) for m in messages for img in m.images]
        pixel_values = image_grid_thw = None
        pads: list[int] = []
        if images:
            batch = self.hf.image_processor(images=images, return_tensors="pt", size=self.image_size(max_image_tokens))
            pixel_values, image_grid_thw = batch["pixel_values"], batch["image_grid_thw"]
            pads = (image_grid_thw.prod(-1) // self.hf.image_processor.merge_size**2).tolist()
        ids = self._tokenize(messages, pads)
        if ids.shape[1] >= self.max_context:
            raise UserError(
                f"the prompt is {ids.shape[1]} tokens, the model's context is {self.max_context}: "
                "shorten it or start a new conversation"
            )
        return PreparedInputs(
            input_ids=ids,
            mm_token_type_ids=(ids == self.image_token_id).astype(np.int64),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_tokens=tuple(pads),
        )

    def image_size(self, max_image_tokens: int) -> dict[str, int]:
        """The image processor's `size` (pixel counts) for a budget of `max_image_tokens` per image:
        one token covers `(patch * merge)^2` pixels; the checkpoint's limits still apply."""
        processor = self.hf.image_processor
        own = processor.size
        token_pixels = (processor.patch_size * processor.merge_size) ** 2
        longest = min(int(own["longest_edge"]), max_image_tokens * token_pixels)
        return {"shortest_edge": min(int(own["shortest_edge"]), longest), "longest_edge": longest}

    def _tokenize(self, messages: tuple[Message, ...], pads: list[int]) -> np.ndarray:
        """The template is rendered around sentinels; template pieces are tokenized with special
        tokens (each image placeholder expanded to its patch count), message texts without."""
        marked = tuple(replace(m, text=f"{_SENTINEL_OPEN}{i}{_SENTINEL_CLOSE}" if m.text else "")
                       for i, m in enumerate(messages))  # fmt: skip
        pieces = _SENTINEL.split(self.render(marked))
        placeholder = self.hf.image_token
        counts = iter(pads)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                text, split = messages[int(piece)].text, True
            else:
                text = re.sub(re.escape(placeholder), lambda _: placeholder * next(counts), piece)
                split = False
            ids += self.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]
        if next(counts, None) is not None:
            raise UserError("the chat template did not place every image; the checkpoint's template is unusual")
        return np.array([ids], dtype=np.int64)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def hf_content(text: str, images: int) -> list[dict]:
    """A turn's content as the chat template reads it: `images` image placeholders, then the text."""
    content: list[dict] = [{"type": "image"} for _ in range(images)]
    if text:
        content.append({"type": "text", "text": text})
    return content


def _to_hf_message(message: Message) -> dict:
    return {"role": message.role, "content": hf_content(message.text, len(message.images))}


def _eos_ids(path: Path, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what `generate` stops on), else the tokenizer's EOS."""
    gen_path = path / "generation_config.json"
    ids: list[int] = []
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    if not ids:
        raise BundleError(f"no EOS token id in {gen_path} or the tokenizer")
    return tuple(int(i) for i in ids)
