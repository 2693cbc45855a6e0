"""The ONNX vision tower: the same features as the PyTorch tower on any grid, INT8 close to fp32,
the same greedy tokens on the hybrid route with either backend, and bundles made before it still load."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from hybrid.config import RuntimeConfig
from hybrid.launch import stale_reason
from hybrid.layout import VISION_DIR, vision_graph
from hybrid.manifest import MANIFEST_NAME
from hybrid.pipeline import Pipeline
from hybrid.routes.hybrid import HybridRoute
from hybrid.types import collect
from hybrid.vision import VisionTower
from tests.conftest import draw_scene
from tests.helpers import ask, run

# (t, h, w) per image, in patches: square, non-square both ways, two images in one call; a video of
# three frame pairs (the ONNX graph runs pair by pair), and a picture with a video
GRIDS = {
    "square": [[1, 6, 6]],
    "wide": [[1, 4, 10]],
    "tall": [[1, 12, 2]],
    "two images": [[1, 8, 4], [1, 2, 6]],
    "video": [[3, 4, 6]],
    "image and video": [[1, 2, 2], [2, 6, 4]],
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def features(tower: VisionTower, grids: list[list[int]], seed: int = 0):
    grid_thw = torch.tensor(grids)
    patch = tower_patch_size(tower)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), patch, generator=torch.Generator().manual_seed(seed))
    return tower._run(pixels, grid_thw)


def tower_patch_size(tower: VisionTower) -> int:
    config = tower.onnx.config if tower.onnx is not None else tower.model.config
    return config.in_channels * config.temporal_patch_size * config.patch_size**2


@pytest.mark.parametrize("name", ["base", "wide"])
def test_fp32_onnx_tower_matches_pytorch_on_every_grid(bundle, name):
    folder = bundle(name, "fp32") / VISION_DIR
    onnx_tower, torch_tower = VisionTower(folder, 0), VisionTower(folder, 0, backend="torch")
    assert onnx_tower.backend == "onnx" and torch_tower.backend == "torch"
    for grids in GRIDS.values():
        ours, reference = features(onnx_tower, grids), features(torch_tower, grids)
        tokens = sum(t * h * w for t, h, w in grids) // 4
        assert ours.image_embeds.shape == reference.image_embeds.shape == (tokens, reference.image_embeds.shape[1])
        assert ours.deepstack_embeds.shape == reference.deepstack_embeds.shape
        assert reference.deepstack_embeds.shape[0] > 0
        for a, b in ((ours.image_embeds, reference.image_embeds), (ours.deepstack_embeds, reference.deepstack_embeds)):
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()  # float32 rounding, nothing more


def test_each_image_attends_only_to_itself(bundle):
    """Two images in one call give each image's features alone, in order."""
    tower = VisionTower(bundle("base", "fp32") / VISION_DIR, 0)
    grids = GRIDS["two images"]
    both = features(tower, grids)
    patch = tower_patch_size(tower)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), patch, generator=torch.Generator().manual_seed(0))
    first_count = int(np.prod(grids[0]))
    first = tower._run(pixels[:first_count], torch.tensor(grids[:1]))
    second = tower._run(pixels[first_count:], torch.tensor(grids[1:]))
    np.testing.assert_allclose(both.image_embeds, np.concatenate([first.image_embeds, second.image_embeds]))
    np.testing.assert_allclose(
        both.deepstack_embeds, np.concatenate([first.deepstack_embeds, second.deepstack_embeds], axis=1)
    )


@pytest.mark.slow
def test_int8_onnx_tower_is_close_to_fp32(bundle):
    fp32 = VisionTower(bundle("wide", "fp32") / VISION_DIR, 0, backend="torch")
    int8_folder = bundle("wide", "int4") / VISION_DIR
    assert (int8_folder / vision_graph(True)).is_file() and not (int8_folder / vision_graph(False)).exists()
    int8 = VisionTower(int8_folder, 0, int8=True)
    assert int8.backend == "onnx"
    for grids in GRIDS.values():
        ours, reference = features(int8, grids), features(fp32, grids)
        for a, b in ((ours.image_embeds, reference.image_embeds), (ours.deepstack_embeds, reference.deepstack_embeds)):
            assert 0.99 < cosine(a, b) < 1.0 - 1e-9


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize(
    "model_name, images",
    [
        ("base", [draw_scene((96, 96), (200, 30, 30)), draw_scene((64, 128), (30, 30, 200), (0.2, 0.5, 0.9, 0.9))]),
        ("wide", [draw_scene((192, 64), (30, 160, 30), (0.6, 0.1, 0.9, 0.9))]),
    ],
)
def test_hybrid_tokens_equal_pytorch_with_either_tower(pipeline, bundle, model_name, images, backend):
    pipe = pipeline(model_name)
    route = pipe.routes["hybrid"]
    tower = VisionTower(bundle(model_name, "fp32") / VISION_DIR, 0, backend=backend)
    hybrid = HybridRoute(route.processor, tower, route.embeddings, route.decoder, route.conversations)
    request = ask("What is in the picture?", images)
    ours = collect("hybrid", hybrid.stream(request))
    assert tower.cache.entries, "the request should have gone through this tower"
    assert ours["token_ids"] == run(pipe, request, "pytorch")["token_ids"]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_the_tower_is_chosen_at_run_time(bundle, backend):
    pipe = Pipeline.load(bundle("base", "fp32"), RuntimeConfig(vision_backend=backend), verify=False, only=("hybrid",))
    assert pipe.routes["hybrid"].vision.backend == backend


def test_a_bundle_without_the_onnx_tower_still_loads_and_is_re_exported(bundle, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(bundle("base", "fp32"), old)
    graph = f"{VISION_DIR}/{vision_graph(False)}"
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    for rel in [p for p in manifest["parts"] if p.startswith(graph)]:
        (old / rel).unlink()
        del manifest["parts"][rel]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="hybrid.vision"):
        tower = VisionTower(old / VISION_DIR, 0)
    assert tower.backend == "torch"
    assert "export the bundle again" in caplog.text
    assert features(tower, GRIDS["wide"]).image_embeds.shape[0] == 10
    assert "no ONNX vision tower" in stale_reason(old, manifest["source"], "fp32")
    assert stale_reason(bundle("base", "fp32"), manifest["source"], "fp32") is None
    asked = Pipeline.load(old, RuntimeConfig(vision_backend="onnx"), verify=False, only=("hybrid", "pytorch"))
    assert "hybrid" not in asked.routes and "no ONNX vision tower" in asked.unavailable["hybrid"]
    assert "pytorch" in asked.routes  # the other routes still serve
