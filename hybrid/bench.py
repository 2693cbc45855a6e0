"""`python -m hybrid bench`: the routes side by side on a checkpoint with the real 2B/4B shapes.

Builds (and caches) a random-weight Qwen3-VL of the preset's shapes, exports an fp32 and an INT4
bundle, and measures every route in its own worker process (so each route's memory is its own),
interleaved run by run so that machine noise hits all routes alike. Figures are medians. Random
weights make the speed figures real and the answers meaningless.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from hybrid.config import (
    IMAGE_DETAIL,
    Precision,
    Precisions,
    Prefill,
    RuntimeConfig,
    SamplingConfig,
    Speculative,
)
from hybrid.errors import UserError
from hybrid.export.prefill import derived_bytes
from hybrid.layout import BORROWED_FILE, DECODER_DIR, DECODER_FILE, GENAI_DIR, PREFILL_GRAPH, PROCESSOR_DIR, VISION_DIR
from hybrid.logs import setup_logging
from hybrid.manifest import Manifest
from hybrid.metrics import cpu_isa, rss_mb
from hybrid.router import can_serve
from hybrid.tiny import TinySpec, build_checkpoint
from hybrid.types import Message, Request, RouteName, collect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchRoute:
    """One column of the benchmark: a route of the bundle exported at `precision`, with speculative
    decoding as `speculative` says and the prompt pass `prefill` runs (both only on the hybrid route)."""

    route: RouteName
    precision: Precision
    speculative: Speculative = SamplingConfig.speculative
    prefill: Prefill = RuntimeConfig.prefill

    @property
    def key(self) -> str:
        plain = "_plain" if self.speculative == "off" else ""
        return f"{self.route}_{self.precision}{plain}" + ("_int4prefill" if self.prefill == "decoder" else "")

    @property
    def plain(self) -> BenchRoute:
        return replace(self, speculative="off")


DEFAULT_ROUTES = (
    BenchRoute("pytorch", "fp32"),
    BenchRoute("hybrid", "fp32"),
    BenchRoute("hybrid", "int4"),
    BenchRoute("genai", "int4"),
)
INT4_PREFILL = BenchRoute("hybrid", "int4", prefill="decoder")  # the INT4 graph's own prompt pass
ROUTES = {r.key: r for r in (*DEFAULT_ROUTES, *(r.plain for r in DEFAULT_ROUTES if r.route == "hybrid"), INT4_PREFILL)}
VERIFY_SIZES = (1, 2, 3, 5, 9)  # tokens of a verifying pass: the last one and k = 0, 1, 2, 4, 8 drafts
VERIFY_CONTEXT = 256  # tokens in the cache before the timed passes (a picture's prompt)
REUSING: frozenset[RouteName] = frozenset({"hybrid", "genai"})  # routes that keep a conversation's KV cache
CHECKPOINT_DTYPE = "bfloat16"  # as the real checkpoints are stored
DETAIL_IMAGE = (4032, 3024)  # a 12-megapixel phone photo
FIELDS = ("vision_ms", "prefill_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb")


def preset_spec(preset: str, layers: int | None):
    """Real Qwen3-VL-2B/4B shapes (text and vision), or a tiny one for tests; `layers` cuts the text depth."""
    vision = dict(
        vision_depth=24,
        vision_hidden_size=1024,
        vision_heads=16,
        vision_intermediate_size=4096,
        num_position_embeddings=2304,
        deepstack_visual_indexes=(5, 11, 17),
        min_pixels=65536,
        max_pixels=16384 * 32 * 32,
    )
    text = dict(
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        mrope_section=(24, 20, 20),
        vocab_size=151936,
        tie_word_embeddings=True,
        initializer_range=0.02,
        max_position_embeddings=32768,
    )
    presets = {
        "2b": TinySpec(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, **text, **vision),
        "4b": replace(
            TinySpec(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728, **text, **vision),
            num_attention_heads=32,
        ),
        # three text layers: DeepStack (two maps) ends before the last one, as in the real models;
        # llama.cpp's graph aborts when a DeepStack map falls on the last layer (its rows already cut)
        "tiny": TinySpec(num_hidden_layers=3, vocab_size=4096),
    }
    if preset not in presets:
        raise UserError(f"--preset must be one of {', '.join(presets)}")
    spec = presets[preset]
    if layers is not None:
        if not 1 <= layers <= spec.num_hidden_layers:
            raise UserError(f"--layers must be in [1, {spec.num_hidden_layers}] for {preset}")
        spec = replace(spec, num_hidden_layers=layers)
    return spec


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="2b", help="2b | 4b | tiny")
    parser.add_argument("--layers", type=int, default=None, help="cut the text depth (default: full)")
    parser.add_argument("--image", default="448x336", help="image size WxH")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="measured runs per route, after one warm-up")
    parser.add_argument(
        "--routes",
        default=",".join(r.key for r in DEFAULT_ROUTES),
        help="comma-separated subset of " + ",".join(ROUTES) + " (_plain: without speculative decoding)",
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--peers",
        default="",
        help="comma-separated peers to measure beside the routes: openvino (OpenVINO GenAI's VLMPipeline on an "
        "optimum-intel INT4 export of the same checkpoint, in its own environment under .cache/peers), llamacpp "
        "(llama-server, built once for this CPU under ~/.cache/hybrid-peers, on Q4_K_M and Q4_0 GGUF conversions "
        "of the checkpoint with an f16 projector)",
    )
    parser.add_argument("--cache", default=".cache/bench", help="where checkpoints and bundles are kept")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--follow-up",
        action="store_true",
        help="also time a second question on the same picture, with and without conversation reuse",
    )
    parser.add_argument(
        "--prefill-ahead",
        action="store_true",
        help="also time, on each hybrid route, the question about a picture that was prefilled when it was "
        "added (as the page does while the question is typed) against the same question asked fresh",
    )
    parser.add_argument(
        "--detail",
        action="store_true",
        help="also time the vision tower on a 12-megapixel photo at each image detail level",
    )
    parser.add_argument(
        "--speculation",
        action="store_true",
        help="also run each hybrid route without speculative decoding, and time verifying passes of "
        "k = 0, 1, 2, 4, 8 drafted tokens against a one-token step; with --preset demo, the demo "
        "model's decode with and without it per question kind",
    )


def run_bench(args: argparse.Namespace) -> int:
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = set(routes) - set(ROUTES)
    if unknown:
        raise UserError(f"unknown routes {sorted(unknown)}; choose from {', '.join(ROUTES)}")
    width, height = _parse_size(args.image)
    if args.new_tokens < 2 or args.runs < 1 or args.prompt_tokens < 1:
        raise UserError("--new-tokens must be >= 2, --runs and --prompt-tokens >= 1")
    work = Workload(width, height, args.prompt_tokens, args.new_tokens, args.runs, args.threads)
    if args.speculation:
        plain = [ROUTES[key].plain.key for key in routes if ROUTES[key].route == "hybrid"]
        routes += [key for key in plain if key in ROUTES]  # the int4-prefill column has no plain twin
        routes = list(dict.fromkeys(routes))
    peers = _parse_peers(args.peers)
    if peers and args.preset == DEMO:
        raise UserError("--peers measures the 2b, 4b and tiny presets (the demo model's tokenizer is its own)")
    if args.preset == DEMO:
        bundles, layers = _demo_bundles(Path(args.cache), {ROUTES[r].precision for r in routes}), None
    else:
        spec = preset_spec(args.preset, args.layers)
        bundles = _prepare_bundles(Path(args.cache), args.preset, spec, {ROUTES[r].precision for r in routes})
        layers = spec.num_hidden_layers
        peers = _prepare_peers(Path(args.cache), args.preset, spec, peers)
    if args.speculation and args.preset == DEMO:
        report = measure_demo_speculation(bundles, routes, args.new_tokens, args.runs, args.threads)
    else:
        report = measure(bundles, routes, work, peers)
    report.update(preset=args.preset, layers=layers, image=args.image, cpu=cpu_isa())
    if args.speculation:
        hybrid = sorted({ROUTES[key].precision for key in routes if ROUTES[key].route == "hybrid"})
        report["verify_cost"] = {
            f"hybrid_{precision}": measure_verify_cost(bundles[precision], args.threads) for precision in hybrid
        }
    if args.follow_up:
        for key, row in measure_follow_up(bundles, routes, work).items():
            report["routes"][key].update(row)
    if args.prefill_ahead:
        for key, row in measure_prefill_ahead(bundles, routes, work).items():
            report["routes"][key].update(row)
    if args.detail:
        report["vision_by_detail"] = measure_detail(bundles, routes, args.threads)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--image must look like 448x336, got {text!r}") from None
    if width < 1 or height < 1:
        raise UserError("--image sizes must be positive")
    return width, height


def _prepare_bundles(cache: Path, preset: str, spec: TinySpec, precisions: set[Precision]) -> dict[str, Path]:
    from hybrid.launch import ensure_bundle  # loads torch and transformers: only when benchmarking

    name = _checkpoint_name(preset, spec)
    checkpoint = _prepare_checkpoint(cache, preset, spec)
    bundles = {}
    for precision in sorted(precisions):
        # a cached bundle is reused only while it is what an export would write today
        bundles[precision] = ensure_bundle(
            checkpoint, cache / f"bundle-{name}-{precision}", precision, genai=precision == "int4"
        )
    return bundles


def _checkpoint_name(preset: str, spec: TinySpec) -> str:
    return f"{preset}-L{spec.num_hidden_layers}"


def _prepare_checkpoint(cache: Path, preset: str, spec: TinySpec) -> Path:
    checkpoint = cache / f"checkpoint-{_checkpoint_name(preset, spec)}"
    if not (checkpoint / "config.json").is_file():
        log.info(
            "building a random-weight %s checkpoint (%d text layers) in %s", preset, spec.num_hidden_layers, checkpoint
        )
        build_checkpoint(checkpoint, spec, seed=0, dtype=CHECKPOINT_DTYPE)
    return checkpoint


@dataclass(frozen=True)
class Peer:
    """A peer column: how to start its worker (given the threads and a log file), and the record of
    its export of the bench's checkpoint with a line that says how it was made."""

    start: Callable[[int, Path], object]
    export: dict
    summary: str
    disk_mb: float
    log_dir: Path


