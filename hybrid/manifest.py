"""The bundle's `manifest.json`: what each part is, how and from what it was made, and the format
number of the bundle's layout (bumped whenever the layout changes: a bundle of another format is
exported again, never patched).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybrid.errors import BundleError

MANIFEST_NAME = "manifest.json"
# 2: the residual adds fused into the norms in the decoder graph, the ONNX vision tower, the INT4
# scheme named, the source checkpoint's fingerprint; 3: an INT4 bundle's embedding table in fp16;
# 4: the decoder's `num_logits` input (logits of the last k + 1 positions, to verify drafted tokens);
# 5: INT4 bundles' int8 prompt-pass graph, and of their vision tower's tensors only what the ONNX tower reads;
# 6: the int8 vision tower's weights in 7 bits, as the prompt pass's (MLAS's AVX2 kernel saturates on 8), and
# the embedding table read from the GenAI model where it holds the same one (`layout.EMBED_SHARED`);
# 7: INT4 bundles' GenAI model runs the decoder's INT4 weights, kept once in its data file (`layout.BORROWED_FILE`)
BUNDLE_FORMAT = 7


@dataclass(frozen=True)
class PartInfo:
    """One file of a bundle: its path relative to the bundle, precision and checksum."""

    path: str
    precision: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """`manifest.json` of a bundle: what each part is and how it was made."""

    format: int
    source: str
    checkpoint: str
    precision: str
    parts: dict[str, PartInfo]
    versions: dict[str, str]
    model: dict[str, Any] = field(default_factory=dict)
    quantization: str = ""  # the INT4 decoder's `Int4Scheme` name ("" when fp32)
    fingerprint: str = ""  # of the source checkpoint's files (`checkpoint_fingerprint`); "" for a hub id

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, bundle: Path) -> Manifest:
        path = bundle / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{path} is missing: not a bundle (make one with `python -m hybrid export`)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != BUNDLE_FORMAT:
                raise BundleError(
                    f"{path} has bundle format {raw.get('format')}, this version reads {BUNDLE_FORMAT}: "
                    "an older layout; export it again"
                )
            parts = {name: PartInfo(**info) for name, info in raw.pop("parts").items()}
            manifest = cls(parts=parts, **raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"{path} is corrupted ({exc}); export the bundle again") from exc
        return manifest


def checkpoint_fingerprint(source: str | Path) -> str:
    """A digest of a local checkpoint's files (name, size, modification time): it changes when the
    checkpoint does; "" for a hub id, which this machine cannot look into offline."""
    folder = Path(source)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]
