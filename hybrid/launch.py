"""What the app needs before it can serve: a model source, a bundle exported from it, and a plain
description of that model for the page header.

`ensure_bundle` exports on the first start (progress in the log) and reuses the bundle afterwards,
as long as its manifest names the same source, the checkpoint is not newer, and the files verify.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Literal
from pathlib import Path

from hybrid.config import MANIFEST_NAME, Manifest, Precision, RuntimeConfig
from hybrid.errors import BundleError
from hybrid.export.bundle import export_bundle
from hybrid.export.int4 import Int4Scheme
from hybrid.layout import DECODER_GRAPH, VISION_DIR, verify_parts, vision_graph
from hybrid.pipeline import Pipeline
from hybrid.tiny import build_checkpoint

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "assets" / "demo-model"
CACHE = REPO / ".cache"
TINY_MODEL = CACHE / "tiny-model"
BUNDLES = CACHE / "bundles"
REAL_MODEL_HINT = "`python app.py --model Qwen/Qwen3-VL-2B-Instruct` (or `--model /path/to/checkpoint`)"


def default_model() -> Path:
    """The trained demo model if it is there, else a random-weight tiny checkpoint (built once)."""
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    log.warning("no demo model in %s: serving an untrained tiny model (train one with "
                "`python -m hybrid.demo train --out assets/demo-model`)", DEMO_MODEL)  # fmt: skip
    return build_tiny_model(TINY_MODEL)


def build_tiny_model(out: Path) -> Path:
    """A small random-weight Qwen3-VL checkpoint at `out`, written once and atomically."""
    if (out / "config.json").is_file():
        return out
    log.info("building a tiny random-weight checkpoint in %s", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        build_checkpoint(work)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def normalize_source(model: str | Path) -> str:
    """A local folder as its absolute path, a hub id as given: what the manifest records."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def default_bundle_dir(source: str, precision: Precision) -> Path:
    """`.cache/bundles/<model-name>-<precision>`; a hub id's name is the part after the slash."""
    name = Path(source).name or "model"
    return BUNDLES / f"{name}-{precision}"


def ensure_bundle(model: str | Path, bundle_dir: str | Path | None, precision: Precision, genai: bool = True) -> Path:
    """The bundle of `model` at `bundle_dir` (default under `.cache/bundles`), exported if needed
    (`genai`: with the onnxruntime-genai text model)."""
    source = normalize_source(model)
    bundle = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir(source, precision)
    reason = stale_reason(bundle, source, precision)
    if reason is None:
        log.info("reusing the bundle %s", bundle)
        return bundle
    log.info("exporting %s to %s (%s); later starts reuse it", source, bundle, reason)
    return export_bundle(source, bundle, precision, genai=genai)


LEGACY_INT4 = "rtn-b32"  # what INT4 bundles were before the manifest named their quantization


def stale_reason(bundle: Path, source: str, precision: Precision) -> str | None:
    """Why the bundle at `bundle` cannot serve `source` at `precision`, or None if it can."""
    if not bundle.exists():
        return "first start"
    try:
        manifest = Manifest.load(bundle)
    except BundleError as exc:
        return f"unreadable manifest: {exc}"
    if manifest.source != source:
        return f"it was made from {manifest.source}"
    if manifest.precision != precision:
        return f"it is {manifest.precision}, not {precision}"
    default_int4 = Int4Scheme().name
    if precision == "int4" and (manifest.quantization or LEGACY_INT4) != default_int4:
        return f"its INT4 decoder is {manifest.quantization or LEGACY_INT4}, the default is now {default_int4}"
    if manifest.decoder_graph < DECODER_GRAPH:
        return "its ONNX decoder has an older graph layout (the residual adds not fused into the norms: slower)"
    if f"{VISION_DIR}/{vision_graph(precision == 'int4')}" not in manifest.parts:
        return "it has no ONNX vision tower (exported before there was one)"
    if _newest_mtime(Path(source)) > (bundle / MANIFEST_NAME).stat().st_mtime:
        return "the checkpoint changed since"
    try:
        verify_parts(bundle, manifest)
    except BundleError as exc:
        return str(exc)
    return None


def _newest_mtime(checkpoint: Path) -> float:
    """Latest modification time of a local checkpoint's files (0 for a hub id)."""
    if not checkpoint.is_dir():
        return 0.0
    return max((p.stat().st_mtime for p in checkpoint.iterdir() if p.is_file()), default=0.0)


def describe_model(manifest: Manifest) -> str:
    """Markdown for the page header: which model is loaded and what it can be expected to do."""
    source = Path(manifest.source)
    size = _model_size(manifest)
    if source == DEMO_MODEL:
        return (
            f"**Demo model** (`assets/demo-model`, {size}): a tiny Qwen3-VL trained from scratch on this "
            "machine on photo-like synthetic pictures of one to three coloured shapes. It tells colours, "
            "places and how many shapes there are, and boxes them (\"Locate every shape.\"), but it has not "
            "learnt to tell circles, squares, triangles and stars apart: its shape names are guesses. It "
            "knows nothing else but greetings and small sums, and it learned one question per picture: "
            f"clear the conversation before asking about the next one. For a real model start {REAL_MODEL_HINT}."
        )
    if source == TINY_MODEL:
        return (
            f"**Untrained tiny model** ({size}, random weights): its answers are noise. It is here to "
            "show the pipeline and its timings. Train the demo model with `python -m hybrid.demo train "
            f"--out assets/demo-model`, or start a real one with {REAL_MODEL_HINT}."
        )
    return f"**{source.name or manifest.source}** (`{manifest.source}`, {size})."


def _model_size(manifest: Manifest) -> str:
    info = manifest.model
    params = int(info.get("parameters", 0))
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
    return f"{count} parameters, {info.get('num_hidden_layers', '?')} layers, {manifest.precision}"


AUTO_PRECISION = "auto"


def auto_precision(model: str | Path) -> Precision:
    """INT4 (decoder and GenAI model, INT8 vision) for a real checkpoint: the fast path is the
    product; fp32 for the project's own small models, which are instant either way and whose
    answers the tests compare exactly."""
    return "fp32" if normalize_source(model) in (str(DEMO_MODEL), str(TINY_MODEL)) else "int4"


def load_pipeline(
    model: str | None, bundle: str | None, precision: Precision | Literal["auto"], runtime: RuntimeConfig
) -> Pipeline:
    """The app's pipeline: an existing `bundle` alone is served as is; otherwise the bundle of
    `model` (default: `default_model()`) is exported or reused first, at `precision` ("auto": see
    `auto_precision`)."""
    if bundle is not None and model is None and Path(bundle).exists():
        return Pipeline.load(bundle, runtime)
    source = model if model is not None else default_model()
    if precision == AUTO_PRECISION:
        precision = auto_precision(source)
        log.info("precision %s for %s (--precision fp32 or int4 chooses)", precision, source)
    path = ensure_bundle(source, bundle, precision)
    return Pipeline.load(path, runtime, verify=False)  # ensure_bundle has just verified or written it
