"""The onnxruntime-genai text model of a bundle, built by GenAI's own model builder.

For text-only input Qwen3-VL's text model is exactly a Qwen3 causal LM, which is what the builder
makes of a Qwen3-VL checkpoint with `exclude_embeds=false`. The builder writes a placeholder
tokenizer when it cannot find the checkpoint's, so the checkpoint's real tokenizer files are
copied over its output.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from hybrid.errors import BundleError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_genai(checkpoint: Path, out: Path, precision: str, processor) -> None:
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", "cpu",
        "--extra_options", "exclude_embeds=false", "shared_embeddings=false",
    ]  # fmt: skip
    if precision == "int4":
        command.append("int4_accuracy_level=4")
    with tempfile.TemporaryDirectory() as cache:
        result = subprocess.run(command + ["-c", cache], capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise BundleError(f"the onnxruntime-genai builder failed:\n{tail}")
    with tempfile.TemporaryDirectory() as tmp:
        processor.tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            (out / name).write_bytes((Path(tmp) / name).read_bytes())
    _drop_default_search(out / "genai_config.json")


def _drop_default_search(config_path: Path) -> None:
    """Our route sets every search option per request; GenAI's default top_k=50 must never leak in."""
    config = json.loads(config_path.read_text())
    config["search"]["top_k"] = 0
    config_path.write_text(json.dumps(config, indent=4))
