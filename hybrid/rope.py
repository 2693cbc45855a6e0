"""3-D M-RoPE position ids, computed the way `Qwen3VLModel.get_rope_index` does, in numpy.

Text runs advance all three axes together; an image of `(t, h, w)` patches takes a
`t x h/merge x w/merge` block whose axes start at the current position, and the next run starts
after `max(h, w) / merge`. A video of `(t, h, w)` is `t` such blocks of `(1, h, w)`, one per pair of
frames: Qwen3-VL writes each pair's timestamp as text between them. After the prompt every token
uses `cache_len + rope_delta` on all axes.
"""

from __future__ import annotations

import itertools

import numpy as np

from hybrid.media import MM_IMAGE, MM_TEXT, MM_VIDEO


def get_rope_index(
    mm_token_type_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
    video_grid_thw: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """`position_ids` `(3, 1, S)` for a single prompt (`mm_token_type_ids`: 0 text, 1 image, 2
    video), and its `rope_delta`."""
    types = mm_token_type_ids[0].tolist()
    frame_pairs = [(1, h, w) for t, h, w in _grids(video_grid_thw) for _ in range(t)]
    grids = {MM_IMAGE: iter(_grids(image_grid_thw)), MM_VIDEO: iter(frame_pairs)}
    pieces: list[np.ndarray] = []
    current = 0
    for modality, group in itertools.groupby(types):
        length = len(list(group))
        if modality == MM_TEXT:
            pieces.append(np.broadcast_to(np.arange(current, current + length), (3, length)))
            current += length
            continue
        t, h, w = next(grids[modality])
        block = _vision_positions(current, t, h // spatial_merge_size, w // spatial_merge_size)
        if block.shape[1] != length:
            raise ValueError(f"vision run of {length} tokens does not match its grid {t}x{h}x{w}")
        pieces.append(block)
        current += max(h, w) // spatial_merge_size
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    rope_delta = int(positions.max()) + 1 - len(types) if len(types) else 0
    return positions[:, None, :].astype(np.int64), rope_delta


def decode_position(cache_len: int, rope_delta: int) -> np.ndarray:
    """`position_ids` `(3, 1, 1)` of the token written at cache slot `cache_len`."""
    return np.full((3, 1, 1), cache_len + rope_delta, dtype=np.int64)


def _grids(grid_thw: np.ndarray | None) -> list[list[int]]:
    return [] if grid_thw is None else np.asarray(grid_thw).tolist()


def _vision_positions(start: int, t: int, h: int, w: int) -> np.ndarray:
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel() + start, hh.ravel() + start, ww.ravel() + start])
