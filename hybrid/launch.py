"""What the app needs before it can serve: a model source, a bundle exported from it, and the facts
about the loaded pipeline that the page words (`describe`).

`ensure_bundle` exports on the first start (progress in the log) and reuses the bundle afterwards,
as long as its manifest names the same source, the checkpoint is not newer, and the files verify.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hybrid.config import Precision, Precisions, RuntimeConfig
from hybrid.errors import BundleError
from hybrid.export.bundle import export_bundle
from hybrid.export.int4 import Int4Scheme
from hybrid.layout import VISION_DIR, verify_parts, vision_graph
from hybrid.manifest import Manifest, checkpoint_fingerprint
from hybrid.pipeline import Pipeline
from hybrid.routes.hybrid import HybridRoute
from hybrid.routes.remote import RemoteConfig, RemoteRoute
from hybrid.tiny import build_checkpoint
from hybrid.types import RouteName

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "assets" / "demo-model"
CACHE = REPO / ".cache"
TINY_MODEL = CACHE / "tiny-model"
BUNDLES = CACHE / "bundles"
TRAINING_RECORD = "training.json"  # beside a trained demo model: its recipe and eval figures


def default_model() -> Path:
    """The trained demo model if it is there, else a random-weight tiny checkpoint (built once)."""
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    log.warning(
        "no demo model in %s: serving an untrained tiny model (train one with "
        "`python -m hybrid.demo train --out assets/demo-model`)",
        DEMO_MODEL,
    )
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


def stale_reason(bundle: Path, source: str, precision: Precision) -> str | None:
    """Why the bundle at `bundle` cannot serve `source` at `precision`, or None if it can (a bundle
    of another format is refused by `Manifest.load`)."""
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
    if Precisions.of(precision).decoder == "int4" and manifest.quantization != default_int4:
        return f"its INT4 decoder is {manifest.quantization}, the default is now {default_int4}"
    if f"{VISION_DIR}/{vision_graph(Precisions.of(precision).vision_int8)}" not in manifest.parts:
        return "it has no ONNX vision tower"
    if checkpoint_fingerprint(source) != manifest.fingerprint:
        return "the checkpoint changed since"
    try:
        verify_parts(bundle, manifest)
    except BundleError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class ModelFacts:
    """What can be said of the loaded model: where it came from, its size, and (the demo model)
    its training record with the eval figures kept in it (`training.json`)."""

    source: str
    kind: Literal["demo", "tiny", "checkpoint"]
    parameters: int
    layers: int | None
    precision: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.source).name or self.source


@dataclass(frozen=True)
class PipelineFacts:
    """What a loaded pipeline serves: its model, the routes that loaded (`lazy`: those loaded on
    first use), why each other one did not, and how the hybrid route runs its vision tower."""

    model: ModelFacts
    routes: tuple[RouteName, ...]
    unavailable: dict[RouteName, str]
    lazy: tuple[RouteName, ...]
    vision_backend: str | None  # "onnx" or "torch"; None without the hybrid route
    takes_videos: bool
    remote: str | None = None  # the remote route's model and server ("MODEL at URL"), if it loaded


def is_demo_model(source: str | Path) -> bool:
    """The shipped demo model, or another one `python -m hybrid.demo train` wrote (its training record beside it)."""
    return Path(source) == DEMO_MODEL or (Path(source) / TRAINING_RECORD).is_file()


def model_facts(manifest: Manifest) -> ModelFacts:
    source = Path(manifest.source)
    kind = "demo" if is_demo_model(source) else "tiny" if source == TINY_MODEL else "checkpoint"
    record_file = source / TRAINING_RECORD
    record = json.loads(record_file.read_text()) if kind == "demo" and record_file.is_file() else {}
    layers = manifest.model.get("num_hidden_layers")
    return ModelFacts(
        manifest.source, kind, int(manifest.model.get("parameters", 0)), layers, manifest.precision, record
    )


def describe(pipeline: Pipeline) -> PipelineFacts:
    """The facts the page words (the engine writes no page text)."""
    hybrid = pipeline.routes.get("hybrid")
    return PipelineFacts(
        model=model_facts(pipeline.manifest),
        routes=tuple(pipeline.routes),
        unavailable=dict(pipeline.unavailable),
        lazy=tuple(name for name in ("pytorch",) if name in pipeline.routes),
        vision_backend=hybrid.vision.backend if isinstance(hybrid, HybridRoute) else None,
        takes_videos=pipeline.processor.takes_videos,
        remote=f"{remote.model} at {remote.base}"
        if isinstance(remote := pipeline.routes.get("remote"), RemoteRoute)
        else None,
    )


AUTO_PRECISION = "auto"


def auto_precision(model: str | Path) -> Precision:
    """INT4 (decoder and GenAI model, INT8 vision) for a real checkpoint: the fast path is the
    product; fp32 for the project's own small models, which are instant either way and whose
    answers the tests compare exactly."""
    source = normalize_source(model)
    return "fp32" if source == str(TINY_MODEL) or is_demo_model(source) else "int4"


def load_pipeline(
    model: str | None,
    bundle: str | None,
    precision: Precision | Literal["auto"],
    runtime: RuntimeConfig,
    remote: RemoteConfig | None = None,
) -> Pipeline:
    """The app's pipeline: an existing `bundle` alone is served as is; otherwise the bundle of
    `model` (default: `default_model()`) is exported or reused first, at `precision` ("auto": see
    `auto_precision`); `remote` adds the route to that server."""
    if bundle is not None and model is None and Path(bundle).exists():
        return Pipeline.load(bundle, runtime, remote=remote)
    source = model if model is not None else default_model()
    if precision == AUTO_PRECISION:
        precision = auto_precision(source)
        log.info("precision %s for %s (--precision fp32 or int4 chooses)", precision, source)
    path = ensure_bundle(source, bundle, precision)
    return Pipeline.load(path, runtime, verify=False, remote=remote)  # ensure_bundle has just verified or written it
