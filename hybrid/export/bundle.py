"""`python -m hybrid export`: a Qwen3-VL checkpoint in, one bundle folder out.

The bundle holds the processor files, the vision tower weights only, the embedding table, the ONNX
decoder (and, where built, the GenAI text model), and `manifest.json` with each part's checksum.
It is written into a temporary sibling folder and renamed into place at the end, so a crash never
leaves a half bundle behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from hybrid.config import BUNDLE_FORMAT, MANIFEST_NAME, Manifest, PartInfo
from hybrid.errors import BundleError, UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int4")
PROCESSOR_DIR = "processor"
VISION_DIR = "vision"
EMBED_FILE = "embed_tokens.npy"
DECODER_DIR = "decoder"
DECODER_FILE = "decoder/model.onnx"
GENAI_DIR = "genai"


def resolve_checkpoint(source: str) -> Path:
    """A local checkpoint folder as is; otherwise a hub id, downloaded where there is internet."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a transformers checkpoint folder")
        return path.resolve()
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise UserError(f"{source} is neither a local folder nor a hub id like Qwen/Qwen3-VL-2B-Instruct")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as exc:  # the hub client raises many network error types
        raise UserError(f"cannot download {source} from the Hugging Face Hub ({type(exc).__name__}): "
                        "check the network, or pass a local checkpoint folder") from exc


def export_bundle(source: str, out: str | Path, precision: str = "fp32", genai: bool = True) -> Path:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(out).resolve()
    if out.exists() and not (out / MANIFEST_NAME).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a bundle: exporting would replace it; choose another folder")
    checkpoint = resolve_checkpoint(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work.chmod(0o755)
    try:
        model_info = _write_parts(checkpoint, work, precision, genai)
        manifest = Manifest(
            format=BUNDLE_FORMAT,
            source=source,
            checkpoint=str(checkpoint),
            precision=precision,
            parts=_describe_parts(work, precision),
            versions=_versions(),
            model=model_info,
        )
        (work / MANIFEST_NAME).write_text(manifest.to_json())
        _replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("bundle ready: %s (%.1f MB)", out, _size(out) / 1e6)
    return out


def _write_parts(checkpoint: Path, work: Path, precision: str, genai: bool) -> dict:
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from hybrid.export.decoder import export_decoder
    from hybrid.vision import save_vision_tower

    steps = 5 if genai else 4
    with _step(1, steps, "loading the checkpoint"):
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(str(checkpoint))
    with _step(2, steps, "saving the processor, the vision tower and the embedding table"):
        processor.save_pretrained(str(work / PROCESSOR_DIR))
        model.generation_config.save_pretrained(str(work / PROCESSOR_DIR))
        save_vision_tower(model, work / VISION_DIR)
        embed = model.model.language_model.embed_tokens.weight.detach().float().numpy()
        np.save(work / EMBED_FILE, embed)
    with _step(3, steps, "exporting the ONNX text decoder"):
        export_decoder(model, work / DECODER_FILE)
    with _step(4, steps, f"quantizing the decoder ({precision})"):
        if precision == "int4":
            from hybrid.export.quantize import quantize_int4

            quantize_int4(work / DECODER_FILE)
    if genai:
        with _step(5, steps, f"building the GenAI text model ({precision})"):
            from hybrid.export.genai import build_genai

            build_genai(checkpoint, work / GENAI_DIR, precision, processor)
    return _model_info(model)


def _model_info(model) -> dict:
    cfg = model.config
    text = cfg.text_config
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "deepstack_layers": len(cfg.vision_config.deepstack_visual_indexes),
        "image_token_id": cfg.image_token_id,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }


def _describe_parts(work: Path, precision: str) -> dict[str, PartInfo]:
    parts = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        rel = path.relative_to(work).as_posix()
        is_onnx = rel.startswith((DECODER_DIR + "/", GENAI_DIR + "/")) and not rel.endswith(".json")
        parts[rel] = PartInfo(
            path=rel, precision=precision if is_onnx else "fp32", sha256=sha256(path), bytes=path.stat().st_size
        )
    return parts


def verify_bundle(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest names exists with its recorded size and checksum."""
    for rel, part in manifest.parts.items():
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; export it again")
        if path.stat().st_size != part.bytes or sha256(path) != part.sha256:
            raise BundleError(f"{path} is corrupted (checksum mismatch); export the bundle again")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxruntime_genai

        versions["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        pass
    return versions


def _replace(work: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _step:
    """Logs `[i/n] what ...` and how long it took."""

    def __init__(self, index: int, total: int, what: str) -> None:
        self.label = f"[{index}/{total}] {what}"

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        log.info("%s ...", self.label)

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            log.info("%s: done in %.1f s", self.label, time.perf_counter() - self.start)
