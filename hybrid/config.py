"""Frozen configuration: sampling settings, runtime and video limits, image detail, the checkpoint's
own sampling.

Every value a user can set is checked here, where it is built, and a bad one raises `UserError`
with a message that says what is allowed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from hybrid.errors import BundleError, UserError
from hybrid.media import Media

Precision = Literal["fp32", "int4"]  # a bundle's, as the CLI and the manifest name it: see `Precisions`
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
MAX_IMAGE_PIXELS = 50_000_000  # an image above this is refused before it is decoded (decompression bombs)
VisionBackend = Literal["onnx", "torch"]  # which runtime runs the hybrid route's vision tower
VISION_BACKENDS: tuple[VisionBackend, ...] = get_args(VisionBackend)
# What runs an INT4 bundle's prompt pass: its int8 graph (`hybrid.export.prefill`: int8 GEMMs, about
# twice the INT4 kernel's speed on many rows), or the INT4 decoder itself. fp32 bundles prefill in fp32.
Prefill = Literal["int8", "decoder"]
PREFILLS: tuple[Prefill, ...] = get_args(Prefill)
# How the hybrid route decodes: "ngram" drafts tokens from the conversation and verifies them in one
# pass (`hybrid.speculative`: the same greedy tokens, the same sampling distribution); "off": one token a pass
Speculative = Literal["ngram", "off"]
SPECULATIVE: tuple[Speculative, ...] = get_args(Speculative)

# Image tokens per picture at each detail level (one token covers (patch * merge)^2 pixels, 32x32 on
# Qwen3-VL). The checkpoint's own limit (16,384 tokens on the real ones) would let a phone photo
# become ~11,700 tokens, minutes of vision and prefill on a 2-core CPU; 1024 tokens (about one
# megapixel, e.g. 1184x864) keeps small print readable and the first token within seconds.
IMAGE_DETAIL = {"low": 256, "medium": 1024, "high": 4096}
DEFAULT_IMAGE_DETAIL = "medium"
DEFAULT_MAX_IMAGE_TOKENS = IMAGE_DETAIL[DEFAULT_IMAGE_DETAIL]

# Videos. Qwen3-VL samples 2 frames a second, up to 768, and two frames make one group of video
# tokens. On a 2-core CPU the vision tower and the prefill of one video must stay within seconds:
# 16 frames by default (64 at most, on request), and 1024 video tokens a video (the frames are
# scaled down to fit, as pictures are to their detail level).
DEFAULT_VIDEO_FRAMES = 16
MAX_VIDEO_FRAMES = 64
DEFAULT_MAX_VIDEO_TOKENS = 1024
MAX_VIDEO_SECONDS = 120.0  # a short clip: longer ones are refused before they are decoded
MAX_VIDEO_FILE_FRAMES = 7_200  # frames in the file (decoded up to the last one sampled): 120 s at 60 fps
MAX_VIDEO_FRAME_PIXELS = 3840 * 2160  # 4K frames at most; the sampled frames are held in memory


@dataclass(frozen=True)
class Precisions:
    """What each part of a bundle runs in. One word names them all: "fp32" (everything fp32, exact
    against PyTorch) or "int4" (the vision tower's linear layers in INT8, the hybrid decoder in one
    of our INT4 schemes, the GenAI model in its builder's INT4, the embedding table in fp16: half
    the bytes of the largest fp32 part, read a row a token, and a second decoder graph with int8
    layers for the prompt pass: `hybrid.export.prefill`)."""

    vision: Literal["fp32", "int8"]
    decoder: Precision
    genai: Precision
    embeddings: Literal["fp32", "fp16"]
    prompt: Literal["fp32", "int8"] = "fp32"  # the prompt pass's own graph: int8, or none (the decoder's)

    @classmethod
    def of(cls, precision: str) -> Precisions:
        if precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "int4":
            return cls("int8", "int4", "int4", "fp16", prompt="int8")
        return cls("fp32", "fp32", "fp32", "fp32")

    @property
    def vision_int8(self) -> bool:
        return self.vision == "int8"


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. `temperature == 0` means greedy (argmax); `top_k == 0` means no top-k."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    speculative: Speculative = "ngram"

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, low=1)
        _check_int("min_new_tokens", self.min_new_tokens, low=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise UserError("min_new_tokens must not exceed max_new_tokens")
        _check_int("top_k", self.top_k, low=0)
        _check_int("seed", self.seed, low=0)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=1e-3, high=100.0)
        top_p = _check_float("top_p", self.top_p, low=0.0, high=1.0)
        if top_p <= 0.0:
            raise UserError("top_p must be in (0, 1]")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError("stop must be a tuple of non-empty strings")
        if self.speculative not in SPECULATIVE:
            raise UserError(f"speculative must be one of {', '.join(SPECULATIVE)}, got {self.speculative!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class VideoLimits:
    """What one video may be: frames sampled from it (the checkpoint's own sampling, capped at
    `max_frames`), its length, the frames in its file and the pixels of a frame."""

    max_frames: int = DEFAULT_VIDEO_FRAMES
    max_seconds: float = MAX_VIDEO_SECONDS
    max_file_frames: int = MAX_VIDEO_FILE_FRAMES
    max_frame_pixels: int = MAX_VIDEO_FRAME_PIXELS

    def __post_init__(self) -> None:
        _check_int("video frames", self.max_frames, low=2)  # two frames make Qwen3-VL's smallest video
        if self.max_frames > MAX_VIDEO_FRAMES:
            raise UserError(
                f"too many frames: {self.max_frames} asked per video, the limit is {MAX_VIDEO_FRAMES} "
                "(each pair of frames costs vision and prefill time on the CPU)"
            )
        _check_float("max_seconds", self.max_seconds, low=1.0, high=86_400.0)
        _check_int("max_file_frames", self.max_file_frames, low=2)
        _check_int("max_frame_pixels", self.max_frame_pixels, low=1)


@dataclass(frozen=True)
class RuntimeConfig:
    """Limits and thread settings of one loaded pipeline."""

    threads: int = 0  # 0: one per physical core
    max_new_tokens_limit: int = 1024
    max_images: int = 4
    max_image_pixels: int = MAX_IMAGE_PIXELS
    conversation_cache_mb: int = 1024  # KV caches kept for follow-ups, all conversations together; 0: none
    max_videos: int = 2
    video: VideoLimits = field(default_factory=VideoLimits)
    vision_backend: VisionBackend | None = None  # None: ONNX where the bundle has the graph, else PyTorch
    prefill: Prefill = "int8"  # an INT4 bundle's prompt pass (`PREFILLS`)

    def __post_init__(self) -> None:
        _check_int("threads", self.threads, low=0)
        if self.threads > logical_cpus():
            raise UserError(
                f"threads is {self.threads}, more than the {logical_cpus()} logical CPUs this process may use "
                "(0: one per physical core)"
            )
        _check_int("max_new_tokens_limit", self.max_new_tokens_limit, low=1)
        _check_int("max_images", self.max_images, low=0)
        _check_int("max_image_pixels", self.max_image_pixels, low=1)
        _check_int("conversation_cache_mb", self.conversation_cache_mb, low=0)
        _check_int("max_videos", self.max_videos, low=0)
        if self.prefill not in PREFILLS:
            raise UserError(f"the prefill must be one of {', '.join(PREFILLS)}, got {self.prefill!r}")
        if self.vision_backend is not None and self.vision_backend not in VISION_BACKENDS:
            raise UserError(
                f"the vision backend must be one of {', '.join(VISION_BACKENDS)}, got {self.vision_backend!r}"
            )

    def check_count(self, kind: Media, count: int) -> None:
        """Refuse a conversation with more items of `kind` than its limit (`max_images`,
        `max_videos`), before any is opened."""
        limit = getattr(self, kind.limit)
        if count > limit:
            raise UserError(f"{count} {kind.items} in the conversation, the limit is {limit}")


@dataclass(frozen=True)
class CheckpointSampling:
    """What a checkpoint's `generation_config.json` asks for: sample (with these settings) or not.

    Qwen3-VL Instruct ships `do_sample: true, temperature 0.7, top_p 0.8, top_k 20`: greedy decoding
    of those models is known to fall into endless repetition."""

    do_sample: bool = False  # the rest: transformers' own defaults, for what a config leaves out
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, raw: dict[str, Any]) -> CheckpointSampling:
        given = {key: raw[key] for key in asdict(cls()) if raw.get(key) is not None}
        sampling = cls(**{**given, "do_sample": bool(given.get("do_sample", False))})
        SamplingConfig(**sampling.settings(greedy=False))  # refuse values the routes would refuse
        return sampling

    @classmethod
    def read(cls, folder: Path) -> CheckpointSampling:
        """The generation config in `folder`; none there means greedy."""
        path = folder / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            return cls.from_generation_config(json.loads(path.read_text()))
        except (ValueError, UserError) as exc:
            raise BundleError(f"{path} is not a usable generation config: {exc}") from exc

    def settings(self, greedy: bool) -> dict[str, Any]:
        """`SamplingConfig` keyword arguments: these settings, or greedy (temperature 0)."""
        return {
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
        }


def check_max_image_tokens(value: Any) -> int:
    """An image token budget per picture, as a user may give it."""
    return _check_int("max_image_tokens", value, low=1)


def logical_cpus() -> int:
    """The logical CPUs this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")
    return value


def _check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise UserError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)