PEERS = {"openvino": ("openvino_int4",), "llamacpp": ("llamacpp_q4_k_m", "llamacpp_q4_0")}  # name: its columns


def _parse_peers(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(names) - set(PEERS)
    if unknown:
        raise UserError(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def _prepare_peers(cache: Path, preset: str, spec: TinySpec, names: list[str]) -> dict[str, Peer]:
    """Each named peer's environment or build (made once) and its export of the bench's checkpoint,
    as one Peer per column."""
    if not names:
        return {}
    checkpoint = _prepare_checkpoint(cache, preset, spec)
    peers: dict[str, Peer] = {}
    if "openvino" in names:
        peers |= _openvino_peer(cache, checkpoint, _checkpoint_name(preset, spec))
    if "llamacpp" in names:
        peers |= _llamacpp_peers(cache, checkpoint, _checkpoint_name(preset, spec))
    return peers


def _openvino_peer(cache: Path, checkpoint: Path, name: str) -> dict[str, Peer]:
    from hybrid.peers.openvino import OpenVinoScheme, OpenVinoWorker, ensure_env, ensure_export

    python = ensure_env()
    scheme = OpenVinoScheme()
    out = cache / f"openvino-{name}-{scheme.name}"
    record = ensure_export(python, checkpoint, out, scheme)
    summary = (
        f"optimum-cli export openvino {record.scheme} took {record.seconds:.0f} s, peak {record.peak_rss_mb:.0f} MB "
        f"(process tree), {record.disk_mb:.0f} MB on disk"
    )

    def start(threads: int, log_file: Path) -> OpenVinoWorker:
        return OpenVinoWorker(python, out, threads, log_file)

    return {"openvino_int4": Peer(start, asdict(record), summary, record.disk_mb, cache)}


def _llamacpp_peers(cache: Path, checkpoint: Path, name: str) -> dict[str, Peer]:
    from hybrid.peers import llamacpp

    build = llamacpp.ensure_build()
    out = cache / f"llamacpp-{name}"
    record = llamacpp.ensure_export(build, checkpoint, out)
    peers = {}
    for quant, key in zip(llamacpp.QUANTS, PEERS["llamacpp"]):

        def start(threads: int, log_file: Path, quant: str = quant) -> llamacpp.LlamaServerWorker:
            text, mmproj = llamacpp.text_file(out, quant), llamacpp.mmproj_file(out)
            return llamacpp.LlamaServerWorker(build, text, mmproj, threads, log_file)

        disk = llamacpp.export_disk_mb(record, quant)
        peers[key] = Peer(start, asdict(record), record.summary(quant), disk, cache)
    return peers


@dataclass(frozen=True)
class Workload:
    """What every timed request of one bench run asks: a new `width` x `height` picture per round and
    `prompt_tokens` of text, `new_tokens` greedy; `runs` rounds, `threads` per route."""

    width: int
    height: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    threads: int

    def image_request(self, seed: int) -> Request:
        return _image_request(self.width, self.height, self.prompt_tokens, self.new_tokens, seed)


def measure(bundles: dict[str, Path], routes: list[str], work: Workload, peers: dict[str, Peer] | None = None) -> dict:
    """Per route (and peer): medians of the timings of an image prompt (a text prompt as long, for a
    text-only route), a new picture every round so that the vision feature cache never answers for
    the tower."""
    image_tokens: dict[str, int] = {}
    peers = peers or {}

    def one(worker: _Worker, key: str, run: int) -> dict:
        image_prompt = work.image_request(seed=run)
        if key not in peers and not can_serve(ROUTES[key].route, image_prompt):
            return worker.ask(_text_request(image_tokens.get("image", work.prompt_tokens), work.new_tokens))
        result = worker.ask(image_prompt)
        image_tokens["image"] = result["timings"]["prompt_tokens"]
        return result

    samples, memory = take_rounds(bundles, [*routes, *peers], work.threads, work.runs, one, peers)
    disk = {key: peers[key].disk_mb if key in peers else _disk_mb(bundles, ROUTES[key]) for key in samples}
    report = _summarise(samples, memory, disk, bundles, work.new_tokens)
    report["peers"] = {
        key: {"export": peer.export, "summary": peer.summary, "settings": samples[key][0]["settings"]}
        for key, peer in peers.items()
    }
    return report


def _disk_mb(bundles: dict[str, Path], column: BenchRoute) -> float:
    """What a route needs on disk: its whole bundle (the GenAI model is part of an INT4 bundle), or
    for the PyTorch route the checkpoint it reads."""
    bundle = bundles[column.precision]
    folder = Path(Manifest.load(bundle).checkpoint) if column.route == "pytorch" else bundle
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def take_rounds(
    bundles: dict[str, Path],
    keys: list[str],
    threads: int,
    runs: int,
    one: Callable[[_Worker, str, int], dict],
    peers: dict[str, Peer] | None = None,
) -> tuple[dict[str, list[dict]], dict[str, tuple[float, float]]]:
    """`one(worker, key, run)` for each route in its own worker process, `runs` rounds after a warm-up
    round that is left out, the routes taking turns going first (`round_order`). Returns each
    route's samples and its worker's (loaded MB, baseline RSS MB)."""
    workers = _start_workers(bundles, keys, threads, peers or {})
    try:
        samples: dict[str, list[dict]] = {key: [] for key in keys}
        for run in range(runs + 1):
            for key in round_order(keys, run):
                sample = one(workers[key], key, run)
                if run:
                    samples[key].append(sample)
        return samples, {key: (worker.loaded_mb, worker.baseline_rss_mb) for key, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()


def round_order(keys: list[str], run: int) -> list[str]:
    """The routes in the order they run in round `run`: as given, then reversed, in turns (a fixed
    order is not neutral on a 2-core machine: docs/benchmarks.md)."""
    return keys if run % 2 == 0 else keys[::-1]


def _start_workers(bundles: dict[str, Path], keys: list[str], threads: int, peers: dict[str, Peer]) -> dict:
    """One worker per column; if one cannot start, those already started are closed before the error."""
    ctx = mp.get_context("spawn")
    workers = {}
    try:
        for key in keys:
            if key in peers:
                workers[key] = peers[key].start(threads, peers[key].log_dir / f"{key}-worker.log")
            else:
                workers[key] = _Worker(ctx, bundles[ROUTES[key].precision], ROUTES[key], threads)
    except BaseException:
        for worker in workers.values():
            worker.close()
        raise
    return workers


def _image_request(width: int, height: int, prompt_tokens: int, new_tokens: int, seed: int) -> Request:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    text = " ".join(["the"] * prompt_tokens)
    sampling = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return Request((Message("user", text, (image,)),), sampling)


def _text_request(total_tokens: int, new_tokens: int) -> Request:
    """A text prompt padded to the same token count as the image prompt."""
    overhead = 5  # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n
    text = " ".join(["the"] * max(total_tokens - overhead, 1))
    sampling = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return Request((Message("user", text),), sampling)


def _summarise(
    samples: dict, memory: dict[str, tuple[float, float]], disk: dict[str, float], bundles: dict, new_tokens: int
) -> dict:
    bandwidth = measure_bandwidth_gb_s()
    weight_bytes = int4_decode_bytes(bundles["int4"]) if "int4" in bundles else None
    ceiling = bandwidth * 1e9 / weight_bytes if weight_bytes else None
    routes = {}
    for key, results in samples.items():
        timings = [r["timings"] for r in results]
        row = {f: statistics.median(t[f] for t in timings) for f in FIELDS}
        row["peak_rss_mb"] = max(t["peak_rss_mb"] for t in timings)
        row.update(
            prompt_tokens=timings[0]["prompt_tokens"],
            decode_tokens=timings[0]["decode_tokens"],
            loaded_mb=memory[key][0],
            baseline_rss_mb=memory[key][1],
            disk_mb=disk[key],
        )
        if ceiling:
            row["ceiling_share"] = row["decode_tok_s"] / ceiling
        routes[key] = row
    return {
        "routes": routes,
        "bandwidth_gb_s": bandwidth,
        "int4_bytes_per_token": weight_bytes,
        "ceiling_tok_s": ceiling,
        "new_tokens": new_tokens,
        "runs": len(next(iter(samples.values()))),
        "ratios": _ratios(routes),
        "note": "random weights: the speed figures are real, the answers are not",
    }


def _ratios(routes: dict) -> dict:
    ratios = {}
    pairs = [
        ("hybrid_int4", "genai_int4", "decode_tok_s"),
        ("hybrid_int4", "pytorch_fp32", "decode_tok_s"),
        ("hybrid_fp32", "pytorch_fp32", "decode_tok_s"),
        ("hybrid_int4", "pytorch_fp32", "ttft_ms"),
        ("hybrid_fp32", "hybrid_fp32_plain", "decode_tok_s"),
        ("hybrid_int4", "hybrid_int4_plain", "decode_tok_s"),
        ("hybrid_int4", "hybrid_int4_int4prefill", "prefill_tok_s"),
        ("hybrid_int4", "hybrid_int4_int4prefill", "ttft_ms"),
        ("hybrid_int4", "hybrid_int4_int4prefill", "decode_tok_s"),
        ("hybrid_int4", "openvino_int4", "prefill_tok_s"),
        ("hybrid_int4", "openvino_int4", "ttft_ms"),
        ("hybrid_int4", "openvino_int4", "decode_tok_s"),
        ("hybrid_int4", "openvino_int4", "vision_ms"),
        ("hybrid_int4", "openvino_int4", "disk_mb"),
        ("genai_int4", "openvino_int4", "decode_tok_s"),
        ("hybrid_int4", "llamacpp_q4_k_m", "prefill_tok_s"),
        ("hybrid_int4", "llamacpp_q4_k_m", "ttft_ms"),
        ("hybrid_int4", "llamacpp_q4_k_m", "decode_tok_s"),
        ("hybrid_int4", "llamacpp_q4_k_m", "vision_ms"),
        ("hybrid_int4", "llamacpp_q4_k_m", "disk_mb"),
        ("hybrid_int4", "llamacpp_q4_0", "ttft_ms"),
        ("hybrid_int4", "llamacpp_q4_0", "decode_tok_s"),
    ]
    for a, b, field in pairs:
        if a in routes and b in routes and routes[b][field]:
            ratios[f"{a}/{b} {field}"] = routes[a][field] / routes[b][field]
    return ratios


def measure_bandwidth_gb_s(size_mb: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth as numpy copies see it: (bytes read + bytes written) / time, best of `repeats`."""
    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def int4_decode_bytes(bundle: Path) -> int:
    """Bytes of decoder weights read per decode step: every initializer except the embedding table
    (a decode step reads one row of it, and it is not in the decoder graph)."""
    import onnx  # only for the ceiling, after the routes are measured

    graph = onnx.load(str(bundle / DECODER_FILE), load_external_data=False).graph
    return sum(
        int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in graph.initializer
    )


@dataclass(frozen=True)
class PrefillAhead:
    """A worker's request to prefill `request`'s picture ahead of its question (`Pipeline.warm`)."""

    request: Request


class _Worker:
    """One route of one bundle in its own process; requests go over a pipe (with the column's
    speculative setting), results come back."""

    def __init__(self, ctx, bundle: Path, column: BenchRoute, threads: int) -> None:
        self.speculative = column.speculative
        self.conn, child = ctx.Pipe()
        runtime = RuntimeConfig(threads=threads, prefill=column.prefill)
        self.process = ctx.Process(target=_serve, args=(child, str(bundle), column.route, runtime), daemon=True)
        self.process.start()
        ready = self.conn.recv()
        if "error" in ready:
            raise UserError(f"{column.key} worker failed to start: {ready['error']}")
        self.loaded_mb = ready["loaded_mb"]
        self.baseline_rss_mb = ready["baseline_rss_mb"]

    def ask(self, request: Request | PrefillAhead) -> dict:
        if isinstance(request, Request):
            request = replace(request, sampling=replace(request.sampling, speculative=self.speculative))
        self.conn.send(request)
        result = self.conn.recv()
        if "error" in result:
            raise UserError(f"benchmark request failed: {result['error']}")
        return result

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=30)


def _serve(conn, bundle: str, route: RouteName, runtime: RuntimeConfig) -> None:
    setup_logging(logging.WARNING)
    try:
        import torch  # noqa: F401  (import cost counts as baseline, not as the route's load)

        from hybrid.pipeline import Pipeline  # in the worker only: the parent process never loads a route

        baseline = rss_mb()
        pipeline = Pipeline.load(bundle, runtime, verify=False, only=(route,))
        if route == "pytorch":
            _ = pipeline.routes["pytorch"].model  # load now, not inside the first timed request
        conn.send({"loaded_mb": _loaded_mb(Path(bundle), route, pipeline), "baseline_rss_mb": baseline})
    except Exception as exc:  # reported to the parent, which raises it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    while (request := conn.recv()) is not None:
        try:
            if isinstance(request, PrefillAhead):
                start = time.perf_counter()
                tokens = pipeline.warm(request.request)
                conn.send({"tokens": tokens, "ms": 1e3 * (time.perf_counter() - start)})
                continue
            conn.send(collect(route, pipeline.stream(request, route)))
        except Exception as exc:  # reported to the parent, which raises it
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


def _loaded_mb(bundle: Path, route: RouteName, pipeline) -> float:
    """Bytes of weights a route loads (the memory-mapped embedding table counts only when read whole):
    the hybrid route's include the INT4 weights it reads from the GenAI model's file and the int8
    ones its prompt pass makes at load."""
    extra = 0
    if route == "pytorch":
        folder = Path(pipeline.manifest.checkpoint)
        files = list(folder.glob("*.safetensors"))
    elif route == "hybrid":
        files = list((bundle / VISION_DIR).glob("*.safetensors")) + list((bundle / DECODER_DIR).glob("model.onnx*"))
        if (bundle / BORROWED_FILE).is_file():
            extra += json.loads((bundle / BORROWED_FILE).read_text())["bytes"]
        prompt = bundle / DECODER_DIR / PREFILL_GRAPH
        if pipeline.runtime.prefill == "int8" and prompt.is_file():
            extra += derived_bytes(prompt)
    else:
        files = list((bundle / GENAI_DIR).glob("model.onnx*"))
    return (sum(f.stat().st_size for f in files) + extra) / 2**20


def format_report(report: dict) -> str:
    routes = report["routes"]
    columns = (
        "vision_ms",
        "prefill_tok_s",
        "ttft_ms",
        "decode_tok_s",
        "ceiling_share",
        "peak_rss_mb",
        "baseline_rss_mb",
        "loaded_mb",
        "disk_mb",
    )
    depth = f"{report['layers']} text layers" if report["layers"] else "the shipped demo model"
    lines = [
        f"preset {report['preset']} ({depth}), image {report['image']}, "
        f"{report['new_tokens']} new tokens, median of {report['runs']} runs; CPU {report['cpu']}",
        f"{'route':<18}" + "".join(f"{c:>16}" for c in columns),
    ]
    for key, row in routes.items():
        cells = "".join(f"{row.get(c, float('nan')):>16.2f}" for c in columns)
        lines.append(f"{key:<18}{cells}")
    lines.append(f"memory bandwidth {report['bandwidth_gb_s']:.1f} GB/s (numpy copy)")
    if report["ceiling_tok_s"]:
        lines.append(
            f"INT4 decoder reads {report['int4_bytes_per_token'] / 2**20:.0f} MiB per token: "
            f"decode ceiling {report['ceiling_tok_s']:.1f} tok/s"
        )
    lines += [f"{name}: {value:.2f}x" for name, value in report["ratios"].items()]
    for key, peer in report.get("peers", {}).items():
        settings = ", ".join(f"{name} {value}" for name, value in peer["settings"].items())
        lines.append(f"{key}: {peer['summary']}; {settings}")
    lines += _follow_up_lines(routes) + _ahead_lines(routes) + _detail_lines(report.get("vision_by_detail", {}))
    lines += _speculation_lines(routes, report.get("verify_cost", {}), report.get("by_kind", {}))
    lines.append(
        "peak_rss_mb is the route's own process; baseline_rss_mb is that process after imports, before loading"
    )
    lines.append(report["note"])
    return "\n".join(lines)


def measure_follow_up(bundles: dict[str, Path], routes: list[str], work: Workload) -> dict:
    """Per reusing route: time to first token of a first question, and of a second question in the
    same conversation with the kept cache reused and prefilled from scratch (medians)."""
    keys = [key for key in routes if ROUTES[key].route in REUSING]
    image_tokens: dict[str, int] = {}  # GenAI's text question is as long as the image question

    def one(worker: _Worker, key: str, run: int) -> dict:
        route = ROUTES[key].route
        first = _first_question(route, work, run, image_tokens.get("image"))
        first = replace(first, conversation_id=f"bench-{run}")
        answer = worker.ask(first)
        if first.has_images:
            image_tokens["image"] = answer["timings"]["prompt_tokens"]
        second = _second_question(first, answer["text"])
        reused = worker.ask(second)
        return {"first": answer, "reused": reused, "fresh": worker.ask(replace(second, conversation_id=None))}

    samples, _ = take_rounds(bundles, keys, work.threads, work.runs, one)
    rows = {key: _follow_up_row(rows) for key, rows in samples.items()}
    for key, row in rows.items():
        log.info("%s follow-up: %s", key, row)
    return rows


def measure_prefill_ahead(bundles: dict[str, Path], routes: list[str], work: Workload) -> dict:
    """Per hybrid route: a picture prefilled ahead (`Pipeline.warm`: its vision and its prompt tokens,
    before the question is known), then its question in the same conversation (medians). The time
    to first token after the question is what a person waits after pressing Enter when the picture
    was added while the question was typed; the report sets it beside `ttft_ms` (fresh pictures).
    The same question asked again without the conversation gives the tokens to compare (its
    picture's features come from the vision cache, so its time is not a fresh one)."""
    keys = [key for key in routes if ROUTES[key].route == "hybrid"]

    def one(worker: _Worker, key: str, run: int) -> dict:
        question = replace(work.image_request(run), conversation_id=f"ahead-{run}")
        ahead = replace(question, messages=(replace(question.messages[-1], text=""),))
        warmed = worker.ask(PrefillAhead(ahead))
        return {
            "ahead": warmed,
            "after": worker.ask(question),
            "fresh": worker.ask(replace(question, conversation_id=None)),
        }

    samples, _ = take_rounds(bundles, keys, work.threads, work.runs, one)
    rows = {}
    for key, rounds in samples.items():
        rows[key] = {
            "ahead_ms": statistics.median(r["ahead"]["ms"] for r in rounds),
            "ahead_tokens": rounds[0]["ahead"]["tokens"],
            "ahead_ttft_ms": statistics.median(r["after"]["timings"]["ttft_ms"] for r in rounds),
            "ahead_same_tokens": all(r["after"]["token_ids"] == r["fresh"]["token_ids"] for r in rounds),
        }
        log.info("%s prefill ahead: %s", key, rows[key])
    return rows


def _first_question(route: RouteName, work: Workload, seed: int, image_prompt_tokens: int | None) -> Request:
    """A picture and a question (for a text-only route a text prompt as long as the image prompt),
    greedy without a minimum length: the only requests whose generator GenAI can continue."""
    request = work.image_request(seed)
    if not can_serve(route, request):
        request = _text_request(image_prompt_tokens or work.prompt_tokens, work.new_tokens)
    return replace(request, sampling=SamplingConfig(max_new_tokens=work.new_tokens))


def _second_question(first: Request, answer: str) -> Request:
    question = Message("user", "And what else is in the picture? Describe it in detail.")
    return replace(first, messages=(*first.messages, Message("assistant", answer), question))


def _follow_up_row(rows: list[dict]) -> dict:
    ttft = {
        name: statistics.median(r[name]["timings"]["ttft_ms"] for r in rows) for name in ("first", "reused", "fresh")
    }
    return {
        "first_turn_ttft_ms": ttft["first"],
        "follow_up_ttft_ms": ttft["reused"],
        "follow_up_ttft_ms_no_reuse": ttft["fresh"],
        "follow_up_prompt_tokens": rows[0]["reused"]["timings"]["prompt_tokens"],
        "follow_up_reused_tokens": statistics.median(r["reused"]["timings"]["reused_tokens"] for r in rows),
        "follow_up_same_tokens": all(r["reused"]["token_ids"] == r["fresh"]["token_ids"] for r in rows),
    }


def measure_detail(bundles: dict[str, Path], routes: list[str], threads: int) -> dict:
    """Vision tower time and image tokens of a phone photo at each image detail level, per hybrid
    bundle precision: one run per level after one warm-up (the high level takes minutes on a
    2-core CPU), each on a new picture, so the feature cache never answers."""
    from hybrid.processor import Processor  # loads torch and transformers: only when benchmarking
    from hybrid.vision import VisionTower

    results = {}
    for key in [k for k in routes if ROUTES[k].route == "hybrid"]:
        precision = ROUTES[key].precision
        bundle = bundles[precision]
        processor = Processor(bundle / PROCESSOR_DIR, max_context=1 << 30)  # no prompt here, only pictures
        tower = VisionTower(bundle / VISION_DIR, threads, int8=Precisions.of(precision).vision_int8)
        levels = {}
        for seed, (level, tokens) in enumerate([("warm-up", min(IMAGE_DETAIL.values())), *IMAGE_DETAIL.items()]):
            request = _image_request(*DETAIL_IMAGE, 1, 1, seed=1000 + seed)
            inputs = processor.prepare(request.messages, tokens)
            start = time.perf_counter()
            tower.encode(inputs.pixel_values, inputs.image_grid_thw)
            levels[level] = {
                "max_image_tokens": tokens,
                "image_tokens": inputs.image_tokens[0],
                "vision_ms": 1e3 * (time.perf_counter() - start),
            }
            log.info("%s vision at %s detail: %s", key, level, levels[level])
        del levels["warm-up"]
        results[key] = levels
        del tower
    return results


def _ahead_lines(routes: dict) -> list[str]:
    return [
        f"{key}: picture prefilled ahead ({row['ahead_tokens']} tokens in {row['ahead_ms']:.0f} ms, while the question "
        f"is typed), then TTFT {row['ahead_ttft_ms']:.0f} ms after the question, against {row['ttft_ms']:.0f} ms "
        f"for a fresh picture; same tokens as asked at once: {row['ahead_same_tokens']}"
        for key, row in routes.items()
        if "ahead_ttft_ms" in row
    ]


def _follow_up_lines(routes: dict) -> list[str]:
    return [
        f"{key}: follow-up TTFT {row['follow_up_ttft_ms']:.0f} ms reused ({row['follow_up_reused_tokens']:.0f} of "
        f"{row['follow_up_prompt_tokens']} tokens), {row['follow_up_ttft_ms_no_reuse']:.0f} ms from scratch; "
        f"first turn {row['first_turn_ttft_ms']:.0f} ms; same tokens: {row['follow_up_same_tokens']}"
        for key, row in routes.items()
        if "follow_up_ttft_ms" in row
    ]


def _detail_lines(by_detail: dict) -> list[str]:
    return [
        f"{key} vision, {DETAIL_IMAGE[0]}x{DETAIL_IMAGE[1]} photo: "
        + ", ".join(f"{level} {v['image_tokens']} tokens {v['vision_ms']:.0f} ms" for level, v in levels.items())
        for key, levels in by_detail.items()
    ]


# ---- speculative decoding ------------------------------------------------------------------------

DEMO = "demo"  # the preset that benchmarks the shipped demo model (trained weights: real acceptance)
DEMO_KINDS = ("locate_all", "find", "describe", "count")  # question kinds timed with --speculation


def _demo_bundles(cache: Path, precisions: set[Precision]) -> dict[str, Path]:
    from hybrid.launch import DEMO_MODEL, ensure_bundle  # loads torch and transformers: only when benchmarking

    return {p: ensure_bundle(DEMO_MODEL, cache / f"bundle-demo-{p}", p, genai=p == "int4") for p in sorted(precisions)}


def measure_verify_cost(bundle: Path, threads: int, repeats: int = 30) -> dict:
    """Milliseconds of a decoder pass of each of `VERIFY_SIZES` tokens after `VERIFY_CONTEXT` cached
    ones (medians, the sizes taking turns), and each relative to a one-token step: what verifying k
    drafts costs, whatever the weights. In its own process, like the routes."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_time_passes, (str(bundle), threads, repeats))


def _time_passes(bundle: str, threads: int, repeats: int) -> dict:
    from hybrid.decoder import OnnxDecoder

    decoder = OnnxDecoder(Path(bundle) / DECODER_FILE, threads)
    rng = np.random.default_rng(0)
    cache = decoder.new_cache(VERIFY_CONTEXT + max(VERIFY_SIZES))
    prompt = rng.standard_normal((1, VERIFY_CONTEXT, decoder.hidden_size), dtype=np.float32) * 0.02
    positions = np.broadcast_to(np.arange(VERIFY_CONTEXT), (3, 1, VERIFY_CONTEXT)).copy()
    deepstack = np.zeros((decoder.num_deepstack, 1, VERIFY_CONTEXT, decoder.hidden_size), dtype=np.float32)
    decoder.forward(cache, prompt, positions, deepstack)
    rows = rng.standard_normal((max(VERIFY_SIZES), decoder.hidden_size), dtype=np.float32) * 0.02
    times: dict[int, list[float]] = {size: [] for size in VERIFY_SIZES}
    for run in range(repeats + 2):  # two warm-up rounds: each size binds its buffers on its first pass
        for size in VERIFY_SIZES if run % 2 == 0 else VERIFY_SIZES[::-1]:
            start = time.perf_counter()
            decoder.run_text(cache, rows[:size], VERIFY_CONTEXT)
            elapsed = time.perf_counter() - start
            cache.truncate(VERIFY_CONTEXT)
            if run >= 2:
                times[size].append(elapsed)
    one = statistics.median(times[1])
    return {
        str(size): {"drafts": size - 1, "ms": 1e3 * statistics.median(t), "vs_step": statistics.median(t) / one}
        for size, t in times.items()
    }


def measure_demo_speculation(
    bundles: dict[str, Path], routes: list[str], new_tokens: int, runs: int, threads: int
) -> dict:
    """The demo model's decode per question kind, with and without speculation: each round asks
    every kind about a new scene (the routes taking turns), greedy, up to `new_tokens`; decode
    speeds are pooled over the rounds (`_pooled_decode`)."""
    from hybrid.demo import scenes  # the demo's scenes: only for this preset

    keys = [key for key in routes if ROUTES[key].route == "hybrid"]

    def one(worker: _Worker, key: str, run: int) -> dict:
        rng = np.random.default_rng(run)
        answers = {}
        for kind in DEMO_KINDS:
            scene = scenes.random_scene(rng, shapes=int(rng.integers(2, 4)))
            question = scenes.ask(kind, scene, rng).question
            request = Request(
                (Message("user", question, (scene.render(),)),), SamplingConfig(max_new_tokens=new_tokens)
            )
            answers[kind] = worker.ask(request)
        return answers

    samples, memory = take_rounds(bundles, keys, threads, runs, one)
    by_kind = {}
    for key, rounds in samples.items():
        by_kind[key] = {}
        for kind in DEMO_KINDS:
            timings = [r[kind]["timings"] for r in rounds]
            by_kind[key][kind] = {
                "decode_tok_s": _pooled_decode(timings),
                "tokens": sum(t["decode_tokens"] for t in timings),
                "draft_tokens": sum(t["draft_tokens"] for t in timings),
                "accepted_tokens": sum(t["accepted_tokens"] for t in timings),
            }
    same = {
        key: all(
            r[k]["token_ids"] == p[k]["token_ids"]
            for r, p in zip(samples[key], samples[ROUTES[key].plain.key])
            for k in DEMO_KINDS
        )
        for key in keys
        if ROUTES[key].speculative != "off" and ROUTES[key].plain.key in samples
    }
    routes_rows = {
        key: {
            "decode_tok_s": _pooled_decode([r[k]["timings"] for r in rounds for k in DEMO_KINDS]),
            "loaded_mb": memory[key][0],
            "baseline_rss_mb": memory[key][1],
        }
        for key, rounds in samples.items()
    }
    return {
        "routes": routes_rows,
        "by_kind": by_kind,
        "same_tokens": same,
        "bandwidth_gb_s": measure_bandwidth_gb_s(),
        "int4_bytes_per_token": None,
        "ceiling_tok_s": None,
        "new_tokens": new_tokens,
        "runs": runs,
        "ratios": _ratios(routes_rows),
        "note": "the shipped demo model's answers to its own kinds of questions (scenes from seeds 1..runs)",
    }


def _pooled_decode(timings: list[dict]) -> float:
    """Tokens after the first over decode time, summed over answers: a demo answer decodes in
    milliseconds, too short for a median of per-answer speeds to be steady."""
    tokens = sum(t["decode_tokens"] - 1 for t in timings if t["decode_tok_s"] > 0)
    seconds = sum((t["decode_tokens"] - 1) / t["decode_tok_s"] for t in timings if t["decode_tok_s"] > 0)
    return tokens / seconds if seconds else 0.0


def _speculation_lines(routes: dict, verify_cost: dict, by_kind: dict) -> list[str]:
    lines = []
    for key, sizes in verify_cost.items():
        cells = ", ".join(f"k={row['drafts']} {row['ms']:.2f} ms ({row['vs_step']:.2f}x)" for row in sizes.values())
        lines.append(f"{key} verifying pass after {VERIFY_CONTEXT} tokens: {cells}")
    for key, kinds in by_kind.items():
        plain = by_kind.get(ROUTES[key].plain.key) if ROUTES[key].speculative != "off" else None
        if plain is None:
            continue
        for kind, row in kinds.items():
            ratio = row["decode_tok_s"] / plain[kind]["decode_tok_s"] if plain[kind]["decode_tok_s"] else float("nan")
            lines.append(
                f"{key} {kind:<10}: decode {row['decode_tok_s']:.0f} tok/s vs {plain[kind]['decode_tok_s']:.0f} "
                f"plain ({ratio:.2f}x), kept {row['accepted_tokens']} of {row['draft_tokens']} drafted "
                f"over {row['tokens']} tokens"
            )
    return lines
