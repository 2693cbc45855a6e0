"""The Qwen3-VL vision tower alone: pixels in, merged image features and DeepStack maps out.

Only the vision tower's weights are loaded; the language model never enters memory here. Two
backends: `onnx` (the default where the bundle has the graph: `hybrid.vision_onnx`, several times
faster on a CPU) and `torch` (transformers' own module). With `int8` (INT4 bundles), every linear
layer but the patch embedding runs with INT8 weights and dynamically quantized activations; fp32
matches transformers to ~1e-5 on either backend.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid.config import VISION_BACKENDS, VisionBackend
from hybrid.errors import BundleError
from hybrid.layout import CHECKPOINT_VISION_PREFIX, ONNX_VISION_TENSORS, VISION_CONFIG, VISION_WEIGHTS, vision_graph
from hybrid.processor import pixel_digest
from hybrid.recent import Recent
from hybrid.vision_onnx import OnnxVisionTower

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisionFeatures:
    image_embeds: np.ndarray  # (N, H): merged patches of all images, in prompt order
    deepstack_embeds: np.ndarray  # (D, N, H): one map per DeepStack layer


FEATURES_KEPT, FEATURE_BYTES_KEPT = 8, 1 << 30  # the vision features of recent pictures, at most


def _feature_bytes(features: VisionFeatures) -> int:
    return features.image_embeds.nbytes + features.deepstack_embeds.nbytes


class VisionTower:
    """`encode(pixel_values, image_grid_thw)` -> `VisionFeatures`, cached by pixels and grid.
    `backend` None: ONNX where the bundle has the graph of this precision, else PyTorch (with a warning).
    `checkpoint`: the bundle's source, where the PyTorch tower of an INT4 bundle reads its weights."""

    def __init__(
        self,
        folder: str | Path,
        threads: int,
        int8: bool = False,
        backend: VisionBackend | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        folder = Path(folder)
        graph = folder / vision_graph(int8)
        if backend is None:
            backend = "onnx" if graph.is_file() else "torch"
            if backend == "torch":
                log.warning(
                    "%s has no ONNX vision tower (exported before it existed): running the slower "
                    "PyTorch tower; export the bundle again for the faster one",
                    folder,
                )
        if backend not in VISION_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(VISION_BACKENDS)}, got {backend!r}")
        if backend == "onnx" and not graph.is_file():
            raise BundleError(
                f"{folder} has no ONNX vision tower ({graph.name}): export the bundle again, or run the PyTorch tower"
            )
        config = _load_config(folder)
        self.backend = backend
        self.spatial_merge_size = config.spatial_merge_size
        self.threads = threads
        self.cache: Recent[VisionFeatures] = Recent(FEATURES_KEPT, FEATURE_BYTES_KEPT, _feature_bytes)
        self.model = _load_torch(folder, config, int8, checkpoint) if backend == "torch" else None
        self.onnx = OnnxVisionTower(folder, config, graph, threads) if backend == "onnx" else None

    def encode(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, key: str | None = None
    ) -> VisionFeatures:
        """The features of `pixel_values` (of images whose grids are `image_grid_thw`), from the cache
        when these pixels were encoded lately. `key`: their `pixel_digest` where it is known (a
        single item's), or anything that names exactly these pixels and grids."""
        key = key or pixel_digest(pixel_values, image_grid_thw)
        features = self.cache.get(key)
        if features is None:
            features = self._run(pixel_values, image_grid_thw)
            self.cache.put(key, features)
        return features

    def _run(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        if self.onnx is not None:
            image_embeds, deepstack_embeds = self.onnx.run(pixel_values, image_grid_thw)
            return VisionFeatures(image_embeds=image_embeds, deepstack_embeds=deepstack_embeds)
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(pixel_values.to(self.model.dtype), grid_thw=image_grid_thw, return_dict=True)
            deepstack = torch.stack(list(out.deepstack_features)) if out.deepstack_features else None
        image_embeds = out.pooler_output.float().numpy()
        if deepstack is None:
            deepstack_np = np.zeros((0, *image_embeds.shape), dtype=np.float32)
        else:
            deepstack_np = deepstack.float().numpy()
        return VisionFeatures(image_embeds=image_embeds, deepstack_embeds=deepstack_np)


def _load_config(folder: Path):
    from transformers import Qwen3VLVisionConfig

    try:
        return Qwen3VLVisionConfig.from_dict(json.loads((folder / VISION_CONFIG).read_text()))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load the vision tower from {folder}: {exc}") from exc


def _load_torch(folder: Path, config, int8: bool, checkpoint: str | Path | None) -> torch.nn.Module:
    from safetensors.torch import load

    try:
        # read, not memory-mapped: once quantized, the fp32 linear weights are really freed
        state = load((folder / VISION_WEIGHTS).read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load the vision tower from {folder}: {exc}") from exc
    if set(state) <= set(ONNX_VISION_TENSORS):  # an INT4 bundle: the tower's weights are the checkpoint's
        state = _checkpoint_tower(checkpoint)
    config._attn_implementation = "sdpa"
    model = _from_state(config, state)
    del state
    return _int8_linears(model) if int8 else model


def _checkpoint_tower(checkpoint: str | Path | None) -> dict[str, torch.Tensor]:
    """The `model.visual.*` tensors of the source checkpoint in float32, prefix dropped."""
    from hybrid.export.tensors import CheckpointTensors

    if checkpoint is None or not Path(checkpoint).is_dir():
        raise BundleError(
            f"an INT4 bundle holds only the ONNX vision tower; its PyTorch tower reads the source checkpoint "
            f"({checkpoint}), which is not there: use --vision onnx, or export the bundle again from a checkpoint"
        )
    tensors = CheckpointTensors(Path(checkpoint))
    names = [name for name in tensors.entries if name.startswith(CHECKPOINT_VISION_PREFIX)]
    return {name.removeprefix(CHECKPOINT_VISION_PREFIX): torch.from_numpy(tensors.read(name)) for name in names}


def _from_state(config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The tower built around the loaded tensors (no random init to overwrite, no second copy)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, Qwen3VLVisionRotaryEmbedding

    with torch.device("meta"):
        model = Qwen3VLVisionModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(config)  # computed buffers, not in the checkpoint
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        raise BundleError(f"the vision tower has tensors the checkpoint does not set: {', '.join(unset[:5])}")
    return model.eval()


def _int8_linears(model: torch.nn.Module) -> torch.nn.Module:
    """The tower with each `nn.Linear` replaced by its dynamically quantized INT8 version."""
    import warnings

    with warnings.catch_warnings():
        # deprecated in favour of torchao, still in the pinned torch 2.14.1: revisit when torch moves
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    gc.collect()  # the replaced fp32 linears sit in reference cycles: free their weights now
    return model
