"""`python -m hybrid export | generate | bench | quality`: the command-line entry point.

Errors a user can cause print one line on stderr and exit with status 2. A route that cannot load
is named with the reason on stderr, and the others serve. Each command imports its machinery (torch,
onnxruntime) when it runs, so that `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import NoReturn

from hybrid.bench import add_bench_arguments, run_bench
from hybrid.cli import add_prefill_argument, add_remote_arguments, add_vision_argument, remote_config, vision_backend
from hybrid.config import (
    DEFAULT_MAX_IMAGE_TOKENS,
    DEFAULT_VIDEO_FRAMES,
    MAX_VIDEO_FRAMES,
    PRECISIONS,
    SPECULATIVE,
    RuntimeConfig,
    SamplingConfig,
    VideoLimits,
)
from hybrid.errors import HybridError
from hybrid.export.int4 import Int4Scheme, Int4Setting
from hybrid.images import open_image
from hybrid.logs import setup_logging
from hybrid.media import IMAGE, VIDEO
from hybrid.quality import add_quality_arguments, run_quality
from hybrid.router import AUTO, ROUTE_CHOICES, choose_routes
from hybrid.types import Message, Request, collect

log = logging.getLogger("hybrid")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m hybrid", description="Qwen3-VL hybrid inference on the CPU")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    export = sub.add_parser("export", help="turn a Qwen3-VL checkpoint into a bundle")
    export.add_argument("--model", required=True, help="checkpoint folder or hub id")
    export.add_argument("--out", required=True, help="bundle folder to write")
    export.add_argument("--precision", choices=PRECISIONS, default="fp32")
    export.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai text model")
    export.add_argument(
        "--int4",
        default=None,
        help="with --precision int4: the decoder layers' QUANTIZER-bBLOCK, quantizer rtn (symmetric), "
        "rtn-zp (zero points), mse or mse-zp (each block's scale searched for the least error, "
        f"the same bytes) or hqq, block 32, 64 or 128 (default {Int4Scheme().layers.name})",
    )
    export.add_argument(
        "--store-int8",
        action="store_true",
        help="with --precision int4: keep the int8 prompt pass's weights in the bundle (1.35 GB for the 2B) "
        "instead of making them from the INT4 ones at load (a few seconds, and they are held twice while "
        "the route loads: 1.7 GB more at the peak for the 2B)",
    )
    export.add_argument(
        "--int4-head",
        default=None,
        help=f"the LM head's setting (default: --int4's if given, else {Int4Scheme().head.name})",
    )

    add_quality_arguments(sub.add_parser("quality", help="INT4 settings' fidelity to fp32, beside their speed"))

    gen = sub.add_parser("generate", help="answer one prompt")
    gen.add_argument("--bundle", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    gen.add_argument("--video", action="append", default=[], help="video file (repeatable, in order, after the images)")
    gen.add_argument(
        "--video-frames",
        type=int,
        default=DEFAULT_VIDEO_FRAMES,
        help=f"frames sampled from each video at most (the checkpoint's fps; limit {MAX_VIDEO_FRAMES})",
    )
    gen.add_argument("--system", default="", help="optional system message")
    gen.add_argument("--route", choices=ROUTE_CHOICES, default=AUTO)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--speculative",
        choices=SPECULATIVE,
        default=SamplingConfig.speculative,
        help="hybrid route: ngram drafts tokens from the conversation and verifies them in one pass "
        "(the same tokens, faster where the answer repeats the context); off: one token a pass",
    )
    gen.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    add_vision_argument(gen)
    add_prefill_argument(gen)
    gen.add_argument("--max-images", type=int, default=RuntimeConfig.max_images, help="refuse more images than this")
    gen.add_argument("--max-videos", type=int, default=RuntimeConfig.max_videos, help="refuse more videos than this")
    gen.add_argument(
        "--max-image-tokens",
        type=int,
        default=DEFAULT_MAX_IMAGE_TOKENS,
        help="image tokens per picture at most: larger pictures are scaled down",
    )
    add_remote_arguments(gen)
    gen.add_argument("--json", action="store_true", help="one JSON object per route instead of streamed text")

    add_bench_arguments(sub.add_parser("bench", help="benchmark the routes side by side"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.command == "generate"  # its stderr is for warnings (a route unavailable) and the one-line error
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO)
    try:
        return _COMMANDS[args.command](args)
    except HybridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _export(args: argparse.Namespace) -> int:
    from hybrid.export.bundle import export_bundle

    default = Int4Scheme()
    layers = Int4Setting.parse(args.int4) if args.int4 else default.layers
    head = Int4Setting.parse(args.int4_head) if args.int4_head else layers if args.int4 else default.head
    scheme = Int4Scheme(layers, head)
    export_bundle(
        args.model, args.out, args.precision, genai=not args.no_genai, int4=scheme, store_int8=args.store_int8
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from hybrid.pipeline import Pipeline

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        speculative=args.speculative,
    )
    runtime = RuntimeConfig(
        threads=args.threads,
        max_images=args.max_images,
        max_videos=args.max_videos,
        video=VideoLimits(max_frames=args.video_frames),
        vision_backend=vision_backend(args.vision),
        prefill=args.prefill,
    )
    runtime.check_count(IMAGE, len(args.image))
    runtime.check_count(VIDEO, len(args.video))
    images = tuple(open_image(path, runtime.max_image_pixels) for path in args.image)
    pipeline = Pipeline.load(args.bundle, runtime, remote=remote_config(args))
    videos = tuple(pipeline.open_video(path) for path in args.video)  # sampled as the checkpoint samples
    messages = (Message("system", args.system),) if args.system else ()
    request = Request(
        messages + (Message("user", args.prompt, images, videos),), sampling, max_image_tokens=args.max_image_tokens
    )
    routes = pipeline.plan(request, args.route)
    every = (*pipeline.routes, *pipeline.unavailable)
    for missing in choose_routes(request, args.route, every):  # what would serve with every route loaded
        if missing in pipeline.unavailable:
            log.warning("the %s route is unavailable: %s", missing, pipeline.unavailable[missing])
    for route in routes:
        result = collect(route, pipeline.stream(request, route), on_text=None if args.json else _echo)
        if args.json:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        else:
            print(file=sys.stdout, flush=True)
            log.debug("%s: %s", route, json.dumps(result["timings"]))
    return 0


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


_COMMANDS = {"export": _export, "generate": _generate, "bench": run_bench, "quality": run_quality}

if __name__ == "__main__":
    sys.exit(main())
