"""The PyTorch vision tower alone: fp32 as in the checkpoint, INT8 linear layers in INT4 bundles (the
ONNX tower, the default where a bundle has it, is tested in test_vision_onnx); an INT4 bundle's
PyTorch tower reads the source checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hybrid.errors import BundleError
from hybrid.layout import ONNX_VISION_TENSORS, VISION_DIR, VISION_WEIGHTS
from hybrid.types import Message
from hybrid.vision import VisionTower
from tests.conftest import draw_scene


def tower_features(pipe, image):
    route = pipe.routes["hybrid"]
    inputs = route.processor.prepare((Message("user", "What is this?", (image,)),))
    int8 = pipe.manifest.precision == "int4"
    tower = VisionTower(pipe.bundle / VISION_DIR, 0, int8=int8, backend="torch", checkpoint=pipe.manifest.checkpoint)
    return tower, tower._run(inputs.pixel_values, inputs.image_grid_thw)


def quantized_linears(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in model.modules())


@pytest.mark.slow  # exports the wide model at INT4
def test_int4_bundles_run_the_tower_with_int8_linears_close_to_fp32(pipeline):
    image = draw_scene((160, 96), (30, 120, 200))
    fp32_tower, fp32 = tower_features(pipeline("wide", "fp32"), image)
    int8_tower, int8 = tower_features(pipeline("wide", "int4"), image)
    assert quantized_linears(fp32_tower.model) == 0
    plain = sum(isinstance(m, torch.nn.Linear) for m in fp32_tower.model.modules())
    assert quantized_linears(int8_tower.model) == plain > 0
    for a, b in ((fp32.image_embeds, int8.image_embeds), (fp32.deepstack_embeds, int8.deepstack_embeds)):
        cosine = float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert 0.99 < cosine < 1.0, cosine


def test_an_int4_bundle_keeps_only_the_onnx_towers_tensors_and_its_torch_tower_reads_the_checkpoint(bundle, checkpoint):
    folder = bundle("base", "int4") / VISION_DIR
    assert set(load_file(str(folder / VISION_WEIGHTS))) == set(ONNX_VISION_TENSORS)
    full = VisionTower(bundle("base") / VISION_DIR, 0, backend="torch")  # fp32: every tensor in the bundle
    ours = VisionTower(folder, 0, backend="torch", checkpoint=checkpoint("base"))
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(ours.model.state_dict()[name], tensor), name
    with pytest.raises(BundleError, match="--vision onnx"):
        VisionTower(folder, 0, backend="torch", checkpoint="/nonexistent/checkpoint")
