"""The Qwen3-VL vision tower in onnxruntime: pixels in, merged image features and DeepStack maps out.

The ONNX graph (`hybrid.export.vision`) runs the patch embedding, the blocks and the mergers of one
image; what depends on the grid is computed here exactly as transformers computes it (the same
functions): the bilinearly interpolated position embeddings and the 2-D rotary angles. Only the
position-embedding table is read from the PyTorch weights. A video's grid `(t, h, w)` runs as `t`
images of `(1, h, w)`: its patches come pair of frames by pair of frames, and transformers' attention
never crosses from one pair to the next either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hybrid.errors import BundleError
from hybrid.layout import VISION_WEIGHTS
from hybrid.threads import session_options


def frame_grids(grid_thw: torch.Tensor) -> torch.Tensor:
    """`grid_thw` `(items, 3)` with each `(t, h, w)` split into `t` rows of `(1, h, w)`."""
    frames = torch.repeat_interleave(grid_thw, grid_thw[:, 0], dim=0)
    frames[:, 0] = 1
    return frames


class GridInputs:
    """Per-image inputs of the graph that depend only on the grid: `pos_embeds` `(N, H)` and the
    rotary `cos`, `sin` `(N, d/2)`, for `N = t * h * w` patches in the processor's order."""

    def __init__(self, config, pos_embed: torch.Tensor) -> None:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding

        self.pos_embed = pos_embed  # (num_position_embeddings, H)
        self.num_grid_per_side = int(config.num_position_embeddings**0.5)
        self.spatial_merge_size = config.spatial_merge_size
        self.rotary = Qwen3VLVisionRotaryEmbedding(config)

    def __call__(self, grid_thw: torch.Tensor) -> dict[str, np.ndarray]:
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        # the same calls, with the same arguments, as `Qwen3VLVisionModel.forward`
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=self.num_grid_per_side,
            mode="bilinear",
            align_corners=True,
            spatial_merge_size=self.spatial_merge_size,
        )
        with torch.inference_mode():
            pos_embeds = (self.pos_embed[indices] * weights[:, :, None]).sum(1)  # (N, H)
            position_ids = get_vision_position_ids(grid_thw, self.spatial_merge_size)  # (N, 2)
            cos, sin = self.rotary(pos_embeds, position_ids)  # (N, d): the d/2 angles twice
        half = cos.shape[-1] // 2
        return {
            "pos_embeds": pos_embeds.float().numpy(),
            "rotary_cos": np.ascontiguousarray(cos[:, :half].numpy()),
            "rotary_sin": np.ascontiguousarray(sin[:, :half].numpy()),
        }


class OnnxVisionTower:
    """`run(pixel_values, image_grid_thw)` -> `(image_embeds (N', out), deepstack_embeds (D, N', out))`
    for the graph at `graph_path`, one image (or pair of video frames) at a time; `folder` holds the
    PyTorch weights."""

    def __init__(self, folder: Path, config, graph_path: Path, threads: int) -> None:
        import onnxruntime as ort
        from safetensors import safe_open

        self.config = config  # the `Qwen3VLVisionConfig`
        try:
            with safe_open(str(folder / VISION_WEIGHTS), framework="pt") as weights:
                pos_embed = weights.get_tensor("pos_embed.weight").float()
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot load the vision tower from {folder}: {exc}") from exc
        self.grid_inputs = GridInputs(self.config, pos_embed)
        try:
            self.session = ort.InferenceSession(
                str(graph_path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for a bad or missing file
            raise BundleError(
                f"cannot load the ONNX vision tower {graph_path}: {exc}; export the bundle again"
            ) from exc
        self.has_deepstack = len(self.session.get_outputs()) > 1

    def run(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        pixels = pixel_values.float().numpy()  # (sum of N, C*T*P*P)
        merged, deepstack, first = [], [], 0
        for grid in frame_grids(image_grid_thw):
            count = int(grid.prod())
            feed = {"pixel_values": pixels[first : first + count], **self.grid_inputs(grid[None])}
            outputs = self.session.run(None, feed)
            merged.append(outputs[0])
            deepstack.append(outputs[1] if self.has_deepstack else np.zeros((0, *outputs[0].shape), np.float32))
            first += count
        return np.concatenate(merged), np.concatenate(deepstack, axis=1)
