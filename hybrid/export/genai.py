"""The onnxruntime-genai text model of a bundle, built by GenAI's own model builder.

For text-only input Qwen3-VL's text model is exactly a Qwen3 causal LM, which is what the builder
makes of a Qwen3-VL checkpoint with `exclude_embeds=false`. It runs through `genai_builder`, which
loads the checkpoint in its own dtype (a bfloat16 model in half the memory of float32). Its INT4
weights are the hybrid decoder's (`hybrid.export.shared`). The builder writes a placeholder
tokenizer when it cannot find the checkpoint's, so the checkpoint's real tokenizer files are copied
over its output.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hybrid.config import Precisions
from hybrid.errors import BundleError
from hybrid.export.shared import lend_int4_weights
from hybrid.layout import GENAI_CONFIG

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_genai(checkpoint: Path, out: Path, precision: str, processor, decoder: Path | None = None) -> dict[str, int]:
    """GenAI's text model of `checkpoint` in `out`: built in fp32 by the builder, which streams its
    weights to disk, then (for `int4`) each MatMul run in `MatMulNBits` on the INT4 weights of the
    hybrid decoder at `decoder`, its embedding table in fp16 as the hybrid route's is (the builder's
    own INT4 pass would first hold every weight in fp32 at once: 14.5 GiB for the 2B). Returns
    where the decoder's INT4 tensors lie in GenAI's data file (none for fp32)."""
    command = [
        sys.executable,
        "-m",
        "hybrid.export.genai_builder",
        "-i",
        str(checkpoint),
        "-o",
        str(out),
        "-p",
        "fp32",
        "-e",
        "cpu",
        "--extra_options",
        "exclude_embeds=false",
        "shared_embeddings=false",
    ]
    package_root = str(Path(__file__).resolve().parents[2])  # where `hybrid` is importable from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as cache:
        result = subprocess.run(command + ["-c", cache], capture_output=True, text=True, env=env)
    log.debug("onnxruntime-genai builder output:\n%s%s", result.stdout, result.stderr)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise BundleError(f"the onnxruntime-genai builder failed:\n{tail}")
    precisions = Precisions.of(precision)
    lent = {}
    if precisions.genai == "int4":
        if decoder is None:
            raise ValueError("an INT4 GenAI model takes the INT4 decoder's weights: give its path")
        lent = lend_int4_weights(out / "model.onnx", decoder, half_tables=precisions.embeddings == "fp16")
    with tempfile.TemporaryDirectory() as tmp:
        processor.tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            (out / name).write_bytes((Path(tmp) / name).read_bytes())
    _drop_default_search(out / GENAI_CONFIG)
    return lent


def _drop_default_search(config_path: Path) -> None:
    """Our route sets every search option per request; GenAI's default top_k=50 must never leak in."""
    config = json.loads(config_path.read_text())
    config["search"]["top_k"] = 0
    config_path.write_text(json.dumps(config, indent=4))
