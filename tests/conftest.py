"""Small Qwen3-VL checkpoints and bundles that the tests build themselves (random weights, offline)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from hybrid.export.bundle import export_bundle
from hybrid.launch import DEMO_MODEL
from hybrid.pipeline import Pipeline
from hybrid.tiny import TinySpec, build_checkpoint

# `base`: DeepStack on two layers, GQA 4:2, untied LM head.
# `wide`: deeper and wider, DeepStack on three layers, GQA 8:2, tied embeddings, larger images.
SPECS = {
    "base": TinySpec(),
    "wide": TinySpec(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=256,
        tie_word_embeddings=True,
        vision_depth=4,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        deepstack_visual_indexes=(0, 1, 3),
        max_pixels=192 * 192,
        num_position_embeddings=36,
    ),
}

_lock = threading.RLock()
_cache: dict[tuple, object] = {}


def _memo(key: tuple, build):
    with _lock:
        if key not in _cache:
            _cache[key] = build()
        return _cache[key]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def checkpoint(workdir):
    """`checkpoint(name)` -> folder of the named test checkpoint."""

    def get(name: str = "base") -> Path:
        return _memo(("ckpt", name), lambda: build_checkpoint(workdir / f"ckpt-{name}", SPECS[name], seed=0))

    return get


@pytest.fixture(scope="session")
def bundle(workdir, checkpoint):
    """`bundle(name, precision)` -> folder of the exported bundle (GenAI model included)."""
    def get(name: str = "base", precision: str = "fp32") -> Path:
        return _memo(
            ("bundle", name, precision),
            lambda: export_bundle(str(checkpoint(name)), workdir / f"bundle-{name}-{precision}", precision),
        )

    return get


@pytest.fixture(scope="session")
def pipeline(bundle):
    """`pipeline(name, precision)` -> a loaded `Pipeline`, shared across tests."""
    def get(name: str = "base", precision: str = "fp32"):
        return _memo(("pipeline", name, precision), lambda: Pipeline.load(bundle(name, precision)))

    return get


@pytest.fixture(scope="session")
def demo_bundle(workdir):
    """`demo_bundle(precision)` -> the shipped demo model (assets/demo-model), exported here."""
    def get(precision: str = "fp32") -> Path:
        return _memo(
            ("demo", precision), lambda: export_bundle(str(DEMO_MODEL), workdir / f"demo-{precision}", precision)
        )

    return get


def draw_scene(size: tuple[int, int], colour: tuple[int, int, int], box_frac=(0.1, 0.1, 0.6, 0.6)) -> Image.Image:
    """A plain test picture: one ellipse on a light background."""
    img = Image.new("RGB", size, (235, 235, 235))
    w, h = size
    x0, y0, x1, y1 = box_frac
    ImageDraw.Draw(img).ellipse((x0 * w, y0 * h, x1 * w, y1 * h), fill=colour)
    return img
