"""`python -m hybrid export`: a Qwen3-VL checkpoint in, one bundle folder out.

The bundle holds the processor files, the vision tower weights only, the embedding table, the ONNX
decoder (and, where built, the GenAI text model), and `manifest.json` with each part's checksum.
It is written into a temporary sibling folder and renamed into place at the end, so a crash never
leaves a half bundle behind.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from hybrid.config import Precisions
from hybrid.errors import BundleError, UserError
from hybrid.export import decoder
from hybrid.export.genai import build_genai
from hybrid.export.int4 import Int4Scheme
from hybrid.export.prefill import write_int8_prefill
from hybrid.export.shared import borrow_from_genai
from hybrid.export.tensors import CheckpointTensors, external_info, write_npy, write_safetensors
from hybrid.export.vision import export_vision
from hybrid.layout import (
    CHECKPOINT_VISION_PREFIX,
    DECODER_DIR,
    DECODER_FILE,
    EMBED_FILE,
    EMBED_SHARED,
    GENAI_DATA,
    GENAI_DIR,
    GENAI_EMBED,
    ONNX_VISION_TENSORS,
    PREFILL_FILE,
    PROCESSOR_DIR,
    VISION_CONFIG,
    VISION_DIR,
    VISION_WEIGHTS,
    sha256,
    vision_graph,
)
from hybrid.manifest import BUNDLE_FORMAT, MANIFEST_NAME, Manifest, PartInfo, checkpoint_fingerprint

log = logging.getLogger(__name__)
LOCK_FILE = ".export.lock"  # in a partial folder: held by the export writing it
STALE_UNLOCKED_S = 60.0  # a partial folder without a lock is left alone this long after it was made

BAR_WIDTH = 24


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
        raise UserError(
            f"cannot download {source} from the Hugging Face Hub ({type(exc).__name__}): "
            "check the network, or pass a local checkpoint folder"
        ) from exc


def export_bundle(
    source: str,
    out: str | Path,
    precision: str = "fp32",
    genai: bool = True,
    int4: Int4Scheme = Int4Scheme(),
    store_int8: bool = False,
) -> Path:
    """Export `source` to the bundle `out`; an INT4 decoder is quantized by `int4`, and the GenAI
    model runs the same INT4 weights (one copy on disk: `hybrid.export.shared`); its int8 prompt
    pass's weights are made at load, or with `store_int8` kept in the bundle."""
    parts = Precisions.of(precision)
    out = Path(out).resolve()
    if out.exists() and not (out / MANIFEST_NAME).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a bundle: exporting would replace it; choose another folder")
    checkpoint = resolve_checkpoint(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work.chmod(0o755)
    lock = _hold(work)
    try:
        model_info = _write_parts(checkpoint, work, precision, genai, int4, store_int8)
        manifest = Manifest(
            format=BUNDLE_FORMAT,
            source=source,
            checkpoint=str(checkpoint),
            precision=precision,
            quantization=int4.name if parts.decoder == "int4" else "",
            fingerprint=checkpoint_fingerprint(source),
            parts=_describe_parts(work, parts),
            versions=_versions(),
            model=model_info,
        )
        (work / MANIFEST_NAME).write_text(manifest.to_json())
        _replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        lock.close()
    (out / LOCK_FILE).unlink(missing_ok=True)  # it came along with the folder's rename
    log.info("bundle ready: %s (%s)", out, _part_sizes(manifest))
    return out


def _hold(work: Path):
    """An exclusive lock on `work/LOCK_FILE` for as long as this export runs: it dies with the
    process, so a later export can tell a live export's folder from a killed one's."""
    lock = open(work / LOCK_FILE, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def remove_stale_work(out: Path) -> None:
    """Remove what killed exports of `out` left beside it (`.NAME.partial-*` folders no live export
    holds, `.NAME.old-PID` folders of a process that is gone): for a 2B bundle, gigabytes."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        try:
            with open(folder / LOCK_FILE, "r+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live export is writing it
        except OSError:
            if time.time() - folder.stat().st_mtime < STALE_UNLOCKED_S:
                continue  # made an instant ago, its lock not taken yet
        log.info("removing %s, left by an export that did not finish", folder)
        shutil.rmtree(folder, ignore_errors=True)
    for folder in out.parent.glob(f".{out.name}.old-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _part_sizes(manifest: Manifest) -> str:
    """The bundle's bytes in all and per part (the first folder of each file's path)."""
    sizes: dict[str, int] = {}
    for rel, part in manifest.parts.items():
        sizes[rel.split("/")[0]] = sizes.get(rel.split("/")[0], 0) + part.bytes
    listed = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]))
    return f"{sum(sizes.values()) / 1e6:.1f} MB: {listed}"


def _write_parts(checkpoint: Path, work: Path, precision: str, genai: bool, int4: Int4Scheme, store_int8: bool) -> dict:
    """Every part of the bundle, each tensor read from the checkpoint as it is written."""
    from transformers import AutoConfig, AutoProcessor

    precisions = Precisions.of(precision)
    steps = 4 if genai else 3
    with _step(1, steps, "reading the checkpoint's config, processor and tensor index"):
        config = AutoConfig.from_pretrained(str(checkpoint))
        processor = AutoProcessor.from_pretrained(str(checkpoint))
        tensors = CheckpointTensors(checkpoint)
    with _step(2, steps, "saving the processor, the vision tower and the embedding table"):
        processor.save_pretrained(str(work / PROCESSOR_DIR))
        _generation_config(checkpoint, config).save_pretrained(str(work / PROCESSOR_DIR))
        _write_vision_tower(tensors, config, work / VISION_DIR, int8=precisions.vision_int8)
        embed = decoder.TEXT + "embed_tokens.weight"
        dtype = np.float16 if precisions.embeddings == "fp16" else np.float32
        write_npy(work / EMBED_FILE, tensors.shape(embed), lambda rows: tensors.read(embed, rows), dtype=dtype)
    what = f"int4 {int4.name}" if precisions.decoder == "int4" else "fp32"
    what += ", int8 prompt pass" if precisions.prompt == "int8" else ""
    with _step(3, steps, f"writing the ONNX text decoder ({what})"):
        decoder.export_decoder(tensors, config, work / DECODER_FILE, precision, _LayerProgress(), int4)
        if precisions.prompt == "int8":
            write_int8_prefill(work / DECODER_FILE, work / PREFILL_FILE, store=store_int8)
    if genai:
        with _step(4, steps, f"building the GenAI text model ({precision})"):
            lent = build_genai(checkpoint, work / GENAI_DIR, precision, processor, work / DECODER_FILE)
        share_embedding_table(work)
        if lent:
            borrow_from_genai(work, DECODER_DIR, lent)
    return _model_info(config, tensors)


def share_embedding_table(work: Path, rows: int = 4096) -> bool:
    """Where the GenAI model holds the embedding table bit for bit (INT4 bundles: both fp16), drop
    `EMBED_FILE` and write `EMBED_SHARED`, which points the hybrid route at the GenAI model's copy
    (622 MB fewer on disk for the 2B). Returns whether it did."""
    table = np.load(work / EMBED_FILE, mmap_mode="r")
    model = onnx.load(str(work / GENAI_DIR / "model.onnx"), load_external_data=False)
    found = [t for t in model.graph.initializer if t.name == GENAI_EMBED]
    if not found or table.dtype != np.float16 or found[0].data_type != onnx.TensorProto.FLOAT16:
        return False
    tensor = found[0]
    where = external_info(tensor)
    data = f"{GENAI_DIR}/{where.get('location')}"
    if tuple(tensor.dims) != table.shape or data != GENAI_DATA:  # the file the hybrid route verifies
        return False
    offset = int(where.get("offset", 0))
    theirs = np.memmap(work / data, dtype="<f2", mode="r", offset=offset, shape=table.shape)
    for start in range(0, table.shape[0], rows):
        if not np.array_equal(
            theirs[start : start + rows].view(np.uint16), table[start : start + rows].view(np.uint16)
        ):
            log.warning("the GenAI model's embedding table differs from the checkpoint's: keeping both")
            return False
    shared = {"file": data, "offset": offset, "shape": list(table.shape), "dtype": "float16"}
    (work / EMBED_SHARED).write_text(json.dumps(shared) + "\n")
    del table, theirs
    (work / EMBED_FILE).unlink()
    return True


def _generation_config(checkpoint: Path, config):
    """The checkpoint's generation config, or the one transformers derives from its config when it has none."""
    from transformers import GenerationConfig

    if (checkpoint / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(checkpoint))
    return GenerationConfig.from_model_config(config)


def _write_vision_tower(tensors, config, folder: Path, int8: bool) -> None:
    """The vision config, the ONNX tower (INT8 in INT4 bundles) and, in float32, the `model.visual.*`
    tensors: all of them in fp32 bundles (the PyTorch tower), only what the ONNX tower reads at
    load in INT4 ones (their PyTorch tower reads the checkpoint): what `VisionTower` loads."""
    names = sorted(name for name in tensors.entries if name.startswith(CHECKPOINT_VISION_PREFIX))
    if not names:
        raise BundleError(f"the checkpoint has no {CHECKPOINT_VISION_PREFIX}* tensors: not a Qwen3-VL checkpoint?")
    if int8:
        names = [CHECKPOINT_VISION_PREFIX + name for name in ONNX_VISION_TENSORS]
    folder.mkdir(parents=True, exist_ok=True)
    listed = [(name[len(CHECKPOINT_VISION_PREFIX) :], tensors.shape(name)) for name in names]
    write_safetensors(folder / VISION_WEIGHTS, listed, lambda name: tensors.read(CHECKPOINT_VISION_PREFIX + name))
    (folder / VISION_CONFIG).write_text(config.vision_config.to_json_string())
    export_vision(tensors, CHECKPOINT_VISION_PREFIX, config.vision_config, folder / vision_graph(int8), int8)


def _model_info(config, tensors) -> dict:
    text = config.text_config
    return {
        "model_type": config.model_type,
        "num_hidden_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "deepstack_layers": len(config.vision_config.deepstack_visual_indexes),
        "image_token_id": config.image_token_id,
        "parameters": tensors.numel(),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _describe_parts(work: Path, precisions: Precisions) -> dict[str, PartInfo]:
    """Every file of the bundle with what it runs in, its checksum and size."""
    parts = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file() and p.name != LOCK_FILE):
        rel = path.relative_to(work).as_posix()
        graph = not rel.endswith(".json")
        if rel.startswith(PREFILL_FILE):  # the int8 prompt pass's graph and its .data
            precision = "int8"
        elif graph and rel.startswith(DECODER_DIR + "/"):
            precision = precisions.decoder
        elif graph and rel.startswith(GENAI_DIR + "/"):
            precision = precisions.genai
        elif rel.startswith(f"{VISION_DIR}/{vision_graph(True)}"):  # the INT8 graph and its .data
            precision = "int8"
        elif rel in (EMBED_FILE, EMBED_SHARED):
            precision = precisions.embeddings
        else:
            precision = "fp32"
        parts[rel] = PartInfo(path=rel, precision=precision, sha256=sha256(path), bytes=path.stat().st_size)
    return parts


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
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


class _LayerProgress:
    """Logs one line per decoder layer written: a bar, the count and the time since the first."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        filled = BAR_WIDTH * done // total
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        log.info("      [%s] layer %*d/%d  %.1f s", bar, len(str(total)), done, total, time.perf_counter() - self.start)


class _step:
    """Logs `[i/n] what ...` and how long it took."""

    def __init__(self, index: int, total: int, what: str) -> None:
        self.label = f"[{index}/{total}] {what}"

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        log.info("%s ...", self.label)

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            log.info("%s: done in %.1f s (%s)", self.label, time.perf_counter() - self.start, _peak_memory())


def _peak_memory() -> str:
    """Peak resident memory so far of this process and of the largest finished child (the GenAI builder)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    text = f"peak RSS {own:.2f} GiB"
    return text + f", child process {children:.2f} GiB" if children else text
