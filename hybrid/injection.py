"""Embedding lookup and image/video feature injection, exactly as `Qwen3VLModel.forward` does it.

`inject` returns the decoder's prefill inputs: `inputs_embeds` with the image features scattered
into the `<|image_pad|>` rows and the video features into the `<|video_pad|>` rows (`masked_scatter`
order: row-major over the prompt), and a dense `deepstack_embeds` tensor that is zero outside them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid.errors import BundleError, UserError
from hybrid.layout import EMBED_FILE, EMBED_SHARED
from hybrid.media import Media
from hybrid.vision import VisionFeatures


@dataclass(frozen=True)
class InjectedInputs:
    inputs_embeds: np.ndarray  # (1, S, H)
    visual_pos_masks: np.ndarray  # (1, S) bool
    deepstack_embeds: np.ndarray  # (D, 1, S, H)


class EmbeddingTable:
    """The text embedding matrix, memory-mapped: only the rows a prompt uses are paged in."""

    def __init__(self, path: str | Path) -> None:
        try:
            self.weight = np.load(str(path), mmap_mode="r")  # (V, H)
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot load the embedding table {path}: {exc}") from exc

    @classmethod
    def of_bundle(cls, bundle: Path) -> EmbeddingTable:
        """The bundle's table: its own file, or where `EMBED_SHARED` says the GenAI model holds it."""
        if (bundle / EMBED_FILE).is_file() or not (bundle / EMBED_SHARED).is_file():
            return cls(bundle / EMBED_FILE)
        table = cls.__new__(cls)
        try:
            where = json.loads((bundle / EMBED_SHARED).read_text())
            shape, dtype = tuple(where["shape"]), np.dtype(where["dtype"]).newbyteorder("<")
            table.weight = np.memmap(bundle / where["file"], dtype=dtype, mode="r", offset=where["offset"], shape=shape)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"cannot load the embedding table that {bundle / EMBED_SHARED} points to: {exc}") from exc
        return table

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.weight.shape[0]):
            raise UserError(f"token id out of range for a vocabulary of {self.weight.shape[0]}")
        return np.ascontiguousarray(self.weight[input_ids], dtype=np.float32)


def inject(
    input_ids: np.ndarray,
    embeddings: EmbeddingTable,
    token_ids: Mapping[Media, int],
    num_deepstack: int,
    features: Mapping[Media, VisionFeatures | None],
) -> InjectedInputs:
    """The prefill inputs of `input_ids` `(1, S)`: each kind of `token_ids` (its pad token's id) gets
    its `features` (none given: the prompt must hold none of its pads)."""
    inputs_embeds = embeddings(input_ids)  # (1, S, H)
    deepstack = np.zeros((num_deepstack, *inputs_embeds.shape), dtype=np.float32)
    visual = np.zeros(input_ids.shape, dtype=bool)  # (1, S)
    for kind, token_id in token_ids.items():
        mask = input_ids == token_id  # (1, S)
        _scatter(kind.name, mask, features.get(kind), inputs_embeds, deepstack)
        visual |= mask
    return InjectedInputs(inputs_embeds=inputs_embeds, visual_pos_masks=visual, deepstack_embeds=deepstack)


def _scatter(
    kind: str, mask: np.ndarray, features: VisionFeatures | None, inputs_embeds: np.ndarray, deepstack: np.ndarray
) -> None:
    """Write `features` into the `mask` rows of `inputs_embeds` `(1, S, H)` and `deepstack` `(D, 1, S, H)`."""
    n_tokens = int(mask.sum())
    n_features = 0 if features is None else int(features.image_embeds.shape[0])
    if n_tokens != n_features:
        raise UserError(
            f"{kind} features and {kind} tokens do not match: {n_tokens} <|{kind}_pad|> tokens in the prompt, "
            f"{n_features} {kind} features"
        )
    if features is None or not n_tokens:
        return
    inputs_embeds[mask] = features.image_embeds
    if features.deepstack_embeds.shape[0] != deepstack.shape[0]:
        raise BundleError(
            f"the vision tower gives {features.deepstack_embeds.shape[0]} DeepStack maps, "
            f"the decoder takes {deepstack.shape[0]}"
        )
    deepstack[:, mask] = features.deepstack_embeds
