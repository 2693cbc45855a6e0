"""The bundle's layout: where each part lives inside a bundle folder, and which route reads it.

Export writes these names and the runtime reads them; `verify_parts` checks the files the manifest
lists against their recorded sizes and checksums, for the whole bundle or the parts of one route.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hybrid.errors import BundleError
from hybrid.manifest import Manifest
from hybrid.types import RouteName

PROCESSOR_DIR = "processor"
VISION_DIR = "vision"
VISION_CONFIG = "config.json"  # in VISION_DIR: the vision config alone
CHECKPOINT_VISION_PREFIX = "model.visual."  # the vision tower's tensors in a Qwen3-VL checkpoint
VISION_WEIGHTS = "model.safetensors"  # in VISION_DIR: the `model.visual.*` tensors, prefix dropped
# What an INT4 bundle keeps of them: what the ONNX tower reads at load (its PyTorch tower, on
# request, reads the source checkpoint; fp32 bundles keep every tensor)
ONNX_VISION_TENSORS = ("pos_embed.weight",)
VISION_ONNX = {"fp32": "model-fp32.onnx", "int8": "model-int8.onnx"}  # in VISION_DIR: hybrid.export.vision
EMBED_FILE = "embed_tokens.npy"
# Instead of EMBED_FILE where the GenAI model holds the same table bit for bit (an INT4 bundle's fp16
# one): where in which file it lies ({"file", "offset", "shape", "dtype"}), read in place
EMBED_SHARED = "embed_tokens.json"
GENAI_EMBED = "model.embed_tokens.weight"  # the table's initializer in the GenAI model
DECODER_DIR = "decoder"
DECODER_FILE = f"{DECODER_DIR}/model.onnx"
PREFILL_GRAPH = "prefill-int8.onnx"  # beside an INT4 decoder: the prompt pass's graph (hybrid.export.prefill)
PREFILL_FILE = f"{DECODER_DIR}/{PREFILL_GRAPH}"
DECODER_NUM_LOGITS = "num_logits"  # the decoder's input `(1,)` int64: how many last positions get logits
GENAI_DIR = "genai"
GENAI_CONFIG = "genai_config.json"  # GenAI's own name for its model's config
GENAI_DATA = f"{GENAI_DIR}/model.onnx.data"  # the GenAI model's weights (and a shared embedding table)
# In an INT4 bundle with GenAI the decoder's INT4 weights lie in GENAI_DATA (hybrid.export.shared):
# its graphs name them at this location, relative to DECODER_DIR, and this record says so
BORROWED_LOCATION = f"../{GENAI_DATA}"
BORROWED_FILE = f"{DECODER_DIR}/borrowed.json"

# The parts each route reads (the PyTorch route reads the source checkpoint, outside the bundle);
# the processor is shared by every route.
ROUTE_PARTS: dict[RouteName, tuple[str, ...]] = {
    "hybrid": (VISION_DIR, EMBED_FILE, EMBED_SHARED, DECODER_DIR),
    "genai": (GENAI_DIR,),
    "pytorch": (),
}
SHARED_PARTS = (PROCESSOR_DIR,)


def vision_graph(int8: bool) -> str:
    """The ONNX vision tower's file name in VISION_DIR (INT8 in INT4 bundles, fp32 in fp32 ones)."""
    return VISION_ONNX["int8" if int8 else "fp32"]


def part_of(rel: str, parts: tuple[str, ...]) -> bool:
    """Whether the bundle-relative path `rel` is one of `parts` (a file) or inside one (a folder)."""
    return any(rel == part or rel.startswith(part + "/") for part in parts)


def route_parts(route: RouteName, bundle: Path) -> tuple[str, ...]:
    """The parts `route` reads from `bundle`: `ROUTE_PARTS`, and for the hybrid route the GenAI
    model's weights where its embedding table or its INT4 weights are read from there."""
    parts = ROUTE_PARTS.get(route, ())
    if route == "hybrid" and ((bundle / EMBED_SHARED).is_file() or (bundle / BORROWED_FILE).is_file()):
        parts += (GENAI_DATA,)
    return parts


def verify_parts(
    bundle: Path, manifest: Manifest, parts: tuple[str, ...] | None = None, done: set[str] | None = None
) -> None:
    """Every file the manifest names (or only those among `parts`) exists with its recorded size
    and checksum; `done`: files already verified (skipped), to which the verified ones are added."""
    done = set() if done is None else done
    for rel, part in manifest.parts.items():
        if (parts is not None and not part_of(rel, parts)) or rel in done:
            continue
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; export it again")
        if path.stat().st_size != part.bytes or sha256(path) != part.sha256:
            raise BundleError(f"{path} is corrupted (checksum mismatch); export the bundle again")
        done.add(rel)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
