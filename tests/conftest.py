"""Small Qwen3-VL checkpoints and bundles that the tests build themselves (random weights, offline)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hybrid.export.bundle import export_bundle
from hybrid.export.int4 import GENAI_SETTING, Int4Scheme
from hybrid.launch import DEMO_MODEL
from hybrid.pipeline import Pipeline
from hybrid.tiny import TinySpec, build_checkpoint

# The INT4 of GenAI's builder, for our decoder too: where a test compares the two INT4 routes, or our
# export with onnxruntime's own quantizer.
RTN_B32 = Int4Scheme(GENAI_SETTING, GENAI_SETTING)

# `base`: DeepStack on two layers, GQA 4:2, untied LM head; transformers' video sampling (2 frames a
# second, 4 to 768), with a lower floor on the pixels of a video, so that a small clip stays small.
# `wide`: deeper and wider, DeepStack on three layers, GQA 8:2, tied embeddings, larger images; its
# video processor samples 4 frames a second, at most 10, within other pixel bounds.
SPECS = {
    "base": TinySpec(video_min_pixels=32 * 32 * 4),
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
        video_fps=4.0,
        video_max_frames=10,
        video_min_pixels=64 * 64 * 2,
        video_max_pixels=160 * 160 * 6,
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
    """`bundle(name, precision[, int4])` -> folder of the exported bundle (GenAI model included);
    `int4`: the INT4 scheme of the decoder, if not the default."""

    def get(name: str = "base", precision: str = "fp32", int4: Int4Scheme | None = None) -> Path:
        label = f"{name}-{precision}" + (f"-{int4.name}" if int4 else "")
        options = {"int4": int4} if int4 else {}
        return _memo(
            ("bundle", label),
            lambda: export_bundle(str(checkpoint(name)), workdir / f"bundle-{label}", precision, **options),
        )

    return get


@pytest.fixture(scope="session")
def pipeline(bundle):
    """`pipeline(name, precision[, int4])` -> a loaded `Pipeline`, shared across tests."""

    def get(name: str = "base", precision: str = "fp32", int4: Int4Scheme | None = None):
        return _memo(("pipeline", name, precision, int4), lambda: Pipeline.load(bundle(name, precision, int4)))

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


def write_video(
    path: Path,
    frames: int = 8,
    size: tuple[int, int] = (96, 64),
    fps: int = 4,
    colour=(200, 30, 30),
    codec: str = "mpeg4",
    options: dict[str, str] | None = None,
) -> Path:
    """A test clip written with PyAV: a square of `colour` moving left to right on a light background."""
    import av

    width, height = size
    side = max(height // 4, 2)
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = np.full((height, width, 3), 235, dtype=np.uint8)
            x = (width - side) * i // max(frames - 1, 1)
            picture[height // 3 : height // 3 + side, x : x + side] = colour
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode())
    return path
