"""3-D M-RoPE position ids, computed the way `Qwen3VLModel.get_rope_index` does, in numpy.

Text runs advance all three axes together; an image of `(t, h, w)` patches takes a
`t x h/merge x w/merge` block whose axes start at the current position, and the next run starts
after `max(h, w) / merge`. After the prompt every token uses `cache_len + rope_delta` on all axes.
"""

from __future__ import annotations

import itertools

import numpy as np


def get_rope_index(
    mm_token_type_ids: np.ndarray, image_grid_thw: np.ndarray | None, spatial_merge_size: int
) -> tuple[np.ndarray, int]:
    """`position_ids` `(3, 1, S)` for a single prompt, and its `rope_delta`."""
    types = mm_token_type_ids[0].tolist()
    grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist())
    pieces: list[np.ndarray] = []
    current = 0
    for modality, group in itertools.groupby(types):
        length = len(list(group))
        if modality == 0:
            pieces.append(np.broadcast_to(np.arange(current, current + length), (3, length)))
            current += length
            continue
        t, h, w = next(grids)
        block = _vision_positions(current, t, h // spatial_merge_size, w // spatial_merge_size)
        if block.shape[1] != length:
            raise ValueError(f"image run of {length} tokens does not match its grid {t}x{h}x{w}")
        pieces.append(block)
        current += max(h, w) // spatial_merge_size
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    rope_delta = int(positions.max()) + 1 - len(types) if len(types) else 0
    return positions[:, None, :].astype(np.int64), rope_delta


def decode_position(cache_len: int, rope_delta: int) -> np.ndarray:
    """`position_ids` `(3, 1, 1)` of the token written at cache slot `cache_len`."""
    return np.full((3, 1, 1), cache_len + rope_delta, dtype=np.int64)


def _vision_positions(start: int, t: int, h: int, w: int) -> np.ndarray:
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel() + start, hh.ravel() + start, ww.ravel() + start])
