"""Timings every route reports with the same names, and a cheap resident-memory probe."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Resident set size of this process now, in MiB (reads /proc, so it costs microseconds)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_isa() -> str:
    """The widest vector extension this CPU has that onnxruntime's kernels use ("avx512_vnni",
    "avx512f", "avx2" or "other"), and its model name: printed beside speed figures, which differ
    by machine."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    fields = {}  # of the first processor
    for line in info.split("\n\n", 1)[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    flags = fields.get("flags", "").split()
    isa = next((name for name in ("avx512_vnni", "avx512f", "avx2") if name in flags), "other")
    model = fields.get("model name", "")
    return f"{isa} ({model}, {os.cpu_count()} logical cores)" if model else isa


@dataclass(frozen=True)
class Timings:
    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    ttft_ms: float
    prompt_tokens: int
    prefill_tok_s: float
    decode_tokens: int  # every generated token, the first one included
    decode_tok_s: float  # the tokens after the first, over the time after the first
    total_ms: float
    peak_rss_mb: float
    reused_tokens: int = 0  # prompt tokens whose KV came from the conversation's kept cache
    image_tokens: tuple[int, ...] = ()  # per picture, in prompt order
    thinking_tokens: int = 0  # generated tokens up to and including `</think>` (a Thinking model)
    video_tokens: tuple[int, ...] = ()  # per video (all its frames), in prompt order
    draft_tokens: int = 0  # tokens drafted for speculative decoding (`hybrid.speculative`)
    accepted_tokens: int = 0  # of those, the ones the decoder agreed with (each saved a pass)

    def to_dict(self) -> dict[str, float]:
        return {
            k: round(v, 3) if isinstance(v, float) else list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
        }


class Stopwatch:
    """Marks the stages of one request; `timings()` turns them into `Timings`.

    Decode speed counts the tokens after the first one over the time after the first token, so
    that prefill never inflates it; prefill speed counts only the tokens prefilled, not reused ones.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tokens = 0
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.image_tokens: tuple[int, ...] = ()
        self.thinking_tokens = 0
        self.video_tokens: tuple[int, ...] = ()
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.peak_rss = rss_mb()

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.sample_memory()

    def token(self) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.tokens += 1

    def sample_memory(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_mb())

    def timings(self) -> Timings:
        end = time.perf_counter()
        self.sample_memory()
        first = self.first_token_at or end
        decode_s = (self.last_token_at or first) - first
        timed_tokens = max(self.tokens - 1, 0)  # those generated within decode_s: all after the first
        prefill_s = self.stages.get("prefill", 0.0)
        prefilled = self.prompt_tokens - self.reused_tokens
        return Timings(
            preprocess_ms=1e3 * self.stages.get("preprocess", 0.0),
            vision_ms=1e3 * self.stages.get("vision", 0.0),
            prefill_ms=1e3 * prefill_s,
            ttft_ms=1e3 * (first - self.start),
            prompt_tokens=self.prompt_tokens,
            prefill_tok_s=prefilled / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens=self.tokens,
            decode_tok_s=timed_tokens / decode_s if decode_s > 0 else 0.0,
            total_ms=1e3 * (end - self.start),
            peak_rss_mb=self.peak_rss,
            reused_tokens=self.reused_tokens,
            image_tokens=self.image_tokens,
            thinking_tokens=self.thinking_tokens,
            video_tokens=self.video_tokens,
            draft_tokens=self.draft_tokens,
            accepted_tokens=self.accepted_tokens,
        )
