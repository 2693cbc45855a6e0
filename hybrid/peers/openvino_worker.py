"""One OpenVINO GenAI `VLMPipeline` serving the benchmark, run by the peer environment's Python.

    PEER_PYTHON -P hybrid/peers/openvino_worker.py MODEL_DIR --threads N [--exact]

It imports only the standard library, numpy, Pillow and openvino_genai (the project's packages are
not installed in that environment). Requests come one JSON object per line on stdin:
{"image": PATH | null, "prompt": TEXT, "max_new_tokens": N, "min_new_tokens": N}; each answer is
one JSON line on the file descriptor the parent passes in HYBRID_PEER_FD (OpenVINO's own prints go
to stdout and stderr): the generated token ids and the same timing fields the routes report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

# CPU plugin properties that decide how close the peer computes to fp32
SETTINGS = (
    "INFERENCE_PRECISION_HINT",
    "KV_CACHE_PRECISION",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE",
    "INFERENCE_NUM_THREADS",
)
EXACT = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
    "EXECUTION_MODE_HINT": "ACCURACY",
}


def spelt(value) -> str:
    """A property's value as OpenVINO spells it in a config ("bf16", "u8", "32")."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--exact",
        action="store_true",
        help="fp32 compute and KV cache (the CPU plugin's defaults are bf16 where the CPU has it and a u8 KV cache)",
    )
    args = parser.parse_args()
    out = os.fdopen(int(os.environ["HYBRID_PEER_FD"]), "w", buffering=1)
    try:
        import numpy as np
        import openvino as ov
        import openvino_genai as genai
        from PIL import Image

        baseline = rss_mb()
        config = {"INFERENCE_NUM_THREADS": args.threads} if args.threads else {}
        if args.exact:
            config |= EXACT
        core = ov.Core()
        settings = {name: spelt(config.get(name, core.get_property("CPU", name))) for name in SETTINGS}
        pipe = genai.VLMPipeline(args.model, "CPU", **config)
        loaded = sum(f.stat().st_size for f in Path(args.model).glob("openvino_*.bin")) / 2**20
        out.write(json.dumps({"loaded_mb": loaded, "baseline_rss_mb": baseline, "settings": settings}) + "\n")
    except Exception as exc:  # reported to the parent, which raises it
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1

    class Tokens(genai.StreamerBase):
        """Keeps each generated token id and when it came."""

        def __init__(self) -> None:
            super().__init__()
            self.ids: list[int] = []
            self.times: list[float] = []

        def write(self, token):
            now = time.perf_counter()
            for t in token if isinstance(token, list) else [token]:
                self.ids.append(int(t))
                self.times.append(now)
            return genai.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    for line in sys.stdin:
        try:
            request = json.loads(line)
            images = []
            if request.get("image"):
                pixels = np.asarray(Image.open(request["image"]).convert("RGB"), dtype=np.uint8)
                images = [ov.Tensor(pixels[None])]
            config = genai.GenerationConfig()
            config.max_new_tokens = request["max_new_tokens"]
            config.min_new_tokens = request.get("min_new_tokens", 0)
            config.do_sample = False
            tokens = Tokens()
            start = time.perf_counter()
            result = pipe.generate(request["prompt"], images=images, generation_config=config, streamer=tokens)
            end = time.perf_counter()
            out.write(json.dumps(timings(result.perf_metrics, tokens, start, end)) + "\n")
        except Exception as exc:  # reported to the parent, which raises it
            out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
    return 0


def timings(perf, tokens, start: float, end: float) -> dict:
    """The route's timing fields from the pipeline's own metrics (vision: its embedding preparation)
    and the streamer's token times (first token, decode speed measured as the routes measure it)."""
    first = tokens.times[0] if tokens.times else end
    last = tokens.times[-1] if tokens.times else end
    prompt_tokens = int(perf.get_num_input_tokens())
    vision_ms = (
        float(perf.get_prepare_embeddings_duration().mean) if hasattr(perf, "get_prepare_embeddings_duration") else 0.0
    )
    ttft_ms = 1e3 * (first - start)
    prefill_ms = max(ttft_ms - vision_ms, 0.0)
    decode_s = last - first
    return {
        "tokens": tokens.ids,
        "timings": {
            "vision_ms": vision_ms,
            "prefill_ms": prefill_ms,
            "ttft_ms": ttft_ms,
            "prompt_tokens": prompt_tokens,
            "prefill_tok_s": prompt_tokens / (prefill_ms / 1e3) if prefill_ms > 0 else 0.0,
            "decode_tokens": len(tokens.ids),
            "decode_tok_s": (len(tokens.ids) - 1) / decode_s if decode_s > 0 else 0.0,
            "total_ms": 1e3 * (end - start),
            "peak_rss_mb": peak_rss_mb(),
            "pipeline_ttft_ms": float(perf.get_ttft().mean),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
